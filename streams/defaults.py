"""Embedded default streams: real text that exists wherever Python runs, no downloads.

- ``stdlib``:   the standard library's ``.py`` sources (code), read in place.
- ``pydoc``:    Python's documentation topics (``pydoc_data.topics``) and the docstrings
                of stdlib modules, classes and functions (found with ``ast``: nothing is
                imported), materialised as JSONL under ``cache_dir/pydoc``.
- ``licenses``: licence texts of installed distributions (LICENSE*/LICENCE*/COPYING* in
                their metadata), copied under ``cache_dir/licenses`` — a drop folder: a
                newly installed package is new data.
Materialised files are written atomically and only when their content changes.
"""
from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import write_if_changed

STDLIB_EXCLUDE = ("site-packages/*", "dist-packages/*", "test/*", "tests/*", "*/test/*",
                  "*/tests/*", "idlelib/idle_test/*", "lib2to3/*", "__pycache__/*",
                  "*/__pycache__/*", "turtledemo/*", "ensurepip/_bundled/*")
_LICENSE_RE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)
_PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class DefaultSource:
    """Arguments of ``StreamRegistry.add`` for one default stream."""

    name: str
    source: str
    format: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> list[Path]:
    root = Path(stdlib_dir())
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if not any(fnmatch.fnmatch(rel, ex) for ex in STDLIB_EXCLUDE):
            out.append(p)
    return out


def materialise_pydoc(cache_dir: str | os.PathLike[str]) -> Path:
    """Write ``pydoc/topics-X.Y.jsonl`` and ``pydoc/docstrings-X.Y.jsonl``; return the dir."""
    out = Path(cache_dir) / "pydoc"
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    lines = [json.dumps({"text": v, "topic": k}) for k, v in sorted(topics.items()) if v.strip()]
    write_if_changed(out / f"topics-{_PYVER}.jsonl", ("\n".join(lines) + "\n").encode())
    doc_file = out / f"docstrings-{_PYVER}.jsonl"
    if doc_file.exists():  # a function of this Python's stdlib: build once per cache
        return out
    seen: set[str] = set()
    docs = []
    root = Path(stdlib_dir())
    for p in _stdlib_files():
        try:
            tree = ast.parse(p.read_bytes())
        except (SyntaxError, ValueError):
            continue
        mod = p.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for n in nodes:
            doc = ast.get_docstring(n)
            if doc and len(doc) >= 40 and doc not in seen:
                seen.add(doc)
                docs.append(json.dumps({"text": doc, "object": f"{mod}.{getattr(n, 'name', '')}".rstrip(".")}))
    write_if_changed(doc_file, ("\n".join(docs) + "\n").encode())
    return out


def materialise_licenses(cache_dir: str | os.PathLike[str]) -> Path:
    """Copy licence files of installed distributions to ``licenses/<dist>-<ver>/<file>``."""
    from importlib.metadata import distributions

    out = Path(cache_dir) / "licenses"
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for dist in distributions():  # sys.path order: the first of duplicates wins
        name = (dist.metadata.get("Name") or "unknown").replace("/", "_")
        version = (dist.version or "0").replace("/", "_")
        if f"{name}-{version}".lower() in seen:
            continue
        seen.add(f"{name}-{version}".lower())
        for f in dist.files or ():
            if not _LICENSE_RE.match(f.name):
                continue
            if ".dist-info" not in str(f) and ".egg-info" not in str(f) and "licen" not in str(f).lower():
                continue
            try:
                data = Path(dist.locate_file(f)).read_bytes()
                data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if data.strip() and b"\x00" not in data:
                safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(f))  # full path: unique per dist
                write_if_changed(out / f"{name}-{version}" / f"{safe}.txt", data)
    return out


def default_sources(cache_dir: str | os.PathLike[str]) -> list[DefaultSource]:
    """The three default streams, materialising ``pydoc`` and ``licenses`` into
    ``cache_dir`` (e.g. a folder of the store)."""
    return [
        DefaultSource("stdlib", stdlib_dir(), "text",
                      {"text_mode": "file", "pattern": "*.py", "exclude": STDLIB_EXCLUDE,
                       "on_bad_rows": "skip"}),
        DefaultSource("pydoc", str(materialise_pydoc(cache_dir)), "jsonl",
                      {"text_field": "text", "on_bad_rows": "skip"}),
        DefaultSource("licenses", str(materialise_licenses(cache_dir)), "text",
                      {"text_mode": "file", "pattern": "*.txt", "on_bad_rows": "skip"}),
    ]


DEFAULT_STREAMS = ("stdlib", "pydoc", "licenses")


def register_defaults(registry: Any, cache_dir: str | os.PathLike[str],
                      names: tuple[str, ...] = DEFAULT_STREAMS) -> list[Any]:
    """Register (idempotently) the default streams named in ``names``; returns their specs."""
    return [registry.add(s.name, s.source, s.format, exist_ok=True, **s.kwargs)
            for s in default_sources(cache_dir) if s.name in names]
