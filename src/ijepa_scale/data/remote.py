"""Opening shards on any fsspec storage: backend checks, read timeouts, transient-error retries.

Credentials are never passed here: each backend reads its usual environment and config files
(AWS_* variables and ~/.aws for s3fs, application-default credentials for gcsfs, ...).
"""

from __future__ import annotations

import io
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

import fsspec

from ..errors import RunFailure, UserError
from ..procutil import STOP_SIGNALS

logger = logging.getLogger(__name__)

# The extra of ijepa-scale that installs each protocol's backend.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
LOCAL_PROTOCOLS = ("file", "local")
MAX_BACKOFF_S = 60.0
READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class ReadPolicy:
    timeout_s: float = 60.0
    attempts: int = 5
    backoff_s: float = 1.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, ...)."""
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1))

    @classmethod
    def from_config(cls, data_cfg) -> "ReadPolicy":
        return cls(data_cfg.read_timeout_s, data_cfg.read_attempts, data_cfg.retry_backoff_s)


class ReadTimeout(TimeoutError):
    pass


class DataUnavailable(RunFailure):
    """The storage stayed unreachable through every retry the data settings allow."""


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _storage_options(protocol: str, policy: ReadPolicy) -> dict:
    # The backends' own timeouts end a stalled request in their I/O thread; the watchdog in
    # _TimedRaw bounds the wait whatever the backend does.
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=policy.timeout_s, sock_read=policy.timeout_s)
        return {"client_kwargs": {"timeout": timeout}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": policy.timeout_s, "read_timeout": policy.timeout_s}}
    return {}


def _start_io_thread() -> None:
    """Start fsspec's I/O thread (async backends: http, s3, gcs) with the stop signals blocked, so
    that a signal sent to the process is taken by the main thread's handler, never by this thread
    while the main thread holds it pending (threads inherit the mask of their creator)."""
    import fsspec.asyn

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        fsspec.asyn.get_loop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def filesystem(url: str, policy: Optional[ReadPolicy] = None):
    """(fs, path) for `url`; a missing or unknown backend is a one-line UserError naming the fix."""
    protocol = protocol_of(url)
    if protocol not in LOCAL_PROTOCOLS:
        _start_io_thread()
    try:
        return fsspec.core.url_to_fs(url, **_storage_options(protocol, policy or ReadPolicy()))
    except ImportError as exc:
        extra = EXTRAS.get(protocol)
        fix = (f"pip install 'ijepa-scale[{extra}]'" if extra else
               f"install the fsspec backend for {protocol}:// ({' '.join(str(exc).split())})")
        raise UserError(f"{url}: the {protocol}:// storage backend is not installed; {fix}") from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise UserError(f"{url}: unknown storage protocol {protocol!r} ({exc}); use a local path or an "
                            f"fsspec URL such as s3://, gs://, https://") from None
        raise


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: refused, reset or dropped connections, timeouts, 5xx and 429 answers."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        # fsspec's HTTP backend reports a refused connection as FileNotFoundError(url) from the real error.
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int) and 400 <= status < 600:
        return status >= 500 or status == 429
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    module = type(exc).__module__.split(".")[0]
    if module in ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "google"):
        return True
    if isinstance(exc, OSError):  # s3fs and gcsfs report server and network failures as OSError
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def error_text(exc: BaseException) -> str:
    """The cause of a failed access in a few words: the backend's error, not fsspec's wrapper."""
    while isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__
    refused = isinstance(exc, ConnectionRefusedError) or isinstance(getattr(exc, "os_error", None),
                                                                     ConnectionRefusedError)
    host, port = getattr(exc, "host", None), getattr(exc, "port", None)
    if refused and host:
        return f"connection refused by {host}:{port}"
    status = getattr(exc, "status", None)
    if isinstance(status, int) and getattr(exc, "message", None) is not None:
        return f"HTTP {status} {exc.message}"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    text = " ".join(str(exc).split())[:300] or ("timed out" if isinstance(exc, TimeoutError) else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unavailable(url: str, policy: ReadPolicy, attempts: int, waited_s: float, exc: BaseException,
                fix: str) -> DataUnavailable:
    """The one-line failure for `url` once `attempts` tries over `waited_s` seconds all failed."""
    host = urlsplit(url).netloc if "://" in url else ""
    where = f"{url} (host {host})" if host else url
    return DataUnavailable(
        f"data unavailable: {where}: {error_text(exc)}, {attempts} attempt(s) over {waited_s:.0f} s "
        f"(data.read_attempts={policy.attempts}, data.retry_backoff_s={policy.backoff_s:g}, "
        f"data.read_timeout_s={policy.timeout_s:g}); {fix}")


class _TimedRaw(io.RawIOBase):
    """A remote file whose open and reads run in a helper thread and give up after a timeout.

    A stalled backend call cannot be interrupted; the daemon helper is abandoned to it (the
    backend's own timeout ends it later) and the reader raises ReadTimeout at once.
    """

    def __init__(self, opener: Callable[[], object], url: str, timeout_s: float):
        super().__init__()
        self._url = url
        self._timeout_s = timeout_s
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._stalled = False
        self._file = None
        threading.Thread(target=self._serve, name="shard-reader", daemon=True).start()
        try:
            self._file = self._call(opener)
        except BaseException:
            self.close()
            raise

    def _serve(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # signals are the main thread's business
        while True:
            call = self._requests.get()
            if call is None:
                return
            try:
                self._results.put((True, call()))
            except BaseException as exc:  # handed to the reading thread
                self._results.put((False, exc))

    def _call(self, function):
        self._requests.put(function)
        try:
            ok, value = self._results.get(timeout=self._timeout_s)
        except queue.Empty:
            self._stalled = True
            raise ReadTimeout(f"no data from {self._url} for {self._timeout_s:g} s") from None
        if not ok:
            raise value
        return value

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._call(lambda: self._file.read(len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self._file is not None and not self._stalled:
                try:
                    self._call(self._file.close)
                except Exception:
                    pass
            self._requests.put(None)  # the helper exits after its current call, if it is stuck in one
        super().close()


def open_stream(url: str, policy: ReadPolicy):
    """A sequential binary reader of `url`; remote reads end with ReadTimeout when stalled."""
    fs, path = filesystem(url, policy)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if any(p in LOCAL_PROTOCOLS for p in protocols):
        return fs.open(path, "rb")
    # block_size=0: HTTP streams the body in one request instead of a request per block.
    kwargs = {"block_size": 0} if "http" in protocols or "https" in protocols else {}
    raw = _TimedRaw(lambda: fs.open(path, "rb", **kwargs), url, policy.timeout_s)
    return io.BufferedReader(raw, READ_BUFFER)


def with_retries(url: str, policy: ReadPolicy, what: str, attempt: Callable[[], object], fix: str):
    """Run `attempt()` until it succeeds or fails for a reason other than a transient error, at most
    `policy.attempts` times, waiting with exponential backoff in between; DataUnavailable when every
    attempt failed."""
    started = time.monotonic()
    for failures in range(1, policy.attempts + 1):
        try:
            return attempt()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if failures == policy.attempts:
                raise unavailable(url, policy, failures, time.monotonic() - started, exc, fix) from exc
            delay = policy.delay(failures)
            logger.warning("%s %s failed (%s); retry %d/%d in %.1f s", what, url, error_text(exc), failures,
                           policy.attempts - 1, delay)
            time.sleep(delay)
