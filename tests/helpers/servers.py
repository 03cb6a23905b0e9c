"""Storage servers on loopback for the remote-shard tests: plain HTTP, a faulty HTTP server, moto's S3."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import threading
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


class FaultyServer:
    """Serves `folder` under /<mode>/<file>, misbehaving per mode:

    - `drop-once`: the first request for a file sends half the body, then cuts the connection;
    - `500-once`: the first request for a file answers 500;
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
