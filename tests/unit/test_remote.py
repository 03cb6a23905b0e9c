"""Shards over HTTP and S3 servers on loopback, and faulty servers for the retry, outage and timeout paths."""

from __future__ import annotations

import sys
import time

import pytest

from ijepa_scale.data.remote import DataUnavailable, ReadPolicy, filesystem, is_transient
from ijepa_scale.data.sources import ShardSource, open_shards, scan_shard
from ijepa_scale.errors import RunFailure, UserError, one_line
from tests.helpers.photos import make_photo_shards
from tests.helpers.servers import FaultyServer, OutageServer, closed_port, http_server, s3_server, upload
from tests.unit.test_stream import make_stream

SIZES = [13, 7, 11, 3, 9]
PATTERN = "train-{000000..000004}.tar"
FAST = ReadPolicy(timeout_s=1.0, attempts=3, backoff_s=0.05)


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote_shards")
    make_photo_shards(folder, sizes=SIZES, num_classes=4, size=(48, 40))
    return folder


@pytest.fixture(scope="session")
def http_base(photo_shards):
    with http_server(photo_shards) as base:
        yield base


@pytest.fixture(scope="session")
def s3_base(photo_shards):
    with s3_server():
        upload(photo_shards, "s3://shards/in1k")
        yield "s3://shards/in1k"


@pytest.fixture(scope="session")
def faulty(photo_shards):
    server = FaultyServer(photo_shards)
    yield server
    server.close()


def epoch_samples(source, workers=2, epoch=0):
    stream = make_stream(source, 0, 1, workers)
    stream.epoch = epoch
    out = []
    for batch in stream.epoch_batches():
        assert batch["errors"] == []
        out.extend(zip(batch["keys"], batch["labels"].tolist(), batch["images"].sum(dim=(1, 2, 3)).tolist()))
    return out


@pytest.mark.parametrize("where", ["http", "s3"])
def test_remote_shards_stream_the_same_samples_as_local(photo_shards, http_base, s3_base, where):
    base = {"http": http_base, "s3": s3_base}[where]
    local = open_shards(str(photo_shards / PATTERN))
    remote = open_shards(f"{base}/{PATTERN}")
    assert remote.counts == SIZES  # from the index beside the shards
    assert epoch_samples(remote) == epoch_samples(local)


def test_unindexed_s3_shards_are_counted(photo_shards, s3_base, tmp_path, caplog):
    for name in ("train-000000.tar", "train-000003.tar"):
        (tmp_path / name).write_bytes((photo_shards / name).read_bytes())
    upload(tmp_path, "s3://shards/noindex")
    with caplog.at_level("WARNING"):
        source = open_shards("s3://shards/noindex/train-{000000,000003}.tar")
    assert source.counts == [13, 3] and source.damaged == []
    assert [r.getMessage() for r in caplog.records if "shard index" in r.getMessage()][0].startswith(
        "2 of 2 shards are not in a shard index: their samples were counted by reading them")


def test_resume_over_s3_continues_exactly(s3_base):
    source = open_shards(f"{s3_base}/{PATTERN}")
    full = [b["keys"] for b in make_stream(source, 0, 1, 2).epoch_batches()]
    first = make_stream(source, 0, 1, 2)
    taken = []
    for batch in first.epoch_batches():
        taken.append(batch["keys"])
        if len(taken) == 4:
            break
    state = first.state_dict()
    resumed = make_stream(source, 0, 1, 2)
    resumed.load_state_dict(state)
    rest = [b["keys"] for b in resumed.epoch_batches()]
    assert taken + rest == full


def test_missing_backend_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(UserError, match=r"s3://b/x.tar: the s3:// storage backend is not installed; "
                                        r"pip install 'ijepa-scale\[s3\]'"):
        open_shards("s3://b/x.tar")
    with pytest.raises(UserError, match="unknown storage protocol 'nosuch'"):
        filesystem("nosuch://b/x.tar")


def read_shard(server, mode, shard=1, policy=FAST):
    url = f"{server.url}/{mode}/train-{shard:06d}.tar"
    source = ShardSource([url], [SIZES[shard]], policy=policy)
    return url, list(source.read_range(0, 0, 0, SIZES[shard]))


def keys_of(items):
    return [item.key for item in items]


@pytest.mark.parametrize("mode", ["drop-once", "500-once", "404-once"])
def test_transient_failures_are_retried_and_lose_nothing(faulty, photo_shards, mode):
    expected = keys_of(ShardSource([str(photo_shards / "train-000001.tar")], [7]).read_range(0, 0, 0, 7))
    url, items = read_shard(faulty, mode)
    assert keys_of(items) == expected
    assert faulty.requests[(mode, "train-000001.tar")] == 2


