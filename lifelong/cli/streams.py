"""Stream verbs: stream add / add-defaults / list / show / remove, and ingest.

Each is thin over ``streams.StreamRegistry`` on the store's engine. The committed cursor
of a stream is the one in HEAD's version (``cursors[name]``): pending data is measured
against it, and ``ingest`` stages the data after it without moving it — cursors advance
only when a cycle commits a version.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from expert_store import ExpertStore
from streams import (BadInputError, ChangedFileError, Pending, SourceNotFoundError,
                     SourceUnavailableError, StreamError, StreamExistsError,
                     StreamNotFoundError, StreamRegistry, StreamSpec, register_defaults)
from streams.defaults import DEFAULT_STREAMS
from streams.sources import infer_format
from streams.spec import FORMATS, ON_BAD_ROWS, ON_CHANGED, TEXT_MODES
from streams.split import CHUNK_CHARS, HELDOUT_SPLITS

from ..workspace import defaults_cache_dir, open_registry
from ..config import positive_int
from ..records import no_cycle_running
from .common import add_parser, open_store, print_json, print_table

STAGED_NOTE = "staged; the cursor advances when a cycle commits a version"
HELDOUT_COUNT_CAP = 1 << 24  # `ingest` counts the stream's held-out tokens up to this


class _Registry(StreamRegistry):
    """A registry whose streams are read with per-command option overrides
    (``ingest --on-bad-rows skip``); the stored registration is not changed."""

    def __init__(self, *args: Any, overrides: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.overrides = overrides or {}

    def get(self, name: str) -> StreamSpec:
        spec = super().get(name)
        return dataclasses.replace(spec, **self.overrides) if self.overrides else spec


def _registry(store: ExpertStore, **overrides: Any) -> StreamRegistry:
    return open_registry(store, cls=_Registry, overrides={k: v for k, v in overrides.items() if v is not None})


@contextmanager
def stream_hints(store: str | None = None) -> Iterator[None]:
    """Attach a one-line hint to ``streams`` errors (main.py prints message + hint)."""
    s = f"lifelong --store {store}" if store else "lifelong"
    try:
        yield
    except StreamError as exc:
        if getattr(exc, "hint", None) is None:
            hint = None
            if isinstance(exc, StreamNotFoundError):
                hint = f"`{s} stream list` shows the registered streams"
            elif isinstance(exc, StreamExistsError):
                hint = f"choose another name, or `{s} stream remove NAME` first"
            elif isinstance(exc, BadInputError):
                hint = ("nothing was staged and no cursor moved; fix the input, or pass "
                        "--on-bad-rows skip to skip and count bad rows")
            elif isinstance(exc, ChangedFileError):
                hint = "register the stream with --on-changed reread or skip"
            elif isinstance(exc, SourceNotFoundError):
                hint = ("give an existing file, directory or glob (relative paths are taken from "
                        "here), or --format hub for a hub dataset")
            elif isinstance(exc, SourceUnavailableError):
                hint = "hub datasets need the network or a local datasets cache"
            exc.hint = hint  # type: ignore[attr-defined]
        raise


def _head_cursor(store: ExpertStore, name: str) -> tuple[int | None, dict[str, Any] | None]:
    """HEAD's version id and the cursor it committed for ``name`` (None: the beginning)."""
    head = store.head()
    if head is None:
        return None, None
    return head, store.version(head).cursors.get(name)


def _cursor_summary(head: int | None, cursor: dict[str, Any] | None) -> str:
    where = f"HEAD (v{head})'s cursor" if head is not None else "the beginning (no version yet)"
    if not cursor:
        return f"{where}: nothing of this stream committed yet"
    files = cursor.get("files") or {}
    done = sum(1 for f in files.values() if f.get("done"))
    rows = sum(int(f.get("rows", 0)) for f in files.values()) + int(cursor.get("rows", 0))
    return f"{where}: {rows:,} rows consumed, {done}/{len(files)} files read to the end"


def _pending(reg: StreamRegistry, name: str, cursor: dict[str, Any] | None) -> Pending | None:
    try:
        return reg.pending(name, cursor)
    except (StreamError, OSError):  # a vanished source must not break a listing
        return None


def _num(x: int | None) -> str:
    return "?" if x is None else f"{x:,}"


def _source_str(source: str | list[str]) -> str:
    return source if isinstance(source, str) else ", ".join(source)


