"""``convscope serve DIR``: serve an atlas on http://127.0.0.1:8765 (loopback only)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvscopeError
from ..serve import DEFAULT_PORT, HOST, make_server
from ._common import port_number


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an atlas folder on 127.0.0.1 (loopback only)",
                              description="A static file server for an atlas (or any folder), bound to 127.0.0.1 "
                                          "only. The atlas also opens from disk without it.",
                              epilog="Example: convscope serve runs/atlas-vgg19 --port 8765")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.set_defaults(func=run)


def run(args) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        what = "a file" if directory.exists() else "not found"
        raise ConvscopeError(f"{directory} is {what}; give the folder of a built atlas (the --out of convscope atlas)")
    if not (directory / "index.html").is_file():
        raise ConvscopeError(f"{directory} has no index.html; build an atlas there first: convscope atlas --out {directory}")
    server = make_server(directory, args.port)
    print(f"serving {directory.resolve()} at http://{HOST}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
