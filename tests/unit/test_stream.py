"""The shard stream: exactly once per epoch, equal steps per rank, exact resume, bad data counted."""

import itertools
import tarfile
from collections import Counter

import pytest
import torch

from ijepa_scale.data.sources import ImageFolderSource, ShardSource, open_shards
from ijepa_scale.data.stream import DataStream
from ijepa_scale.data.transforms import ImageTransform
from ijepa_scale.masks import MultiBlockMaskCollator
from tests.helpers.photos import make_photo_folder, make_photo_shards
from tests.helpers.shards import NOT_A_JPEG, replace_member, truncate

CROP = 32


def make_stream(source, rank, world, workers, batch_size=4, seed=0, shuffle_buffer=7, on_error="skip"):
    collator = MultiBlockMaskCollator(input_size=CROP, patch_size=8, enc_mask_scale=(0.85, 1.0),
                                      pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=2,
                                      min_keep=2, seed=seed, rank=rank)
    return DataStream(source, ImageTransform(CROP), collator, batch_size=batch_size, num_workers=workers,
                      rank=rank, world_size=world, seed=seed, shuffle_buffer=shuffle_buffer, on_error=on_error)


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("uneven")
    make_photo_shards(out, sizes=[13, 7, 11, 3, 9], num_classes=4, size=(48, 40))
    return out


def shard_source(folder):
    return open_shards(str(folder / "train-{000000..000004}.tar"))


def epoch_keys(stream):
    return [batch["keys"] for batch in stream.epoch_batches()]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 2)])
def test_every_sample_once_per_epoch_and_equal_steps(uneven_shards, world, workers):
    source = shard_source(uneven_shards)
    assert source.num_samples == 43
    batch_size = 4
    steps = source.num_samples // (world * batch_size)
    for epoch in range(2):
        seen = []
        for rank in range(world):
            stream = make_stream(source, rank, world, workers, batch_size)
            stream.epoch = epoch
            batches = epoch_keys(stream)
            assert len(batches) == steps  # the same number of steps on every rank
            assert all(len(b) == batch_size for b in batches)
            seen.extend(itertools.chain.from_iterable(batches))
        counts = Counter(seen)
        assert max(counts.values()) == 1  # no duplicates across ranks and workers
        assert len(seen) == steps * world * batch_size  # only the remainder (< world * batch) is dropped
        assert source.num_samples - len(seen) < world * batch_size


def test_epochs_are_shuffled_differently(uneven_shards):
    source = shard_source(uneven_shards)
    stream = make_stream(source, 0, 1, 0)
    first = epoch_keys(stream)
    second = epoch_keys(stream)
    assert stream.epoch == 2
    assert first != second and sorted(map(tuple, first)) != sorted(map(tuple, second)) or first != second


