"""Serve a folder (an atlas) over HTTP on the loopback interface only.

The atlas also opens straight from disk (``file://``); serving it is for browsers or setups
that prefer http. The server binds 127.0.0.1 and nothing else: an atlas shows a model and the
user's photos, which are not for the network.
"""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import ConvscopeError

__all__ = ["make_server", "serve", "start_server", "DEFAULT_PORT", "HOST"]

HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files; no request log on stderr, no caching (a rebuilt atlas shows at once)."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()


def make_server(directory: str | Path, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """A server for ``directory`` bound to ``127.0.0.1:port`` (``port=0``: any free one), not yet serving."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConvscopeError(f"cannot serve {directory}: not a folder")
    handler = functools.partial(_QuietHandler, directory=str(directory.resolve()))
    try:
        server = ThreadingHTTPServer((HOST, port), handler)
    except OSError as err:
        raise ConvscopeError(f"cannot listen on {HOST}:{port} ({err.strerror}); choose another --port") from None
    server.daemon_threads = True
    return server


def start_server(directory: str | Path, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """Serve ``directory`` on ``127.0.0.1:port`` from a daemon thread; ``server.shutdown()`` stops it.

    Example:
        >>> server = start_server("runs/atlas", port=0)
        >>> url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    """
    server = make_server(directory, port)
    threading.Thread(target=server.serve_forever, name="convscope-serve", daemon=True).start()
    return server


def serve(directory: str | Path, port: int = DEFAULT_PORT) -> None:
    """Serve ``directory`` on ``127.0.0.1:port`` in this thread until interrupted (Ctrl-C)."""
    server = make_server(directory, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
