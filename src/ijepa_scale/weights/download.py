"""A verified, resumable download cache for checkpoints (registry names, URLs).

Cache layout (``$IJEPA_SCALE_CACHE``, else ``~/.cache/ijepa_scale``), per URL:
- ``{tag}-{name}``: the complete, verified file (``tag`` = a hash of the URL);
- ``{tag}-{name}.part``: an unfinished download, continued with an HTTP Range request;
- ``.{tag}-{name}.lock``: exists while one process fetches or verifies the file;
- ``{tag}-{name}.json``: URL, size and sha256. No checksums are published upstream, so the first
  complete download pins them (unless the user pinned one); every later use re-hashes the file
  and a mismatch is fetched again, never used.
A file only gets its final name after it is complete and verified.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from ..errors import UserError, one_line
from ..fileutil import atomic_write
from .registry import is_url, resolve_source

CACHE_ENV_VAR = "IJEPA_SCALE_CACHE"
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ijepa_scale"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(url: str, cache_dir: Path) -> Path:
    # The URL hash keeps equally named files from different hosts or folders apart.
    name = os.path.basename(url.rstrip("/").split("?", 1)[0]) or "checkpoint"
    tag = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir / f"{tag}-{name}"


def _is_hex64(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def expected_sha256(value: Optional[str], url: str) -> Optional[str]:
    """`value` is a hex digest or a file in `sha256sum` format (the line naming the URL's file wins)."""
    if not value:
        return None
    text = value.strip().lower()
    if _is_hex64(text):
        return text
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"--sha256 {value!r} is neither 64 hex digits nor a checksum file; pass the sha256 "
                        f"hex digest or a file of 'HEX  NAME' lines")
    name = os.path.basename(url.split("?", 1)[0])
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    digests = [parts[0].lower() for parts in lines if parts and (len(parts) == 1 or parts[-1].lstrip("*") == name)]
    if len(digests) != 1 or not _is_hex64(digests[0]):
        raise UserError(f"--sha256 file {path}: found no single sha256 for {name}; write a line 'HEX  {name}'")
    return digests[0]


class Progress:
    """A stderr line with bytes done, rate and ETA."""

    def __init__(self, label: str, total: Optional[int], start_at: int = 0, stream=None):
        self.label, self.total, self.done = label, total, start_at
        self.base, self.began, self.shown = start_at, time.monotonic(), 0.0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shown = self.began  # a log file gets a line every 10 s, a terminal a redraw every 0.5 s

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown >= (0.5 if self.tty else 10.0):
            self.shown = now
            self._draw(now, end="\r" if self.tty else "\n")

    def _draw(self, now: float, end: str = "\r") -> None:
        elapsed = max(now - self.began, 1e-6)
        rate = (self.done - self.base) / elapsed
        mb = self.done / 2**20
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = f"ETA {format_seconds(left)}" if left != float("inf") else "ETA ?"
            text = f"{self.label}: {mb:.1f}/{self.total / 2**20:.1f} MB ({100 * self.done / self.total:.0f}%) "
            text += f"{rate / 2**20:.1f} MB/s {eta}"
        else:
            text = f"{self.label}: {mb:.1f} MB {rate / 2**20:.1f} MB/s"
        print(text, end=end, file=self.stream, flush=True)

    def close(self) -> None:
        self._draw(time.monotonic(), end="\n")


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class DownloadError(UserError):
    """The file could not be fetched or did not verify; the message says why in one line."""


def _network_error(url: str, exc: BaseException) -> DownloadError:
    reason = getattr(exc, "reason", exc)
    host = urllib.request.urlparse(url).hostname
    if isinstance(reason, socket.gaierror):
        why = f"cannot resolve host {host!r} (no network or DNS failure: {reason.strerror or reason})"
    elif isinstance(reason, (ConnectionRefusedError, ConnectionResetError)):
        why = f"connection to {host!r} refused or reset ({reason})"
    elif isinstance(reason, (socket.timeout, TimeoutError)):
        why = f"connection to {host!r} timed out"
    else:
        why = f"cannot reach {host!r} ({one_line(reason) if isinstance(reason, BaseException) else reason})"
    return DownloadError(f"cannot download {url}: {why}; check the network, or put the file in place and pass "
                         f"its local path")


def _copy_synced(src, out, progress) -> None:
    """Stream `src` into the open file `out` in chunks, counting progress, and fsync it."""
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        out.write(chunk)
        if progress:
            progress.update(len(chunk))
    out.flush()
    os.fsync(out.fileno())