def assert_unavailable(message, url, attempts, cause):
    host = url.split("/")[2]
    assert message.startswith(f"data unavailable: {url} (host {host}): {cause}"), message
    assert f"{attempts} attempt(s) over" in message and "\n" not in message
    assert "data.read_attempts=3, data.retry_backoff_s=0.05, data.read_timeout_s=1" in message


@pytest.mark.parametrize("mode,cause", [("drop-always", "ClientPayloadError"), ("500-always", "HTTP 500")])
def test_a_shard_that_keeps_failing_stops_the_run_naming_url_host_and_settings(faulty, mode, cause):
    with pytest.raises(DataUnavailable) as info:
        read_shard(faulty, mode, shard=3)
    assert_unavailable(str(info.value), f"{faulty.url}/{mode}/train-000003.tar", 3, cause)
    assert isinstance(info.value, RunFailure) and faulty.requests[(mode, "train-000003.tar")] == 3


def test_a_stalled_read_ends_within_the_timeout(faulty):
    start = time.monotonic()
    with pytest.raises(DataUnavailable) as info:
        read_shard(faulty, "stall", shard=0)
    elapsed = time.monotonic() - start
    # 3 attempts x 1 s timeout + 0.05 + 0.1 s backoff; never a hang.
    assert elapsed < 10, elapsed
    # fsspec's own read timeout or the watchdog's ReadTimeout, whichever fires first
    assert_unavailable(str(info.value), f"{faulty.url}/stall/train-000000.tar", 3, "")
    assert "TimeoutError" in str(info.value) or "ReadTimeout" in str(info.value)


def test_failing_shard_in_fail_mode_names_the_url(faulty):
    url = f"{faulty.url}/500-always/train-000004.tar"
    source = ShardSource([url], [9], policy=FAST)
    stream = make_stream(source, 0, 1, 0, on_error="fail")
    with pytest.raises(RuntimeError, match="500-always/train-000004.tar"):
        list(stream.epoch_batches())


def test_counting_an_unindexed_shard_retries_transient_failures(faulty):
    assert scan_shard(f"{faulty.url}/drop-once/train-000002.tar", FAST) == (11, None)
    with pytest.raises(DataUnavailable, match="drop-always/train-000002.tar .*3 attempt"):
        scan_shard(f"{faulty.url}/drop-always/train-000002.tar", FAST)


@pytest.fixture
def outage(photo_shards):
    """An HTTP server that goes away right after serving its first shard and comes back 1.5 s later."""
    server = OutageServer(photo_shards, down_after=1, down_s=1.5)
    yield server
    server.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_short_outage_costs_nothing(photo_shards, outage, workers):
    local = epoch_samples(open_shards(str(photo_shards / PATTERN)), workers)
    source = open_shards(f"{outage.url}/{PATTERN}", policy=ReadPolicy(timeout_s=2, attempts=6, backoff_s=0.25))
    start = time.monotonic()
    assert epoch_samples(source, workers) == local
    assert len(outage.outages) == 1 and outage.outages[0][1] is not None  # it was down, then up again
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("workers", [0, 2])
def test_an_outage_past_the_retries_stops_with_one_line(photo_shards, workers):
    server = OutageServer(photo_shards, down_after=1)
    try:
        source = open_shards(f"{server.url}/{PATTERN}", policy=FAST)
        start = time.monotonic()
        with pytest.raises(DataUnavailable) as info:
            epoch_samples(source, workers)
        assert time.monotonic() - start < 10
    finally:
        server.close()
    message = one_line(info.value)  # a loader worker's failure arrives wrapped in its traceback
    url = message.split()[2]
    assert url.startswith(server.url) and url.endswith(".tar")
    assert_unavailable(message, url, 3, f"connection refused by {server.url[len('http://'):]}")


def test_a_closed_port_at_start_up_says_connection_refused():
    port = closed_port()
    with pytest.raises(DataUnavailable) as info:
        open_shards(f"http://127.0.0.1:{port}/{PATTERN}", policy=FAST)
    assert "shard not found" not in str(info.value)
    assert_unavailable(str(info.value), f"http://127.0.0.1:{port}/train-000000.tar", 3,
                       f"connection refused by 127.0.0.1:{port}")
    assert "check data.shards" in str(info.value)


def test_transient_error_classification():
    import aiohttp

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError())
    info = aiohttp.RequestInfo(url=aiohttp.client.URL("http://x"), method="GET", headers={}, real_url=None)
    assert is_transient(aiohttp.ClientResponseError(info, (), status=503))
    assert not is_transient(aiohttp.ClientResponseError(info, (), status=403))
    assert not is_transient(ValueError("bad tar"))
    refused = FileNotFoundError("http://x/a.tar")  # how fsspec's HTTP backend reports a refused connection
    refused.__cause__ = ConnectionRefusedError()
    assert is_transient(refused) and not is_transient(FileNotFoundError("http://x/a.tar"))
