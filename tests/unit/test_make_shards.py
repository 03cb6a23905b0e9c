"""Tests for the shard writer, ImageFolder -> shards conversion and Fashion-MNIST shards."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ijepa_scale.commands import make_shards
from ijepa_scale.data import fashion_mnist
from ijepa_scale.data.convert import assign_balanced, make_shards_from_folder
from ijepa_scale.data.shard_format import DatasetError, ShardWriter, read_index, shard_urls, write_index

from tests.helpers.photos import make_photo_folder, make_photo_shards

FMNIST_DIR = Path(fashion_mnist.DEFAULT_SOURCE_DIR)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_samples(out_dir: Path, index: dict) -> list[list[dict]]:
    """Per shard, the samples as {"key", "ext", "image", "cls", "json"}; checks adjacency."""
    shards = []
    for shard in index["shards"]:
        samples: list[dict] = []
        for name, payload in read_tar(out_dir / shard["url"]):
            key, ext = name.split(".", 1)
            if not samples or samples[-1]["key"] != key:
                assert all(s["key"] != key for s in samples), f"members of {key} not adjacent"
                samples.append({"key": key})
            if ext == "cls":
                samples[-1]["cls"] = int(payload.decode("ascii"))
            elif ext == "json":
                samples[-1]["json"] = json.loads(payload)
            else:
                samples[-1]["ext"], samples[-1]["image"] = ext, payload
        shards.append(samples)
    return shards


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("src"), num_classes=4, per_class=15)


@pytest.fixture(scope="module")
def converted(photo_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards")
    return out, make_shards_from_folder(photo_folder, out, num_shards=7, seed=3)


def test_round_trip_every_source_image_exactly_once(photo_folder, converted):
    out, index = converted
    sources = {p.relative_to(photo_folder).as_posix(): sha(p.read_bytes())
               for p in photo_folder.rglob("*.jpg")}
    assert len(sources) == 60
    samples = [s for shard in read_samples(out, index) for s in shard]
    assert len({s["key"] for s in samples}) == len(samples) == 60
    seen = Counter(s["json"]["path"] for s in samples)
    assert set(seen) == set(sources) and set(seen.values()) == {1}
    for s in samples:
        assert s["ext"] == "jpg"
        assert sha(s["image"]) == sources[s["json"]["path"]]  # original bytes kept as is
        class_dir = s["json"]["path"].split("/")[0]
        assert s["json"]["class"] == class_dir == index["classes"][s["cls"]]


def test_shards_are_balanced_and_index_matches_tars(converted):
    out, index = converted
    shards = read_samples(out, index)
    assert index["format"] == "ijepa-scale-shards" and index["version"] == 1
    assert index["prefix"] == "train"
    assert [s["url"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(7)]
    sizes = [len(samples) for samples in shards]
    assert [s["num_samples"] for s in index["shards"]] == sizes
    assert sum(sizes) == index["num_samples"] == 60
    assert max(sizes) - min(sizes) <= 1
    assert index["classes"] == ["class_000", "class_001", "class_002", "class_003"]
    assert index["class_counts"] == [15, 15, 15, 15]
    assert index["skipped"] == []
    for cls in range(4):
        per_shard = [sum(s["cls"] == cls for s in samples) for samples in shards]
        assert max(per_shard) - min(per_shard) <= 1, (cls, per_shard)
    # Classes are interleaved within a shard, not sorted.
    assert any([s["cls"] for s in samples] != sorted(s["cls"] for s in samples) for samples in shards)
    assert read_index(out / "train-index.json") == index
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_webdataset_reads_shards_with_correct_classes(converted):
    out, index = converted
    expected = {s["key"]: s["cls"] for shard in read_samples(out, index) for s in shard}
    urls = shard_urls(index, out / "train-index.json")
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls")
    got = {}
    for key, img, cls in dataset:
        assert img.size == (96, 72)
        got[key] = cls
    assert got == expected


def test_conversion_is_deterministic_and_parallel_workers_match(photo_folder, converted, tmp_path):
    out, index = converted
    again = make_shards_from_folder(photo_folder, tmp_path, num_shards=7, seed=3, num_workers=2)
    assert again["shards"] == index["shards"]
    for shard in index["shards"]:
        assert (tmp_path / shard["url"]).read_bytes() == (out / shard["url"]).read_bytes()


def test_seed_and_samples_per_shard(photo_folder, tmp_path):
    index = make_shards_from_folder(photo_folder, tmp_path / "a", samples_per_shard=25, seed=1)
    assert [s["num_samples"] for s in index["shards"]] == [20, 20, 20]  # ceil(60/25) = 3 shards
    other = make_shards_from_folder(photo_folder, tmp_path / "b", samples_per_shard=25, seed=2)
    paths = lambda out, idx: [s["json"]["path"] for s in read_samples(out, idx)[0]]  # noqa: E731
    assert paths(tmp_path / "a", index) != paths(tmp_path / "b", other)


def test_max_per_class(photo_folder, tmp_path):
    index = make_shards_from_folder(photo_folder, tmp_path, num_shards=2, max_per_class=5)
    assert index["class_counts"] == [5, 5, 5, 5]
    assert [s["num_samples"] for s in index["shards"]] == [10, 10]


def test_resize_short_side_shrinks_and_reencodes(tmp_path):
    src = make_photo_folder(tmp_path / "src", num_classes=2, per_class=4, size=(96, 72))
    png_dir = make_photo_folder(tmp_path / "png", num_classes=1, per_class=2, size=(40, 30), fmt="PNG")
    os.rename(png_dir / "class_000", src / "class_002")
    index = make_shards_from_folder(src, tmp_path / "out", num_shards=2, resize_short_side=48)
    samples = [s for shard in read_samples(tmp_path / "out", index) for s in shard]
    assert len(samples) == 10
    for s in samples:
        assert s["ext"] == "jpg"  # with resizing, everything is stored as JPEG
        img = Image.open(io.BytesIO(s["image"]))
        assert img.format == "JPEG"
        if s["json"]["class"] == "class_002":
            assert img.size == (40, 30)  # already small: re-encoded, not resized
        else:
            assert img.size == (64, 48)


def test_small_jpegs_kept_as_is_with_resize_and_png_kept_without(tmp_path):
    src = make_photo_folder(tmp_path / "src", num_classes=2, per_class=3, size=(96, 72), fmt="PNG")
    index = make_shards_from_folder(src, tmp_path / "png", num_shards=1)
    (samples,) = read_samples(tmp_path / "png", index)
    for s in samples:
        assert s["ext"] == "png" and s["image"] == (src / s["json"]["path"]).read_bytes()
    jpg_src = make_photo_folder(tmp_path / "jpg", num_classes=1, per_class=3, size=(96, 72))
    index = make_shards_from_folder(jpg_src, tmp_path / "jpg-out", num_shards=1, resize_short_side=80)
    (samples,) = read_samples(tmp_path / "jpg-out", index)
    assert all(s["image"] == (jpg_src / s["json"]["path"]).read_bytes() for s in samples)


def test_other_formats_reencoded_as_jpeg(tmp_path):
    src = make_photo_folder(tmp_path / "src", num_classes=2, per_class=2)
    Image.open(src / "class_000" / "0000.jpg").save(src / "class_001" / "extra.bmp")
    index = make_shards_from_folder(src, tmp_path / "out", num_shards=1)
    (samples,) = read_samples(tmp_path / "out", index)
    (bmp,) = [s for s in samples if s["json"]["path"].endswith(".bmp")]
    assert bmp["ext"] == "jpg" and bmp["cls"] == 1
    assert Image.open(io.BytesIO(bmp["image"])).format == "JPEG"


def test_corrupt_files_are_skipped_and_recorded(tmp_path):
    src = make_photo_folder(tmp_path / "src", num_classes=2, per_class=5)
    (src / "class_000" / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    good = (src / "class_001" / "0000.jpg").read_bytes()
    (src / "class_001" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    index = make_shards_from_folder(src, tmp_path / "out", num_shards=3)
    assert sorted(s["path"] for s in index["skipped"]) == [
        "class_000/garbage.jpg", "class_001/truncated.jpg"]
    assert all(s["error"] for s in index["skipped"])
    assert index["num_samples"] == 10 and index["class_counts"] == [5, 5]
    samples = [s for shard in read_samples(tmp_path / "out", index) for s in shard]
    assert len(samples) == 10
    assert not any("garbage" in s["json"]["path"] or "truncated" in s["json"]["path"] for s in samples)


def test_user_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=str(missing)):
        make_shards_from_folder(missing, tmp_path / "out")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="no class subdirectories"):
        make_shards_from_folder(tmp_path / "flat", tmp_path / "out")
    src = make_photo_folder(tmp_path / "src", num_classes=2, per_class=2)
    (src / "class_empty").mkdir()
    with pytest.raises(DatasetError, match="class_empty"):
        make_shards_from_folder(src, tmp_path / "out")
    (src / "class_empty").rmdir()
    with pytest.raises(DatasetError, match="num_shards"):
        make_shards_from_folder(src, tmp_path / "out", num_shards=5)


def test_existing_output_needs_overwrite(tmp_path):
    src = make_photo_folder(tmp_path / "src", num_classes=2, per_class=4)
    make_shards_from_folder(src, tmp_path / "out", num_shards=4)
    with pytest.raises(DatasetError, match="overwrite"):
        make_shards_from_folder(src, tmp_path / "out", num_shards=2)
    index = make_shards_from_folder(src, tmp_path / "out", num_shards=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar"]  # stale shards 2 and 3 are gone
    assert index["num_samples"] == 8


def test_cli_summary_and_error(tmp_path, capsys):
    src = make_photo_folder(tmp_path / "src", num_classes=3, per_class=4)
    make_shards.main(["--src", str(src), "--out", str(tmp_path / "out"), "--prefix", "val",
                      "--samples-per-shard", "5"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote 12 samples (3 classes) to 3 shards") and "\n" not in line
    assert read_index(tmp_path / "out" / "val-index.json")["num_samples"] == 12
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    assert exit_info.value.code == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_shard_writer_is_atomic_and_lazy(tmp_path):
    writer = ShardWriter(tmp_path, prefix="x")
    writer.write("a", b"\xff\xd8 jpeg bytes", "jpg", 3, {"class": "c"})
    assert not (tmp_path / "x-000000.tar").exists()  # still under a temporary name
    writer.next_shard()
    writer.next_shard()  # no-op: nothing written since
    writer.write("b", b"png bytes", "png", 1)
    assert writer.close() == [{"url": "x-000000.tar", "num_samples": 1},
                              {"url": "x-000001.tar", "num_samples": 1}]
    assert [n for n, _ in read_tar(tmp_path / "x-000000.tar")] == ["a.jpg", "a.cls", "a.json"]
    assert read_tar(tmp_path / "x-000001.tar") == [("b.png", b"png bytes"), ("b.cls", b"1")]
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "y").write("bad.key", b"", "jpg", 0)
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "y").write("k", b"", "gif", 0)


def test_shard_writer_crash_leaves_no_final_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path) as writer:
            writer.write("a", b"x", "jpg", 0)
            writer.next_shard()
            writer.write("b", b"y", "jpg", 0)
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def test_write_index_and_read_index(tmp_path):
    shards = [{"url": "t-000000.tar", "num_samples": 3}, {"url": "t-000001.tar", "num_samples": 2}]
    index = write_index(tmp_path / "t-index.json", shards, ["a", "b"], extra={"class_counts": [4, 1]})
    assert index["prefix"] == "t" and index["num_samples"] == 5 and index["skipped"] == []
    assert read_index(tmp_path / "t-index.json") == index
    assert read_index(f"file://{tmp_path / 't-index.json'}") == index
    assert shard_urls(index, "s3://bucket/data/t-index.json") == [
        "s3://bucket/data/t-000000.tar", "s3://bucket/data/t-000001.tar"]
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(DatasetError, match="other.json"):
        read_index(tmp_path / "other.json")
    with pytest.raises(DatasetError, match="missing.json"):
        read_index(tmp_path / "missing.json")


def test_assign_balanced_properties():
    labels = [0] * 50 + [1] * 23 + [2] * 7
    shards = assign_balanced(labels, 6, seed=0)
    assert sorted(i for s in shards for i in s) == list(range(80))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for c in range(3):
        counts = [sum(labels[i] == c for i in s) for s in shards]
        assert max(counts) - min(counts) <= 1
    assert assign_balanced(labels, 6, seed=0) == shards
    assert assign_balanced(labels, 6, seed=1) != shards


def test_photo_shards_helper_uneven_sizes(tmp_path):
    index = make_photo_shards(tmp_path, sizes=[3, 5, 2], num_classes=3)
    assert [s["num_samples"] for s in index["shards"]] == [3, 5, 2]
    assert index["class_counts"] == [4, 3, 3]
    shards = read_samples(tmp_path, index)
    assert [len(s) for s in shards] == [3, 5, 2]
    assert [s["cls"] for shard in shards for s in shard] == [j % 3 for j in range(10)]


def _write_idx(path: Path, magic: int, dims: list[int], payload: np.ndarray) -> None:
    header = np.array([magic, *dims], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + payload.astype(np.uint8).tobytes())


def test_load_idx_parses_and_validates(tmp_path):
    images = np.arange(3 * 4 * 5).reshape(3, 4, 5) % 256
    _write_idx(tmp_path / "img.gz", 2051, [3, 4, 5], images)
    _write_idx(tmp_path / "lbl.gz", 2049, [3], np.array([7, 0, 9]))
    got_images, got_labels = fashion_mnist.load_idx(tmp_path / "img.gz", tmp_path / "lbl.gz")
    assert got_images.shape == (3, 4, 5) and np.array_equal(got_images, images)
    assert got_labels.tolist() == [7, 0, 9]
    with pytest.raises(DatasetError, match="not an IDX1"):
        fashion_mnist.load_idx(tmp_path / "img.gz", tmp_path / "img.gz")
    _write_idx(tmp_path / "short.gz", 2049, [2], np.array([1, 2]))
    with pytest.raises(DatasetError, match="3 images but .*short.gz has 2 labels"):
        fashion_mnist.load_idx(tmp_path / "img.gz", tmp_path / "short.gz")


def test_fashion_mnist_missing_source_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.make_fashion_mnist_shards(tmp_path / "out", source_dir=tmp_path / "none")


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason=f"{FMNIST_DIR} not installed")
def test_fashion_mnist_balanced_subset(tmp_path):
    index = fashion_mnist.make_fashion_mnist_shards(tmp_path, split="train", num_shards=4, per_class=20)
    assert index["num_samples"] == 200 and index["prefix"] == "fmnist-train"
    assert index["classes"] == fashion_mnist.CLASSES and len(index["classes"]) == 10
    assert index["class_counts"] == [20] * 10
    assert [s["url"] for s in index["shards"]] == [f"fmnist-train-{i:06d}.tar" for i in range(4)]
    shards = read_samples(tmp_path, index)
    assert [len(s) for s in shards] == [50] * 4
    source_images, source_labels = fashion_mnist.load_idx(
        FMNIST_DIR / "train-images-idx3-ubyte.gz", FMNIST_DIR / "train-labels-idx1-ubyte.gz")
    for shard in shards:
        assert Counter(s["cls"] for s in shard) == {c: 5 for c in range(10)}
        for s in shard:
            img = Image.open(io.BytesIO(s["image"]))
            assert s["ext"] == "png" and img.format == "PNG"
            assert img.size == (28, 28) and img.mode == "L"
            i = int(s["json"]["path"].split("#")[1])
            assert source_labels[i] == s["cls"] and s["json"]["class"] == fashion_mnist.CLASSES[s["cls"]]
            assert np.array_equal(np.asarray(img), source_images[i])
