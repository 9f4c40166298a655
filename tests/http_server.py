"""A real HTTP server on the loopback address for tests that read data over the network: it serves a directory,
counts requests per path, and can cut chosen files off halfway (the connection drops mid-body)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Served:
    """The running server: ``url(rel)`` of a file under the root, and the request count per path."""

    base: str
    requests: Counter = field(default_factory=Counter)

    def url(self, rel: str | Path) -> str:
        return f"{self.base}/{Path(rel).as_posix()}"


class _Handler(SimpleHTTPRequestHandler):
    served: Served
    truncate: frozenset[str]

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].lstrip("/")
        self.served.requests[path] += 1
        if path not in self.truncate:
            super().do_GET()
            return
        data = (Path(self.directory) / path).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))  # promise all of it, send half
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def http_server(root: str | Path, truncate: tuple[str, ...] = ()) -> Iterator[Served]:
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread; the paths in ``truncate`` (relative to the root)
    are cut off halfway."""
    served = Served("")
    handler = type("Handler", (_Handler,), {"served": served, "truncate": frozenset(truncate)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    served.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
