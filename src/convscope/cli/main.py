"""The ``convscope`` command: a thin layer over the Python API.

Each subcommand lives in its own module under ``convscope.cli`` and exposes
``register(subparsers)``; it adds its parser and sets ``func(args) -> int``. A user error
(:class:`ConvscopeError`) prints one line and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import ConvscopeError

# Subcommand modules, in the order `convscope --help` lists them.
COMMANDS = ("predict", "models", "layers", "activations", "features", "deconv", "scan", "occlusion", "probe", "profile", "atlas",
            "serve", "demo")


class UsageError(Exception):
    """A command line argparse refused; carries its message."""


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error line (``convscope: error: ...``) instead of usage text and exit."""

    def error(self, message: str):
        command = self.prog.removeprefix("convscope").strip()
        raise UsageError(f"{message} (see: convscope {command + ' ' if command else ''}--help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="convscope",
        description="Open a CNN layer by layer and see what each layer and filter responds to.",
        epilog="Example: convscope activations photo.jpg --model vgg19 --layers block1_conv2 --out runs/photo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"convscope.cli.{name}").register(subparsers)
    return parser


def _say(text: str) -> None:
    # A progress bar may own the terminal's current line: start the message on a clean one.
    start = "\r\x1b[K" if sys.stderr.isatty() else ""
    print(f"{start}convscope: {text}", file=sys.stderr)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line for a CLI user, without the library's source line."""
    _say(f"warning: {message}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        try:
            args = parser.parse_args(argv)
            return int(args.func(args) or 0)
        except (ConvscopeError, UsageError) as err:
            _say(f"error: {err}")
            return 2
        except KeyboardInterrupt:
            _say("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
