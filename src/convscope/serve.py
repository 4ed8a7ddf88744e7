"""Serve a folder (an atlas) over HTTP on the loopback interface only.

The atlas also opens straight from disk (``file://``); serving it is for browsers or setups
that prefer http. The server binds 127.0.0.1 and nothing else: an atlas shows a model and the
user's photos, which are not for the network. It answers only requests addressed to
127.0.0.1 or localhost (against DNS rebinding), lists no folders, keeps to the served folder
even through symbolic links, and sends headers that confine the pages to their own files.
"""

from __future__ import annotations

import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import ConvscopeError

__all__ = ["make_server", "serve", "start_server", "DEFAULT_PORT", "HOST"]

HOST = "127.0.0.1"
DEFAULT_PORT = 8765


# A static, self-contained site: its own scripts, styles and images only, never framed, nothing
# sent elsewhere. Inline style attributes stay allowed (the atlas positions receptive-field
# boxes with them); style elements and scripts must be files of the site.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "style-src-elem 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # a rebuilt atlas shows at once
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


class _AtlasHandler(SimpleHTTPRequestHandler):
    """Static files of one folder, for a browser on this machine only.

    A request must name this server in its ``Host`` header (``127.0.0.1`` or ``localhost``,
    with this port if any): a page elsewhere that rebinds its own DNS name to 127.0.0.1 sends
    its own name and gets 403, so it cannot read the user's photos. No directory listings;
    no file reached through a symbolic link that leads out of the folder. No request log.
    """

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def end_headers(self):
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        name, sep, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not sep:
            name, port = host, ""
        return name in LOOPBACK_NAMES and (not port or port == str(self.server.server_address[1]))

    def _refuse(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_head(self):
        if not self._host_ok():
            self._refuse(403)
            return None
        path = self.translate_path(self.path)
        root = os.path.realpath(self.directory)
        real = os.path.realpath(path)
        if real != root and not real.startswith(root + os.sep):
            self._refuse(404)
            return None
        return super().send_head()

    def list_directory(self, path):
        self._refuse(404)
        return None


def make_server(directory: str | Path, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """A server for ``directory`` bound to ``127.0.0.1:port`` (``port=0``: any free one), not yet serving."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConvscopeError(f"cannot serve {directory}: not a folder")
    handler = functools.partial(_AtlasHandler, directory=str(directory.resolve()))
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
