"""The `lifelong` command: a thin dispatcher over one module per verb group.

Each verb-group module exposes ``register(subparsers)`` which adds its sub-commands and
sets ``func`` (called with the parsed namespace, returns an exit code) on each of them.
Exit codes: 0 ok, 1 failure, 2 usage. Errors raised on purpose (the three packages' error
bases, an ``OSError``: a missing or unreadable file, a path under a file) print one line
plus a hint (line breaks and bytes that are not UTF-8 escaped); anything else is a bug and
keeps its traceback (and ``--debug`` shows it for these too). An argument that is not
UTF-8 is a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sqlalchemy.exc import OperationalError

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


# OSError: a path that is missing, unreadable, not a directory, on a full or read-only disk
USER_ERRORS = (LifelongError, StoreError, StreamError, OSError)


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


def _printable(text: str) -> str:
    """``text`` safe for a one-line message: line breaks escaped, and the lone surrogates
    that stand for bytes that are not UTF-8 (in file names, arguments) as ``\\udcXX``."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_utf8(argv: list[str]) -> str | None:
    """The first argument holding bytes that are not UTF-8 (Python decodes them to lone
    surrogates, which neither the database nor UTF-8 output can take)."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    bad = _not_utf8(argv)
    if bad is not None:
        print(f"lifelong: error: argument {bad!r} is not valid UTF-8; names, paths and "
              "values must be UTF-8 text", file=sys.stderr)
        return 2
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
        print(f"error: {_printable(str(exc))}", file=sys.stderr)
        hint = getattr(exc, "hint", None)
        if hint:
            print(f"hint: {_printable(str(hint))}", file=sys.stderr)
        return 1
    except OperationalError as exc:  # a database write the disk refused, where no package said it in its words
        line = _database_failure(exc)
        if line is None or args.debug:
            raise
        print(f"error: {_printable(line)}", file=sys.stderr)
        return 1


def _database_failure(exc: OperationalError) -> str | None:
    """One line for a database error that is the disk's (full, I/O error, read-only), not a bug."""
    text = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
    low = text.lower()
    for needle, words in (("disk is full", "disk full"), ("no space left", "disk full"), ("i/o error", "I/O error"),
                          ("readonly", "read-only database"), ("read-only", "read-only database")):
        if needle in low:
            return f"{words} while writing the store database ({text})"
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
