"""One small HTTP server for the tests' fake services (a Prometheus API, a webhook receiver):
on 127.0.0.1 and a free port, in a thread of its own, over TLS when given a context.

    url, stop = httpfake.start(Handler)      # Handler: a httpfake.QuietHandler subclass
    try: ... finally: stop()
"""

from __future__ import annotations

import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers in one call."""

    def reply(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    """A client that gave up (a test of a timeout) is no error to print: printed from the
    server's thread, it would land in whichever test's stderr runs then."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def start(handler: type[BaseHTTPRequestHandler],
          tls: ssl.SSLContext | None = None) -> tuple[str, Callable[[], None]]:
    """The server's URL (http:// or https://127.0.0.1:PORT) and the function that stops it."""
    server = _Server(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", stop