def _local(source: str, fmt: str) -> str:
    """Local sources are stored absolute, so later commands work from any directory."""
    return source if fmt == "hub" else os.path.abspath(os.path.expanduser(source))


def _warn(message: str | None) -> None:
    if message:
        print(f"warning: {message}", file=sys.stderr)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


# -- verbs ------------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    store = open_store(args)
    with stream_hints(args.store):
        reg = _registry(store)
        fmt, inferred = args.format, None
        if fmt is None:  # from the extensions of the files
            fmt, inferred = infer_format(args.source, args.pattern)
        sources = [_local(s, fmt) for s in args.source]
        spec = reg.add(args.name, sources[0] if len(sources) == 1 else sources, fmt,
                       text_field=args.text_field, text_mode=args.text_mode,
                       on_bad_rows=args.on_bad_rows, on_changed=args.on_changed,
                       holdout=args.holdout, heldout_split=args.heldout_split,
                       exclude=tuple(args.exclude), pattern=args.pattern,
                       hub_config=args.hub_config, split=args.split)
        head, cursor = _head_cursor(store, spec.name)
        pend = _pending(reg, spec.name, cursor)
        warning = reg.source_warning(spec.name, pend) if pend is not None else None
    chosen = f"format {fmt}: {inferred}; pass --format to choose another" if inferred else None
    if args.json:
        print_json({"spec": spec.to_dict(), "pending": pend.to_dict() if pend else None,
                    "warning": warning, "format_inferred": inferred})
        if chosen:
            print(f"note: {chosen}", file=sys.stderr)
        _warn(warning)
        return 0
    print(f"added stream {spec.name} ({spec.format}) <- {_source_str(spec.to_dict()['source'])}")
    if chosen:
        print(chosen)
    if pend is not None:
        print(f"pending: {pend.files} files, {_num(pend.docs)} docs, ~{_num(pend.tokens)} tokens "
              f"(held out: {spec.holdout:g} of {_held_unit(spec.heldout_split)}s); "
              f"`lifelong ingest {spec.name}` stages them")
    _warn(warning)
    return 0


def _held_unit(how: str) -> str:
    return "doc" if how == "document" else f"~{CHUNK_CHARS}-character chunk"


