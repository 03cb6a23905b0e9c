"""make-shards from synset tars and file lists, bad inputs, resume, --shard-bytes, URL output, progress."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ijepa_scale.commands.make_shards import main as make_shards_main
from ijepa_scale.data import convert
from ijepa_scale.data.convert import make_shards, parse_bytes
from ijepa_scale.data.shard_format import DatasetError, summary_line
from ijepa_scale.data.sources import open_shards
from tests.helpers.photos import encode, photo_crop

SYNSETS = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = 8


def photo_bytes(cls: int, n: int) -> bytes:
    return encode(photo_crop(cls * 3 + n, (48, 40), random.Random(cls * 100 + n)))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 24 real-photo JPEGs as an ImageFolder tree, per-synset tars and a file list."""
    root = tmp_path_factory.mktemp("layouts")
    folder, tars, listed = root / "folder", root / "tars", root / "listed"
    tars.mkdir()
    lines = []
    for cls, synset in enumerate(SYNSETS):
        (folder / synset).mkdir(parents=True)
        (listed / synset).mkdir(parents=True)
        with tarfile.open(tars / f"{synset}.tar", "w") as tar:
            for n in range(PER_CLASS):
                name = f"{synset}_{n}.JPEG"
                data = photo_bytes(cls, n)
                (folder / synset / name).write_bytes(data)
                (listed / synset / name).write_bytes(data)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                lines.append(f"{synset}/{name}\t{synset}")
    (listed / "train.txt").write_text("\n".join(lines) + "\n")
    return {"folder": folder, "synset-tars": tars, "list": listed / "train.txt"}