def _http_download(url: str, part: Path, label: str, quiet: bool, timeout: float) -> None:
    """Append the rest of `url` to `part` (a Range request when `part` has bytes already)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ijepa-scale"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part already holds the whole file
            return
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _network_error(url, exc) from None
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        progress = None if quiet else Progress(label, total, start_at=have)
        try:
            with open(part, "ab" if have else "wb") as out:
                _copy_synced(response, out, progress)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise DownloadError(f"download of {url} was interrupted ({one_line(exc)}); run the same command "
                                f"again to resume from {part.stat().st_size} bytes") from None
        finally:
            if progress:
                progress.close()
    if total is not None and part.stat().st_size != total:
        raise DownloadError(f"download of {url} ended early ({part.stat().st_size} of {total} bytes); run the "
                            f"same command again to resume")


def _fsspec_download(url: str, part: Path, label: str, quiet: bool) -> None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        total = fs.size(path)
    except Exception:
        total = None
    progress = None if quiet else Progress(label, total)
    try:
        with fsspec.open(url, "rb") as src, open(part, "wb") as out:
            _copy_synced(src, out, progress)
    except FileNotFoundError:
        raise DownloadError(f"cannot download {url}: no such file") from None
    finally:
        if progress:
            progress.close()


def read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def fetch(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None, sha256: Optional[str] = None,
          *, quiet: bool = False, timeout: float = 60.0) -> Path:
    """A local path for `source` (registry name, URL or path), downloading URLs into the cache.

    Local paths are used in place (a sha256 mismatch raises, nothing is deleted). A cached file is
    re-hashed on every use against the pinned sha256 (given, or recorded by its first download): a
    copy that is damaged (matching neither) is fetched again, while a given sha256 that a copy matching
    its recorded one does not match is an error and the copy is kept. With a filled, verified cache no
    network call is made.
    """
    source_str = resolve_source(os.fspath(source))
    expected = expected_sha256(sha256, source_str)
    if not is_url(source_str):
        path = Path(source_str).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path} (not a file, and not a registry name: "
                                    f"`ijepa-scale download --list` shows those)")
        if expected is not None and path.is_file():
            actual = sha256_of(path)
            if actual != expected:
                raise DownloadError(f"sha256 mismatch for {path}: expected {expected}, actual {actual}")
        return path

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache_path(source_str, cache)
    meta_path = dest.with_name(dest.name + ".json")
    part = dest.with_name(dest.name + ".part")
    # Two processes fetching the same URL (two jobs, or ranks of a node without init ordering)
    # take turns; the second finds the verified file and downloads nothing.
    with _locked(dest.with_name(f".{dest.name}.lock")):
        recorded = read_meta(meta_path).get("sha256")  # read under the lock: another process may have pinned it
        pinned = expected or recorded
        if dest.is_file():
            actual = sha256_of(dest)
            if pinned is None or actual == pinned:
                if pinned is None:
                    _write_meta(meta_path, source_str, dest.stat().st_size, actual)
                return dest
            if actual == recorded:
                # The cached file still matches its own pin, so the given sha256 is the odd one out: the
                # cache is kept and nothing is downloaded.
                raise DownloadError(f"sha256 mismatch for {source_str}: you gave {expected}, but the cached {dest} "
                                    f"verifies against the sha256 pinned by its first download ({recorded}); check "
                                    f"the sha256 you gave, or if the file changed upstream on purpose, delete {dest} "
                                    f"and {meta_path.name}")
            print(f"warning: cached {dest} fails its sha256 check (pinned {pinned}, found {actual}); downloading "
                  f"it again", file=sys.stderr)
        elif expected and recorded and recorded != expected:
            print(f"note: the sha256 you gave differs from the one pinned for {dest.name}; using yours",
                  file=sys.stderr)

        label = os.path.basename(dest.name.split("-", 1)[-1])
        if source_str.startswith(("http://", "https://")):
            _http_download(source_str, part, label, quiet, timeout)
        else:
            _fsspec_download(source_str, part, label, quiet)
        actual = sha256_of(part)
        if pinned is not None and actual != pinned:
            part.unlink()
            if expected:
                fix = "check the sha256 you gave (sha256= / --sha256)"
            else:
                fix = (f"it differs from the sha256 pinned by the first download; run again to retry, or if the file "
                       f"changed upstream on purpose, delete {meta_path}")
            raise DownloadError(f"sha256 mismatch for {source_str}: expected {pinned}, got {actual}; the download was "
                                f"deleted; {fix}")
        os.replace(part, dest)  # also replaces a cached copy that failed its check, only now that this one passed
        _write_meta(meta_path, source_str, dest.stat().st_size, actual)
        return dest


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on `path`, created for the purpose and removed on the way out.

    The holder removes the file while still locking it, so a waiter may end up locking a removed
    file: it checks that the path still names what it locked, and otherwise tries again.
    """
    while True:
        try:
            handle = open(path, "a")
        except OSError:  # a read-only shared cache: nothing can be written there anyway
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.stat(path), os.fstat(handle.fileno())):
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()  # closing releases the lock


def _write_meta(path: Path, url: str, size: int, digest: str) -> None:
    text = json.dumps({"url": url, "size": size, "sha256": digest, "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                      indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))
