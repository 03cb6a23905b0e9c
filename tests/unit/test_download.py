"""Registry, verified cache and resumable download against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from ijepa_scale.commands import download as download_command
from ijepa_scale.weights import load_checkpoint, registry
from ijepa_scale.weights.download import CACHE_ENV_VAR, DownloadError, cache_path, fetch
from ijepa_scale.weights.registry import find_release
from tests.helpers.http_server import FileServer

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # > 3 chunks, so a cut lands mid-file
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture()
def server():
    with FileServer() as srv:
        srv.files["/ijepa/w.pth.tar"] = PAYLOAD
        yield srv


def test_download_pins_sha256_and_reuses_the_cache_offline(server, tmp_path):
    url = server.url("/ijepa/w.pth.tar")
    path = fetch(url, cache_dir=tmp_path, quiet=True)
    assert path.read_bytes() == PAYLOAD and path == cache_path(url, tmp_path)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["sha256"] == SHA and meta["size"] == len(PAYLOAD)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.name + ".json"])  # no lock left
    # Filled cache: no request reaches the server (it is shut down: any call would fail).
    server.__exit__(None, None, None)
    n = len(server.requests)
    assert fetch(url, cache_dir=tmp_path, quiet=True) == path
    assert len(server.requests) == n == 1


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    url = server.url("/ijepa/w.pth.tar")
    server.cut_after["/ijepa/w.pth.tar"] = 1_500_000
    with pytest.raises(DownloadError, match="resume"):
        fetch(url, cache_dir=tmp_path, quiet=True)
    dest = cache_path(url, tmp_path)
    part = dest.with_name(dest.name + ".part")
    assert not dest.exists() and 0 < part.stat().st_size < len(PAYLOAD)
    assert sorted(p.name for p in tmp_path.iterdir()) == [part.name]  # the failed download left no lock
    have = part.stat().st_size
    assert fetch(url, cache_dir=tmp_path, quiet=True).read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/ijepa/w.pth.tar", f"bytes={have}-")
    assert not part.exists()


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    url = server.url("/ijepa/w.pth.tar")
    server.range_support = False
    server.cut_after["/ijepa/w.pth.tar"] = 1_000_000
    with pytest.raises(DownloadError):
        fetch(url, cache_dir=tmp_path, quiet=True)
    assert fetch(url, cache_dir=tmp_path, quiet=True).read_bytes() == PAYLOAD


def test_corrupt_copy_from_the_server_never_gets_the_final_name(server, tmp_path):
    url = server.url("/ijepa/w.pth.tar")
    server.corrupt["/ijepa/w.pth.tar"] = True
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch(url, cache_dir=tmp_path, sha256=SHA, quiet=True)
    assert list(tmp_path.iterdir()) == []  # no final name, no partial, no lock
    server.corrupt.clear()
    assert fetch(url, cache_dir=tmp_path, sha256=SHA, quiet=True).read_bytes() == PAYLOAD


def test_cached_file_corrupted_on_disk_is_fetched_again(server, tmp_path):
    url = server.url("/ijepa/w.pth.tar")
    path = fetch(url, cache_dir=tmp_path, quiet=True)  # pins SHA
    path.write_bytes(b"x" + PAYLOAD[1:])
    assert fetch(url, cache_dir=tmp_path, quiet=True).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_checksum_mismatch_against_the_pinned_sha_is_refused(server, tmp_path):
    url = server.url("/ijepa/w.pth.tar")
    fetch(url, cache_dir=tmp_path, quiet=True)  # pins SHA
    changed = bytes(reversed(PAYLOAD))
    server.files["/ijepa/w.pth.tar"] = changed
    cache_path(url, tmp_path).unlink()
    with pytest.raises(DownloadError, match="pinned by the first download"):
        fetch(url, cache_dir=tmp_path, quiet=True)
    assert not cache_path(url, tmp_path).exists()
    # A user-given digest (as a sha256sum file) wins over the pin.
    sums = tmp_path.parent / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  other.bin\n{hashlib.sha256(changed).hexdigest()}  w.pth.tar\n")
    assert fetch(url, cache_dir=tmp_path, sha256=str(sums), quiet=True).read_bytes() == changed


def test_a_mistyped_sha256_keeps_a_good_cached_file(server, tmp_path, capsys):
    url = server.url("/ijepa/w.pth.tar")
    path = fetch(url, cache_dir=tmp_path, quiet=True)  # pins SHA
    typo = SHA[:-1] + ("0" if SHA[-1] != "0" else "1")
    assert download_command.main([url, "--cache-dir", str(tmp_path), "--sha256", typo, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: sha256 mismatch") and typo in err, err
    assert "check the sha256 you gave" in err
    assert path.read_bytes() == PAYLOAD and len(server.requests) == 1  # kept, and nothing downloaded
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.name + ".json"])
    assert download_command.main([url, "--cache-dir", str(tmp_path), "--sha256", SHA, "--quiet"]) == 0
    assert len(server.requests) == 1


def test_registry_names_resolve_through_a_mirror(server, tmp_path, monkeypatch, capsys):
    release = find_release("facebook/ijepa_vith14_1k")
    assert release is find_release("vit_huge_14_224_in1k") and release.evaluated == "target_encoder"
    server.files[f"/ijepa/{release.file}"] = PAYLOAD
    monkeypatch.setenv(registry.MIRROR_ENV_VAR, server.url("/ijepa"))
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    assert download_command.main(["ijepa_vith14_1k"]) == 0
    out, err = capsys.readouterr()
    assert open(out.strip(), "rb").read() == PAYLOAD
    assert "MB/s" in err and "100%" in err  # the progress line
    assert download_command.main(["--list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["name", "arch"] and len(table) == 5
    assert download_command.main(["not-a-model"]) == 2
    assert "download --list" in capsys.readouterr().err


def test_offline_url_is_one_line_about_the_network(tmp_path, capsys):
    assert download_command.main(["https://nonexistent.invalid/x.pth.tar", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no network or DNS" in err
    assert list(tmp_path.iterdir()) == []  # no lock file left behind
    with pytest.raises(DownloadError, match="no network or DNS"):
        load_checkpoint("https://nonexistent.invalid/x.pth.tar", cache_dir=tmp_path)


def test_load_checkpoint_from_the_server(server, tmp_path):
    import io

    buf = io.BytesIO()
    torch.save({"encoder": {"w": torch.arange(3.0)}, "epoch": 2}, buf)
    server.files["/ijepa/c.pth.tar"] = buf.getvalue()
    state = load_checkpoint(server.url("/ijepa/c.pth.tar"), cache_dir=tmp_path)
    assert state["epoch"] == 2 and state["encoder"]["w"].tolist() == [0.0, 1.0, 2.0]


def test_two_processes_fetching_at_once_download_once(server, tmp_path):
    import threading

    url = server.url("/ijepa/w.pth.tar")
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(url, cache_dir=tmp_path, quiet=True)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and results[0].read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_eval_checkpoint_accepts_a_registry_name(server, tmp_path, monkeypatch):
    from ijepa_scale.evaluation.evaluate import resolve_checkpoint

    release = find_release("ijepa_vitg16_22k")
    server.files[f"/ijepa/{release.file}"] = PAYLOAD
    monkeypatch.setenv(registry.MIRROR_ENV_VAR, server.url("/ijepa"))
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    path = resolve_checkpoint("ijepa_vitg16_22k")
    assert path.parent == tmp_path and path.read_bytes() == PAYLOAD
