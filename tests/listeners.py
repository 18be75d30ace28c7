"""Real sockets for the SSRF tests: a listener that only counts who connects, and a small HTTP
server that serves a directory and answers chosen paths with redirects."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Victim:
    """A TCP listener on every loopback address (IPv4 and IPv6, one port) that accepts, counts
    and closes: what an adapter source must never reach."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.connections.append(peer[0])
            conn.close()

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def victim() -> Iterator[Victim]:
    listener = Victim()
    try:
        yield listener
    finally:
        listener.close()


class _Handler(SimpleHTTPRequestHandler):
    redirects: dict[str, str] = {}
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_server(
    root: Path, host: str = "127.0.0.2", redirects: dict[str, str] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` at ``host`` (a loopback alias: the tests list it as a private network the
    policy allows); yields the base URL and the paths requested so far."""
    seen: list[str] = []
    redirects = redirects if redirects is not None else {}  # the caller may add to it later
    handler = type("Handler", (_Handler,), {"redirects": redirects, "seen": seen})
    server = ThreadingHTTPServer((host, 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