def cmd_add_defaults(args: argparse.Namespace) -> int:
    store = open_store(args)
    cache_dir = defaults_cache_dir(store)
    with stream_hints(args.store):
        reg = _registry(store)
        specs = register_defaults(reg, cache_dir, names=tuple(args.names))
        rows = []
        for spec in specs:
            _, cursor = _head_cursor(store, spec.name)
            pend = _pending(reg, spec.name, cursor)
            rows.append({"name": spec.name, "format": spec.format, "source": spec.to_dict()["source"],
                         "pending": pend.to_dict() if pend else None})
    if args.json:
        print_json(rows)
        return 0
    print_table(["name", "format", "files", "MB", "docs", "tokens", "source"], [
        (r["name"], r["format"], _num(p and p["files"]), "?" if p is None else f"{p['bytes'] / 1e6:.1f}",
         _num(p and p["docs"]), _num(p and p["tokens"]), _source_str(r["source"]))
        for r in rows for p in [r["pending"]]])
    print(f"registered {len(specs)} default streams (idempotent; sizes are what is pending); "
          f"cache in {cache_dir}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    with stream_hints(args.store):
        reg = _registry(store)
        head = store.head()
        cursors = store.version(head).cursors if head is not None else {}
        out = []
        for spec in reg.list():
            pend = _pending(reg, spec.name, cursors.get(spec.name))
            out.append((spec, pend))
    if args.json:
        print_json([{**spec.to_dict(),
                     "committed_cursor": cursors.get(spec.name),
                     "pending": pend.to_dict() if pend else None} for spec, pend in out])
        return 0
    if not out:
        print(f"no streams; add one with `lifelong --store {args.store} stream add NAME SOURCE` "
              "or `stream add-defaults`")
        return 0
    print_table(["name", "format", "pending docs", "pending tokens", "held out", "source"], [
        (spec.name, spec.format, _num(pend.docs if pend else None),
         _num(pend.tokens if pend else None), f"{spec.holdout:g}",
         _source_str(spec.to_dict()["source"]))
        for spec, pend in out])
    print(f"pending = not yet in HEAD (v{head})'s cursors; token counts are estimates")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    with stream_hints(args.store):
        reg = _registry(store)
        head, cursor = _head_cursor(store, args.name)
        info = reg.info(args.name, cursor)
    staged = [(s, s.from_cursor == cursor) for s in info.staged]
    if args.json:
        data = info.to_dict()
        data.update(head=head, committed_cursor=cursor,
                    staged=[{**s.to_dict(), "from_head_cursor": ok} for s, ok in staged])
        print_json(data)
        return 0
    spec = info.spec
    print(f"stream {spec['name']}  ({spec['format']}), created {str(spec['created_at'])[:19]}")
    print(f"  source       {_source_str(spec['source'])}")
    for key in ("text_field", "text_mode", "on_bad_rows", "on_changed", "holdout", "heldout_split",
                "pattern", "exclude", "hub_config", "split"):
        value = spec.get(key)
        if value not in (None, [], ()):
            print(f"  {key:<12} {value if not isinstance(value, list) else ', '.join(value)}")
    print(f"  cursor       {_cursor_summary(head, cursor)}")
    p = info.pending
    if p is None:
        print("  pending      unknown (the source cannot be listed now)")
    else:
        print(f"  pending      {p.files} files ({p.new_files} new, {len(p.changed_files)} changed), "
              f"{_num(p.bytes)} bytes, {_num(p.docs)} docs, ~{_num(p.tokens)} tokens")
        for path in p.changed_files:
            print(f"               changed since consumed: {path} ({spec['on_changed']})")
    unit = _held_unit(spec["heldout_split"])
    print(f"  held out     {info.heldout_docs:,} {unit}s seen so far (fraction {spec['holdout']:g})")
    if info.heldout_warning:
        print(f"  warning      {info.heldout_warning}")
    if not staged:
        print("  staged       nothing (run `lifelong ingest NAME`)")
    for s, ok in staged:
        sm = s.summary
        print(f"  staged       {sm['train_docs']:,} train + {sm['heldout_docs']:,} held-out docs, "
              f"{sm['train_tokens'] + sm['heldout_tokens']:,} tokens at {s.created_at}"
              + ("" if ok else " (from another cursor: stale)"))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    store = open_store(args)
    # A running cycle reads every stream (its own, replay, held-out evaluation): refused meanwhile.
    with stream_hints(args.store), no_cycle_running(store.engine, f"stream '{args.name}' was not removed; remove it once the cycle has ended"):
        _registry(store).remove(args.name)
    print(f"removed stream {args.name}: its file index, staged data and held-out documents "
          "(source files untouched; committed versions keep their cursors)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    store = open_store(args)
    with stream_hints(args.store):
        reg = _registry(store, on_bad_rows=args.on_bad_rows)
        stored = StreamRegistry.get(reg, args.name)  # the registration, without overrides
        head, cursor = _head_cursor(store, args.name)
        res = reg.stage(args.name, cursor, args.budget)
        newer = _pending(reg, args.name, res.new_cursor) if res.from_staging and res.exhausted else None
        if newer is not None and newer.files:
            # files arrived after that staging: read again (replaces it; nothing counted twice)
            res = reg.ingest(args.name, cursor, args.budget, use_staged=False, stage=True)
        rest = None if res.exhausted else _pending(reg, args.name, res.new_cursor)
        held_docs, held_tokens = reg.heldout_size(args.name, enough_tokens=HELDOUT_COUNT_CAP)
        warning = reg.heldout_warning(args.name)
    status = Counter(f.status for f in res.files)
    if args.json:
        print_json({**res.summary(), "head": head, "bad_examples": res.bad_examples,
                    "files": dict(status), "changed_files": [f.path for f in res.changed_files],
                    "remaining": rest.to_dict() if rest else None, "cursor_committed": False,
                    "stream_heldout": {"docs": held_docs, "tokens": held_tokens},
                    "heldout_warning": warning})
        _warn(warning)
        return 0
    how = "already staged; its files are unchanged and none is new" if res.from_staging else "read now"
    print(f"stream {args.name}, after {_cursor_summary(head, cursor)}")
    print(f"pending for the next cycle ({how}):")
    print(f"  files     {len(res.files)} ({status['new']} new, {status['resumed']} resumed, "
          f"{status['changed']} changed, {status['bad']} bad)")
    for f in res.changed_files:
        print(f"            changed since consumed: {f.path} ({f.action})")
    print(f"  train     {res.train_docs:,} docs, {res.train_token_count:,} tokens")
    unit = _held_unit(stored.heldout_split)
    print(f"  held out  {res.heldout_docs:,} {unit}s, {res.heldout_token_count:,} tokens")
    print(f"            the stream's held-out set so far (what cycles evaluate on): {held_docs:,} "
          f"{unit}s, {held_tokens:,}{'+' if held_tokens >= HELDOUT_COUNT_CAP else ''} tokens")
    bad = ", ".join(f"{k}={v}" for k, v in sorted(res.bad_rows.items())) or "none"
    print(f"  bad rows  {bad}")
    for example in res.bad_examples[:5]:
        print(f"            {example}")
    if not res.exhausted:
        more = f"~{_num(rest.docs)} docs, ~{_num(rest.tokens)} tokens" if rest else "more"
        print(f"  budget    stopped at {args.budget:,} tokens; {more} remain after it")
    if args.on_bad_rows and args.on_bad_rows != stored.on_bad_rows:
        print(f"  note      --on-bad-rows {args.on_bad_rows} applies to this staging only; the "
              f"stream's policy is {stored.on_bad_rows!r}, so a cycle reading it afresh would "
              f"stop at the same rows")
    print(STAGED_NOTE)
    _warn(warning)
    return 0


# -- parsers ----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    group = add_parser(sub, "stream", "register, list, show and remove data streams",
                       "lifelong --store ./store stream list")
    group.set_defaults(func=lambda _args: (group.print_help(), 2)[1])
    verbs = group.add_subparsers(dest="stream_command", metavar="VERB")

    p = add_parser(verbs, "add", "register a data stream (file, drop folder, glob or hub dataset)",
                   "lifelong --store ./store stream add news ./drop/news --format jsonl --text-field body")
    p.add_argument("name", help="1-64 characters from [A-Za-z0-9._-]")
    p.add_argument("source", nargs="+", help="file, directory (drop folder), glob, or hub dataset name")
    p.add_argument("--format", choices=FORMATS,
                   help="default: from the files' extensions (.jsonl/.ndjson, .json, .csv, "
                        ".parquet; anything else is text), said in the output")
    p.add_argument("--text-field", default="text", 
                   help="JSON key / CSV, Parquet or hub column (default: text)")
    p.add_argument("--text-mode", choices=TEXT_MODES, default="line",
                   help="for text: a document is a whole file, a paragraph or a line (default: line)")
    p.add_argument("--on-bad-rows", choices=ON_BAD_ROWS, default="error",
                   help="error: stop naming file and line (default); skip: skip and count")
    p.add_argument("--on-changed", choices=ON_CHANGED, default="reread",
                   help="a consumed file that was rewritten: read again, skip, or error (default: reread)")
    p.add_argument("--holdout", type=_fraction, default=0.05, metavar="FRACTION",
                   help="fraction of documents held out by content hash (default: 0.05)")
    p.add_argument("--heldout-split", choices=HELDOUT_SPLITS, default="document",
                   help=f"hold out whole documents (default) or ~{CHUNK_CHARS}-character chunks of "
                        "every document: for a source of one or a few long documents")
    p.add_argument("--pattern", help="file-name pattern inside a directory (default by format)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out paths matching this (relative to a directory source); repeatable")
    p.add_argument("--hub-config", help="hub dataset configuration")
    p.add_argument("--split", default="train", help="hub dataset split (default: train)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_add)

    p = add_parser(verbs, "add-defaults", "register the embedded default streams (no downloads): "
                   "stdlib source, pydoc topics and docstrings, licences",
                   "lifelong --store ./store stream add-defaults --names pydoc licenses")
    p.add_argument("--names", nargs="+", choices=DEFAULT_STREAMS, default=list(DEFAULT_STREAMS),
                   help="which default streams (default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_add_defaults)

    p = add_parser(verbs, "list", "streams with what is pending against HEAD's cursors",
                   "lifelong --store ./store stream list --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = add_parser(verbs, "show", "one stream: options, committed cursor, pending, held-out, staged",
                   "lifelong --store ./store stream show news")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = add_parser(verbs, "remove", "unregister a stream (source files are never touched)",
                   "lifelong --store ./store stream remove news")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove)

    p = add_parser(sub, "ingest", "read, validate and tokenize a stream's new data and stage it "
                   "for the next cycle (no cursor moves)",
                   "lifelong --store ./store ingest news --budget 2000000")
    p.add_argument("name")
    p.add_argument("--budget", type=positive_int, metavar="TOKENS",
                   help="stop at the first document boundary at or after this many tokens")
    p.add_argument("--on-bad-rows", choices=ON_BAD_ROWS,
                   help="override the stream's policy for this staging (skip: skip and count)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)
