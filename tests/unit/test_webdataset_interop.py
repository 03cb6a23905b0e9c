"""webdataset interop both ways: its TarWriter/ShardWriter shards train as they are; ours read through WebDataset."""

from __future__ import annotations

import random

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ijepa_scale.data.shard_format import read_index
from ijepa_scale.data.sources import RawSample, open_shards
from ijepa_scale.data.transforms import open_image
from tests.helpers.photos import encode, make_photo_shards, photo_crop
from tests.unit.test_stream import make_stream

FORMATS = ["jpg", "png", "webp"]


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory):
    """3 shards of 6 real-photo crops written by webdataset.ShardWriter: jpg/png/webp in turn (PIL
    images that webdataset encodes, webp as bytes) plus an int `cls`. Returns (pattern, {key: (label, pixels)})."""
    folder = tmp_path_factory.mktemp("wds")
    rng = random.Random(1)
    written = {}
    with wds.ShardWriter(str(folder / "wds-%06d.tar"), maxcount=6, verbose=0) as sink:
        for i in range(18):
            image = photo_crop(i % 5, (40, 32), rng)
            key = f"sample{i:04d}"
            fmt = FORMATS[i % 3]
            # webdataset 1.0.2 encodes jpg and png itself but has no webp encoder: bytes then.
            sink.write({"__key__": key, fmt: encode(image, "WEBP") if fmt == "webp" else image, "cls": i % 5})
            written[key] = (i % 5, np.asarray(image))
    return str(folder / "wds-{000000..000002}.tar"), written


def test_webdataset_shards_train_without_conversion(wds_shards, caplog):
    pattern, written = wds_shards
    with caplog.at_level("WARNING"):
        source = open_shards(pattern)
    assert any("3 of 3 shards are not in a shard index" in r.getMessage() for r in caplog.records)
    assert source.counts == [6, 6, 6]
    items = list(source.read_range(0, 0, 0, 18))
    assert all(isinstance(i, RawSample) for i in items) and {i.key for i in items} == set(written)
    for item in items:
        label, pixels = written[item.key]
        decoded = np.asarray(open_image(item.data).convert("RGB"))
        assert item.label == label and decoded.shape == pixels.shape
        tolerance = 0 if item.key in {f"sample{i:04d}" for i in range(1, 18, 3)} else 15  # png is lossless
        assert np.abs(decoded.astype(int) - pixels).mean() <= tolerance
    keys, labels = [], []
    for batch in make_stream(source, 0, 1, 2, batch_size=3).epoch_batches():
        assert batch["errors"] == [] and batch["images"].shape == (3, 3, 32, 32)
        keys.extend(batch["keys"])
        labels.extend(batch["labels"].tolist())
    assert sorted(keys) == sorted(written) and labels == [written[k][0] for k in keys]


def test_our_shards_read_through_webdataset(tmp_path):
    index = make_photo_shards(tmp_path, sizes=[5, 4], num_classes=3, size=(40, 32))
    ours = list(open_shards(str(tmp_path / "train-{000000..000001}.tar")).read_range(0, 0, 0, 9))
    dataset = wds.WebDataset(str(tmp_path / "train-{000000..000001}.tar"), shardshuffle=False)
    theirs = list(dataset.decode("pil").to_tuple("__key__", "jpg", "cls", "json"))
    assert read_index(tmp_path / "train-index.json")["num_samples"] == index["num_samples"] == 9
    assert len(theirs) == 9
    by_key = {item.key: item for item in ours}
    for key, image, label, meta in theirs:
        assert isinstance(image, Image.Image) and image.size == (40, 32)
        assert label == by_key[key].label and meta["class"] == f"class_{label:03d}"
        assert np.array_equal(np.asarray(image), np.asarray(open_image(by_key[key].data).convert("RGB")))
