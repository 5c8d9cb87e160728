"""Helpers shared by the CLI verb modules: opening the store, tables, JSON output."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

from expert_store import ExpertStore

from ..errors import CLIError
from .main import STORE_ENV

__all__ = ["add_parser", "open_store", "print_table", "print_json", "missing", "fmt", "NO_HELDOUT"]

NO_HELDOUT = " (no held-out text)"


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, example: str, **kw: Any) -> argparse.ArgumentParser:
    """A sub-command whose --help ends with an example."""
    return sub.add_parser(
        name,
        help=help,
        description=help[:1].upper() + help[1:] + ".",
        epilog=f"Example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )


def open_store(args: argparse.Namespace, *, read_only: bool = False) -> ExpertStore:
    if not args.store:
        raise CLIError("no store given", hint=f"pass --store PATH before the command, or set ${STORE_ENV}")
    return ExpertStore.open(args.store, url=getattr(args, "url", None), read_only=read_only)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str, sort_keys=False))


def missing(x: Any) -> bool:
    """None, NaN or infinite: a metric that was not (or could not be) measured."""
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt(x: Any, spec: str = ".3f") -> str:
    """``x`` formatted, or ``-`` when missing (never ``nan``)."""
    return "-" if missing(x) else format(x, spec)
