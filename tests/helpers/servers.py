"""Storage servers on loopback for the remote-shard tests: plain HTTP, a faulty HTTP server, moto's S3."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path


from ijepa_scale.procutil import STOP_SIGNALS


@contextlib.contextmanager
def _signals_blocked():
    """Threads started here inherit the stop signals blocked: a signal a test sends to its own
    process must reach the main thread's handler, not a server thread."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def http_server(folder: Path):
    """Serves `folder` at the yielded base URL (python's http.server, one thread per request)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    with _signals_blocked():
        thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


_SERVE_UNTIL = """
import functools, http.server, os, sys, threading
folder, port, down_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lock, served = threading.Lock(), [0]
class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        super().do_GET()
        if self.path.endswith(".tar"):
            with lock:
                served[0] += 1
                if served[0] == down_after:
                    self.wfile.flush()
                    os._exit(0)
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=folder))
print("ready", flush=True)
server.serve_forever()
"""


class OutageServer:
    """Serves `folder` over HTTP at `url` from a separate process, like `python -m http.server`, and can
    go away: with `down_after=n` the process exits right after answering its n-th GET of a .tar file
    (connections to the port are then refused), and a new one opens the same port `down_s` seconds later
    (never for None). `outages` lists [went down, came back or None] in time.monotonic() seconds.

    A separate process, because a server in the test process would live on in forked data-loader
    workers, which inherit its listening socket: the port would never close."""

    def __init__(self, folder: Path, down_after: int = 0, down_s: float | None = None):
        self.folder = str(folder)
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.outages: list[list] = []
        self.closed = False
        self.process = self._start(down_after)
        with _signals_blocked():
            threading.Thread(target=self._watch, args=(down_s,), daemon=True).start()

    def _start(self, down_after: int) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", _SERVE_UNTIL, self.folder, str(self.port), str(down_after)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        return process

    def _watch(self, down_s: float | None) -> None:
        self.process.wait()
        if self.closed:
            return
        self.outages.append([time.monotonic(), None])
        if down_s is not None:
            time.sleep(down_s)
            if not self.closed:
                self.process = self._start(0)
                self.outages[-1][1] = time.monotonic()

    def close(self) -> None:
        self.closed = True
        self.process.kill()
        self.process.wait()


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultyServer:
    """Serves `folder` under /<mode>/<file>, misbehaving per mode:

    - `drop-once`: the first request for a file sends half the body, then cuts the connection;
    - `500-once`: the first request for a file answers 500;
    - `404-once`: the first GET of a file answers 404 (a server restarting), its HEAD 200;
    - `drop-always`, `500-always`: every request;
    - `stall`: sends half the body, then stops sending (until the server is closed);
    - `ok`: serves normally.
    `requests[(mode, name)]` counts the GET requests per file.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.requests: Counter = Counter()
        self.released = threading.Event()
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002
                pass

            def do_HEAD(self):
                self._answer(head=True)

            def do_GET(self):
                self._answer(head=False)

            def _answer(self, head):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 2 or not (owner.folder / parts[1]).is_file():
                    self.send_error(404)
                    return
                mode, name = parts
                data = (owner.folder / name).read_bytes()
                with owner.lock:
                    if not head:
                        owner.requests[(mode, name)] += 1
                    count = owner.requests[(mode, name)]
                first = count <= 1
                if not head and (mode == "500-always" or (mode == "500-once" and first)):
                    self.send_error(500, "injected failure")
                    return
                if not head and mode == "404-once" and first:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if head:
                    return
                if mode == "stall":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    owner.released.wait(120)
                    self.close_connection = True
                    return
                if mode == "drop-always" or (mode == "drop-once" and first):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        with _signals_blocked():
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on loopback; yields its endpoint URL with the AWS_* environment set for s3fs."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with _signals_blocked():
        server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still talk to an earlier server
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def upload(folder: Path, url: str) -> None:
    """Copy every file of `folder` to the fsspec URL `url` (a bucket is created if needed)."""
    from ijepa_scale.data.remote import filesystem

    fs, path = filesystem(url)
    bucket = path.split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for file in sorted(Path(folder).iterdir()):
        fs.pipe(f"{path}/{file.name}", file.read_bytes())
    fs.invalidate_cache()