def shard_contents(out: Path, index: dict) -> set[tuple[str, str]]:
    """(class name, sha256 of the stored image) of every sample in the shards."""
    found = set()
    for shard in index["shards"]:
        data = (out / shard["url"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        with tarfile.open(out / shard["url"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, payload in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                image = next(v for k, v in members.items() if k.startswith(key + ".") and k.split(".")[1] in
                             ("jpg", "png", "webp"))
                cls = json.loads(payload)["class"]
                assert int(members[key + ".cls"]) == index["classes"].index(cls)
                found.add((cls, hashlib.sha256(image).hexdigest()))
    return found


def test_folder_synset_tars_and_list_give_the_same_samples(layouts, tmp_path):
    results = {}
    for fmt, src in layouts.items():
        out = tmp_path / fmt
        index = make_shards(src, out, src_format=fmt, num_shards=3, seed=1)
        assert index["classes"] == SYNSETS and index["num_samples"] == 24 and index["skipped"] == []
        assert (out / index["classes_file"]).read_text().split() == SYNSETS
        results[fmt] = shard_contents(out, index)
        # A global shuffle: every shard mixes all classes.
        for shard in index["shards"]:
            with tarfile.open(out / shard["url"]) as tar:
                labels = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")}
            assert len(labels) == 3
    assert len(results["folder"]) == 24
    assert results["folder"] == results["synset-tars"] == results["list"]


def cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    photo_crop(1, (40, 40), random.Random(5)).convert("CMYK").save(out, "JPEG")
    return out.getvalue()


def grey_jpeg() -> bytes:
    out = io.BytesIO()
    photo_crop(2, (40, 40), random.Random(6)).convert("L").save(out, "JPEG")
    return out.getvalue()


def test_bad_synset_inputs_are_converted_or_skipped_and_reported(tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    members = {
        "n00000001": [("good_0.JPEG", photo_bytes(0, 0)), ("cmyk.JPEG", cmyk_jpeg()), ("grey.JPEG", grey_jpeg()),
                      ("png.JPEG", encode(photo_crop(3, (40, 40), random.Random(7)), "PNG")),
                      ("empty.JPEG", b""), ("garbage.JPEG", b"not an image at all")],
        "n00000002": [(f"good_{n}.JPEG", photo_bytes(1, n)) for n in range(6)],
    }
    for synset, files in members.items():
        with tarfile.open(src / f"{synset}.tar", "w") as tar:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = (src / "n00000002.tar").read_bytes()
    (src / "n00000002.tar").write_bytes(whole[: len(whole) // 2])  # a truncated synset tar
    index = make_shards(src, tmp_path / "out", src_format="synset-tars", num_shards=2)

    skipped = {item["path"]: item["error"] for item in index["skipped"]}
    assert "empty file" in skipped["n00000001.tar/empty.JPEG"]
    assert "n00000001.tar/garbage.JPEG" in skipped
    assert "synset tar listed to member" in skipped["n00000002.tar"]
    converted = {item["path"]: item["note"] for item in index["converted"]}
    assert converted == {"n00000001.tar/cmyk.JPEG": "CMYK JPEG converted to RGB",
                         "n00000001.tar/grey.JPEG": "greyscale JPEG converted to RGB",
                         "n00000001.tar/png.JPEG": "PNG data named .jpeg, stored as .png"}
    good_in_truncated = index["class_counts"][1]
    assert 0 < good_in_truncated < 6 and index["class_counts"][0] == 4
    assert index["report"]["skipped"]["empty file"] == 1 and index["report"]["skipped"]["truncated synset tar"] == 1
    line = summary_line(index, tmp_path / "out")
    assert "skipped 3 unreadable files" in line and "CMYK JPEG converted to RGB" in line
    stored = {}
    for shard in index["shards"]:
        with tarfile.open(tmp_path / "out" / shard["url"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, payload in files.items():
            if name.endswith(".json"):
                key = name[:-5]
                ext, image = next((k.split(".")[1], v) for k, v in files.items()
                                  if k.startswith(key + ".") and k.split(".")[1] in ("jpg", "png"))
                stored[json.loads(payload)["path"]] = (ext, Image.open(io.BytesIO(image)))
    assert stored["n00000001.tar/cmyk.JPEG"][1].mode == "RGB" and stored["n00000001.tar/grey.JPEG"][1].mode == "RGB"
    assert stored["n00000001.tar/png.JPEG"][0] == "png"


def test_file_list_with_integer_labels_and_errors(layouts, tmp_path):
    listing = tmp_path / "list.txt"
    folder = layouts["folder"]
    listing.write_text(f"{folder}/{SYNSETS[0]}/{SYNSETS[0]}_0.JPEG\t2\n{folder}/{SYNSETS[1]}/{SYNSETS[1]}_0.JPEG\t0\n"
                       f"{tmp_path}/missing.JPEG\t1\n")
    index = make_shards(listing, tmp_path / "out", src_format="list", num_shards=1)
    assert index["classes"] == ["0", "1", "2"] and index["class_counts"] == [1, 0, 1]
    assert [s["path"] for s in index["skipped"]] == [f"{tmp_path}/missing.JPEG"]
    listing.write_text("no tab here\n")
    with pytest.raises(DatasetError, match=r"list.txt:1: expected 'path<TAB>label'"):
        make_shards(listing, tmp_path / "out2", src_format="list")


def test_interrupted_conversion_resumes_keeping_complete_shards(layouts, tmp_path, monkeypatch):
    src, out = layouts["folder"], tmp_path / "out"
    reference = make_shards(src, tmp_path / "reference", num_shards=6, seed=2)
    real_write = convert._write_shard
    done = []

    def crash_on_fourth(task):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(task.shard_idx)
        return real_write(task)

    monkeypatch.setattr(convert, "_write_shard", crash_on_fourth)
    with pytest.raises(DatasetError, match="interrupted with 3 of 6 shards complete; run the same command"):
        make_shards(src, out, num_shards=6, seed=2)
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{i}.tar" for i in done]
    assert not (out / "train-index.json").exists()
    (out / ".train-000004.tar.tmp-999").write_bytes(b"partial")  # a crashed worker's staging file
    kept = {i: (out / f"train-00000{i}.tar").stat().st_mtime_ns for i in done}

    rewritten = []
    monkeypatch.setattr(convert, "_write_shard", lambda task: rewritten.append(task.shard_idx) or real_write(task))
    index = make_shards(src, out, num_shards=6, seed=2)
    assert sorted(rewritten) == [i for i in range(6) if i not in done]
    assert all((out / f"train-00000{i}.tar").stat().st_mtime_ns == t for i, t in kept.items())
    assert not list(out.glob(".*tmp*"))
    assert index["shards"] == reference["shards"]  # the same bytes (sha256) as an uninterrupted run
    with pytest.raises(DatasetError, match="overwrite"):
        make_shards(src, out, num_shards=5, seed=2)


def test_shard_bytes(layouts, tmp_path):
    assert parse_bytes("1GB") == 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    with pytest.raises(DatasetError, match="--shard-bytes"):
        parse_bytes("lots")
    total = sum(p.stat().st_size for p in layouts["folder"].rglob("*.JPEG"))
    index = make_shards(layouts["folder"], tmp_path / "out", shard_bytes=str(total // 4 + 1))
    assert len(index["shards"]) == 4 and index["num_samples"] == 24


def test_output_to_an_fsspec_url_reads_back(layouts, tmp_path):
    import fsspec

    index = make_shards(layouts["folder"], "memory://bucket/in1k", num_shards=3, seed=1)
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.glob("/bucket/in1k/train-*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    source = open_shards("memory://bucket/in1k/train-{000000..000002}.tar")
    assert source.counts == [s["num_samples"] for s in index["shards"]] and source.num_samples == 24
    local = make_shards(layouts["folder"], tmp_path / "local", num_shards=3, seed=1)
    assert [s["sha256"] for s in index["shards"]] == [s["sha256"] for s in local["shards"]]


def test_progress_line_has_rate_and_eta():
    stream = io.StringIO()
    meter = convert.Progress(100, 4, stream=stream, interval_s=0)
    meter.update(25)
    line = stream.getvalue()
    assert "1/4 shards, 25/100 images (25.0%)" in line and "img/s" in line and "ETA" in line


def test_cli_synset_tars(layouts, tmp_path, capsys):
    make_shards_main(["--src", str(layouts["synset-tars"]), "--src-format", "synset-tars", "--out", str(tmp_path / "o"),
             "--samples-per-shard", "10", "--workers", "2"])
    captured = capsys.readouterr()
    assert captured.out.startswith("wrote 24 samples (3 classes) to 3 shards")
    assert "img/s" in captured.err and "ETA" in captured.err
