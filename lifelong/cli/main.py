"""The `lifelong` command: a thin dispatcher over one module per verb group.

Each verb-group module exposes ``register(subparsers)`` which adds its sub-commands and
sets ``func`` (called with the parsed namespace, returns an exit code) on each of them.
Exit codes: 0 ok, 1 failure, 2 usage. Errors raised on purpose (the three packages' error
bases, a missing or unreadable file) print one line plus a hint; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from expert_store import StoreError
from streams import StreamError

from ..errors import LifelongError

# Verb-group modules, in the order they appear in `lifelong --help`.
MODULES = [
    "lifelong.cli.store",
    "lifelong.cli.streams",
    "lifelong.cli.cycles",
    "lifelong.cli.schedule",
    "lifelong.cli.audit",
    "lifelong.cli.generate",
    "lifelong.cli.demo",
]

STORE_ENV = "LIFELONG_STORE"
URL_ENV = "LIFELONG_URL"


USER_ERRORS = (LifelongError, StoreError, StreamError, FileNotFoundError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lifelong",
        description="Continually train a PEER language model with a versioned expert store.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  lifelong demo --quick\n  lifelong --store ./store versions",
    )
    parser.add_argument(
        "--store",
        default=os.environ.get(STORE_ENV),
        help=f"path of the expert store (default: ${STORE_ENV})",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV),
        help="SQLAlchemy URL of the store's database when it is not the SQLite file in the store, e.g. "
             f"postgresql+psycopg://user@host:5432/db (default: ${URL_ENV}; see docs/scale.md)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given: `--nproc N` reruns it under torchrun
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        hint = getattr(exc, "hint", None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
