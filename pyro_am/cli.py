"""The ``pyro-am`` command.

Each subcommand lives in its own module under :mod:`pyro_am.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` to a function that takes the
parsed arguments and returns an exit status. This module only composes them and turns bad input into
one line on standard error with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pyro_am import __version__

COMMAND_MODULES = (
    "pyro_am.commands.retrieve",
    "pyro_am.commands.fit",
    "pyro_am.commands.bench",
    "pyro_am.commands.capacity",
    "pyro_am.commands.icl",
)

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input from the command line: reported as one line, with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-am",
        description="Associative memories as Pyro probabilistic programs.",
    )
    parser.add_argument("--version", action="version", version=f"pyro-am {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (repeat for debug output)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ValueError, TypeError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"pyro-am {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"pyro-am {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
