"""A local HTTP server for a folder, from the standard library, that answers byte-range requests (fsspec's HTTP files
read by range; ``http.server.SimpleHTTPRequestHandler`` alone always sends whole files). Used by the HTTP row of
``benchmarks/extract.py`` (:func:`serve_process`: a server process of its own, as a remote server would be, not a
thread competing with the extraction for the interpreter) and by tests/test_remote.py (:func:`serve`, a thread).

Example:
    >>> import tempfile, urllib.request
    >>> root = tempfile.mkdtemp()
    >>> with open(f"{root}/a.bin", "wb") as handle:
    ...     _ = handle.write(b"0123456789")
    >>> with serve(root) as server:
    ...     request = urllib.request.Request(f"{server.url}/a.bin", headers={"Range": "bytes=2-4"})
    ...     with urllib.request.urlopen(request) as response:
    ...         response.status, response.read(), server.log[-1]
    (206, b'234', ('GET', '/a.bin', 'bytes=2-4'))
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RangeRequestHandler", "serve", "serve_process"]


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` with ``Range: bytes=START-END`` answered by 206 and the bytes asked for, on
    persistent HTTP/1.1 connections; every request is appended to ``server.log`` as ``(method, path, range)``."""

    protocol_version = "HTTP/1.1"

    def send_head(self):
        self.server.log.append((self.command, self.path, self.headers.get("Range")))
        path = self.translate_path(self.path)
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if wanted is None or not os.path.isfile(path):
            return super().send_head()
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            first, last = wanted.groups()
            start = int(first) if first else max(size - int(last), 0)
            end = min(int(last), size - 1) if first and last else size - 1
            if start >= size:
                self.send_error(416, "range not satisfiable")
                return None
            handle.seek(start)
            body = handle.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def end_headers(self):
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def log_message(self, format, *args):  # quiet: the requests are in server.log
        pass


@contextlib.contextmanager
def serve(root: str | os.PathLike) -> Iterator[http.server.ThreadingHTTPServer]:
    """Serve the folder ``root`` on a free port of 127.0.0.1 in a thread while the block runs; the server has
    ``url`` (``http://127.0.0.1:PORT``) and ``log`` (the requests)."""
    handler = functools.partial(RangeRequestHandler, directory=os.fspath(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.url, server.log = f"http://127.0.0.1:{server.server_address[1]}", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _FileLog:
    """A request log kept as lines of a file, so that another process can count them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, request: tuple) -> None:
        with self.path.open("a") as handle:
            handle.write(f"{request}\n")

    def __len__(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path.exists() else 0


@contextlib.contextmanager
def serve_process(root: str | os.PathLike) -> Iterator[object]:
    """Serve the folder ``root`` from a process of its own on a free port of 127.0.0.1 while the block runs; the
    object given has ``url`` and ``log`` (``len(log)``: the requests so far)."""
    log = Path(tempfile.mkdtemp()) / "requests.log"
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.range_server", os.fspath(root), str(log)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        url = server.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the range server did not start (it said {url!r})")
        yield type("Served", (), {"url": url, "log": _FileLog(log)})()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str]) -> None:
    """``python -m benchmarks.range_server ROOT LOG``: serve ``ROOT``, print the URL, log requests to ``LOG``."""
    root, log = argv
    handler = functools.partial(RangeRequestHandler, directory=root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.log = _FileLog(log)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