def test_batches_do_not_depend_on_worker_timing(uneven_shards):
    source = shard_source(uneven_shards)
    runs = [epoch_keys(make_stream(source, 1, 2, 2)) for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("stop_after", [1, 2, 3, 5])
def test_resume_continues_the_stream_exactly(uneven_shards, workers, stop_after):
    source = shard_source(uneven_shards)
    full = make_stream(source, 0, 1, workers)
    reference = [(b["keys"], b["images"], b["masks_enc"][0]) for b in full.epoch_batches()]

    partial = make_stream(source, 0, 1, workers)
    for batch in itertools.islice(partial.epoch_batches(), stop_after):
        pass
    state = partial.state_dict()
    assert state["batch_in_epoch"] == stop_after
    resumed = make_stream(source, 0, 1, workers)
    resumed.load_state_dict(state)
    rest = [(b["keys"], b["images"], b["masks_enc"][0]) for b in resumed.epoch_batches()]
    assert len(rest) == len(reference) - stop_after
    for (k1, img1, m1), (k2, img2, m2) in zip(reference[stop_after:], rest):
        assert k1 == k2 and torch.equal(img1, img2) and torch.equal(m1, m2)
    assert resumed.epoch == 1 and resumed.batch_in_epoch == 0


def test_resume_with_other_topology_is_refused_mid_epoch_only(uneven_shards):
    source = shard_source(uneven_shards)
    stream = make_stream(source, 0, 2, 2)
    next(iter(stream.epoch_batches()))
    state = stream.state_dict()
    with pytest.raises(ValueError, match=r"cannot resume mid-epoch.*data.num_workers 2 -> 1"):
        make_stream(source, 0, 2, 1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"world size 2 -> 1"):
        make_stream(source, 0, 1, 2).load_state_dict(state)
    boundary = dict(state, batch_in_epoch=0, epoch=1)
    other = make_stream(source, 0, 1, 1)
    other.load_state_dict(boundary)
    assert other.epoch == 1


def test_state_at_epoch_end_points_to_next_epoch(uneven_shards):
    source = shard_source(uneven_shards)
    stream = make_stream(source, 0, 1, 0)
    for _ in stream.epoch_batches():
        state = stream.state_dict()
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 0


def test_missing_shard_fails_before_training_with_url_and_the_pattern_as_set(uneven_shards):
    pattern = str(uneven_shards / "train-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError) as info:
        open_shards(pattern)
    assert str(info.value) == (f"shard not found: {uneven_shards / 'train-000005.tar'} (and 4 more); check "
                               f"data.shards={pattern!r}, which expands to 10 shard(s)")


def test_missing_local_data_is_reported_before_the_ranks_start(tmp_path):
    from types import SimpleNamespace

    from ijepa_scale.data.sources import check_local_data

    pattern = str(tmp_path / "x-{000..003}.tar")
    shards = SimpleNamespace(shards=pattern, read_timeout_s=1, read_attempts=1, retry_backoff_s=1)
    with pytest.raises(FileNotFoundError, match=r"x-000.tar \(and 3 more\); check data.shards='.*x-\{000..003\}.tar', "
                                                r"which expands to 4 shard\(s\)$"):
        check_local_data(shards)
    folder = SimpleNamespace(shards="", root_path=str(tmp_path / "nope"), image_folder="in1k")
    with pytest.raises(FileNotFoundError, match=r"ImageFolder root .*nope/in1k/train' does not exist"):
        check_local_data(folder)
    check_local_data(SimpleNamespace(shards="http://127.0.0.1:9/x-{0..3}.tar"))  # remote: left to the ranks


def test_shards_without_index_are_counted_and_said_in_one_line(tmp_path, uneven_shards, caplog):
    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / name).write_bytes((uneven_shards / name).read_bytes())
    with caplog.at_level("WARNING"):
        source = open_shards(str(tmp_path / "train-{000000..000001}.tar"))
    assert source.counts == [13, 7]
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("2 of 2 shards are not in a shard index: their samples were counted by reading")
    assert "\n" not in message


def corrupt_shards(folder):
    """Shard 1 truncated mid-way, one undecodable image in shard 0."""
    make_photo_shards(folder, sizes=[8, 8, 8], num_classes=2, size=(40, 40))
    replace_member(folder / "train-000000.tar", "000000_000003", "jpg", NOT_A_JPEG)
    shard1 = folder / "train-000001.tar"
    truncate(shard1, shard1.stat().st_size // 2)
    return open_shards(str(folder / "train-{000000..000002}.tar"))


def test_corrupt_samples_and_truncated_shard_are_skipped_and_counted(tmp_path):
    source = corrupt_shards(tmp_path)
    readable = set()
    with tarfile.open(tmp_path / "train-000001.tar", "r|") as tar:
        try:
            for member in tar:
                readable.add(member.name.split(".")[0])
        except tarfile.ReadError:
            pass
    stream = make_stream(source, 0, 1, 0, batch_size=4, shuffle_buffer=24)
    batches = list(stream.epoch_batches())
    errors = [e for b in batches for e in b["errors"]]
    assert len(batches) == 6 and all(b["images"].shape[0] == 4 for b in batches)
    by_shard = Counter(source for source, _ in errors)
    assert by_shard[str(tmp_path / "train-000000.tar")] == 1
    truncated_errors = by_shard[str(tmp_path / "train-000001.tar")]
    # Samples after the cut are missing; the last one read may be incomplete (no .cls) and counts too.
    assert 8 - len(readable) <= truncated_errors <= 8 - len(readable) + 1 and truncated_errors >= 1
    assert sum(by_shard.values()) == len(errors)


def test_on_error_fail_stops_with_the_shard_name(tmp_path):
    source = corrupt_shards(tmp_path)
    stream = make_stream(source, 0, 1, 0, batch_size=4, shuffle_buffer=24, on_error="fail")
    with pytest.raises(RuntimeError, match=r"train-00000[01].tar"):
        list(stream.epoch_batches())


def test_too_small_dataset_is_a_clear_error(uneven_shards):
    source = ShardSource(["x.tar"], [5])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_stream(source, 0, 2, 0, batch_size=4)


def test_image_folder_source_exactly_once(tmp_path):
    root = make_photo_folder(tmp_path / "train", num_classes=3, per_class=7, size=(40, 40))
    source = ImageFolderSource(str(root))
    assert source.num_samples == 21 and source.classes == ["class_000", "class_001", "class_002"]
    seen = []
    for rank in range(2):
        stream = make_stream(source, rank, 2, 2, batch_size=2)
        for batch in stream.epoch_batches():
            seen.extend(batch["keys"])
            assert set(batch["labels"].tolist()) <= {0, 1, 2}
    assert len(seen) == 20 and len(set(seen)) == 20


def test_image_folder_missing_root_names_the_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root_path"):
        ImageFolderSource(str(tmp_path / "nope"))


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_shards_through_fsspec_urls(uneven_shards, scheme):
    import fsspec

    if scheme == "file":
        base = f"file://{uneven_shards}"
    else:
        base = "memory://bucket/in1k"
        fs = fsspec.filesystem("memory")
        for path in uneven_shards.iterdir():
            fs.pipe(f"{base}/{path.name}", path.read_bytes())
    source = open_shards(base + "/train-{000000..000004}.tar")
    assert source.counts == [13, 7, 11, 3, 9]  # from the index beside the shards
    keys = [k for batch in make_stream(source, 0, 1, 0).epoch_batches() for k in batch["keys"]]
    assert len(keys) == 40 and len(set(keys)) == 40


@pytest.mark.parametrize("stop_after", [None, 1])
def test_batch_with_no_decodable_sample_trains_on_the_next_good_ones(tmp_path, stop_after):
    make_photo_shards(tmp_path, sizes=[8, 8], num_classes=2, size=(40, 40))
    truncate(tmp_path / "train-000000.tar", 100)  # nothing readable in shard 0 (the index says 8)
    source = open_shards(str(tmp_path / "train-{000000..000001}.tar"))
    stream = make_stream(source, 0, 1, 0, batch_size=4, shuffle_buffer=1)
    epoch = next(e for e in range(20) if source.epoch_order(0, e)[0] == 0)  # shard 0 read first
    stream.epoch = epoch
    if stop_after is not None:  # a resume lands on the same stand-ins
        for _ in itertools.islice(stream.epoch_batches(), stop_after):
            pass
        state = stream.state_dict()
        stream = make_stream(source, 0, 1, 0, batch_size=4, shuffle_buffer=1)
        stream.load_state_dict(state)
    batches = list(stream.epoch_batches())
    assert "usable" not in batches[0]
    assert [len(b["errors"]) for b in batches] == [4, 4, 0, 0][stop_after or 0:]
    good = batches[-2]  # the first batch with images: it stands in for the empty ones
    for empty in batches[:-2]:
        assert torch.equal(empty["images"], good["images"]) and torch.equal(empty["labels"], good["labels"])


def test_a_cause_of_skipped_samples_is_logged_once(tmp_path, caplog):
    make_photo_shards(tmp_path, sizes=[8, 8], num_classes=2, size=(40, 40))
    shard = tmp_path / "train-000000.tar"
    truncate(shard, shard.stat().st_size // 3)
    source = open_shards(str(tmp_path / "train-{000000..000001}.tar"))
    stream = make_stream(source, 0, 1, 0, batch_size=2, shuffle_buffer=1)
    with caplog.at_level("WARNING"):
        errors = [len(b["errors"]) for _ in range(2) for b in stream.epoch_batches()]
    assert sum(1 for n in errors if n) >= 4  # lost samples in several steps of both epochs
    logged = [r.getMessage() for r in caplog.records if str(shard) in r.getMessage()]
    assert len(logged) == 1 and "shard ended after" in logged[0] and "counted in the skipped column" in logged[0]


def last_members(shard):
    """(offset of its data, size) of each sample's last member."""
    last = {}
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            last[info.name.split(".")[0]] = (info.offset_data, info.size)
    return list(last.values())


@pytest.mark.parametrize("cut", ["after-8", "in-9th"])
def test_truncated_shard_without_index_keeps_every_complete_sample(tmp_path, uneven_shards, cut):
    folder = unindexed_copy(uneven_shards, tmp_path / "shards", ["train-000000.tar"])
    shard = folder / "train-000000.tar"
    members = last_members(shard)
    offset, size = members[7]
    # Right after the 8th sample, or inside the 9th sample's last member (its image is whole, its label cut).
    truncate(shard, offset + -(-size // 512) * 512 if cut == "after-8" else members[8][0])
    source = open_shards(str(shard))
    assert source.counts == [8]
    assert source.damaged[0].describe().startswith(f"shard {shard} is damaged after 8 samples")


def unindexed_copy(src, dst, names):
    dst.mkdir(exist_ok=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "directory"])
def test_damaged_shard_without_index_is_counted_warned_once_and_trains(tmp_path, uneven_shards, caplog, damage):
    names = [f"train-00000{i}.tar" for i in range(3)]
    folder = unindexed_copy(uneven_shards, tmp_path / "shards", names)
    bad = folder / "train-000001.tar"
    if damage == "truncated":
        truncate(bad, bad.stat().st_size // 2)
    elif damage == "zero-byte":
        bad.write_bytes(b"")
    else:
        bad.unlink()
        bad.mkdir()
    with caplog.at_level("WARNING"):
        source = open_shards(str(folder / "train-{000000..000002}.tar"))
    readable = source.counts[1]
    assert source.counts[0] == 13 and source.counts[2] == 11
    assert (0 < readable < 7) if damage == "truncated" else readable == 0
    assert source.startup_skipped == 1 and [d.url for d in source.damaged] == [str(bad)]
    warnings_logged = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
    assert len(warnings_logged) == 1 and ("damaged after" in warnings_logged[0] or "unreadable" in warnings_logged[0])
    # Training reads exactly the readable samples: no error, nothing twice.
    keys = []
    for batch in make_stream(source, 0, 1, 2, batch_size=2).epoch_batches():
        assert batch["errors"] == []
        keys.extend(batch["keys"])
    expected = (13 + readable + 11) // 2 * 2
    assert len(keys) == expected and len(set(keys)) == expected


def test_damaged_shard_without_index_in_fail_mode_is_one_line(tmp_path, uneven_shards, caplog):
    from ijepa_scale.errors import UserError

    folder = unindexed_copy(uneven_shards, tmp_path / "shards", ["train-000000.tar", "train-000001.tar"])
    truncate(folder / "train-000001.tar", 3000)
    with caplog.at_level("WARNING"), pytest.raises(UserError) as info:
        open_shards(str(folder / "train-{000000..000001}.tar"), on_error="fail")
    assert caplog.records == []  # no notice about the missing index before the error
    message = str(info.value)
    assert "\n" not in message and "train-000001.tar" in message and "data.on_error=skip" in message


def test_unreadable_index_is_one_line_naming_it(tmp_path, uneven_shards):
    from ijepa_scale.errors import UserError

    folder = unindexed_copy(uneven_shards, tmp_path / "shards", ["train-000000.tar"])
    (folder / "train-index.json").write_text("{not json")
    with pytest.raises(UserError, match=r"train-index.json is not a valid index .*make-shards"):
        open_shards(str(folder / "train-000000.tar"))


def test_shard_changed_since_indexing_is_named(tmp_path, caplog):
    from ijepa_scale.data.convert import make_shards_from_folder
    from ijepa_scale.errors import UserError

    src = make_photo_folder(tmp_path / "src", num_classes=2, per_class=6, size=(40, 40))
    index = make_shards_from_folder(src, tmp_path / "out", num_shards=3)
    assert all(s["bytes"] > 0 and len(s["sha256"]) == 64 for s in index["shards"])
    truncate(tmp_path / "out" / "train-000001.tar", 2048)
    pattern = str(tmp_path / "out" / "train-{000000..000002}.tar")
    with caplog.at_level("WARNING"):
        source = open_shards(pattern)
    assert source.counts == [4, 4, 4]
    assert any("train-000001.tar has 2048 bytes, its index says" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="train-000001.tar has 2048 bytes.*data.on_error=skip"):
        open_shards(pattern, on_error="fail")


def test_workers_persist_across_epochs_and_stop_on_close(uneven_shards):
    source = shard_source(uneven_shards)
    stream = make_stream(source, 0, 1, 2)
    pids = []
    for epoch in range(3):
        fresh = make_stream(source, 0, 1, 2)
        fresh.epoch = epoch
        expected = epoch_keys(fresh)  # new workers started for this epoch alone
        assert epoch_keys(stream) == expected
        pids.append(sorted(w.pid for w in stream._loader._iterator._workers))
    assert pids[0] == pids[1] == pids[2]  # the same worker processes for every epoch
    workers = stream._loader._iterator._workers
    stream.close()
    assert stream._loader is None and not any(w.is_alive() for w in workers)
