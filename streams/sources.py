"""Where a stream's data lies and how it is read: local files through ``datasets``
builders (``text``, ``json``, ``csv``, ``parquet``) in streaming mode, or a hub dataset.

``datasets`` is imported lazily (its import costs ~1 s), and its inconsistent errors are
converted into ``streams.errors`` exceptions here, in one place.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import re
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

from .errors import (BadInputError, EmptyFileError, EncodingError, FieldTypeError,
                     MalformedFileError, MalformedJSONError, MissingFieldError, SpecError,
                     SourceNotFoundError, SourceUnavailableError, UnreadableFileError,
                     VanishedFileError, show_path)
from .fileindex import is_link_loop
from .fsutil import DISK_ERRNOS
from .spec import StreamSpec

BATCH_ROWS = 1024
TEXT_CHUNK = 1 << 20  # bytes per read of the text builder (its default is 10 MB)
_BUILDER = {"text": "text", "jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
_SAMPLE_BY = {"file": "document", "paragraph": "paragraph", "line": "line"}
_DEFAULT_PATTERN = {"text": "*", "jsonl": "*.jsonl", "json": "*.json*", "csv": "*.csv",
                    "parquet": "*.parquet"}
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")
_GLOB_CHARS = set("*?[")
EXTENSION_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                     ".parquet": "parquet", ".pq": "parquet"}  # anything else: text
_INFER_MAX_FILES = 10_000
_PARSER_ERRORS = ("ArrowInvalid", "ArrowTypeError", "ArrowNotImplementedError", "JSONDecodeError",
                  "ParserError", "ArrowException")


def _ignored_name(name: str) -> bool:
    """Hidden and temp files are never data: writers should write those, then rename."""
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES)


def _walk(root: str, spec: StreamSpec) -> list[str]:
    """A drop folder's files. Links to directories are not followed (so no loop can
    recurse); one that loops (points to a directory containing it) is listed, so that
    reading it raises ``UnreadableFileError`` naming it."""
    pattern = spec.pattern or _DEFAULT_PATTERN[spec.format]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        loops = [d for d in dirnames if is_link_loop(os.path.join(dirpath, d))]
        for name in filenames + loops:
            if _ignored_name(name) or not fnmatch.fnmatch(name, pattern):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if any(fnmatch.fnmatch(rel, ex) for ex in spec.exclude):
                continue
            out.append(path)
    return out


def _match(pattern: list[str], parts: list[str]) -> bool:
    """Glob match of path components, ``**`` standing for any number of directories."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return _match(pattern[1:], parts) or (bool(parts) and _match(pattern, parts[1:]))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])


def _glob(pattern: str, base: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` does not follow links to
    directories: ``glob`` does, so a link to a parent repeats the tree 40 times (until
    the OS refuses the path) and two such links 2**40 times — a hang."""
    if "**" not in pattern:
        return glob.glob(pattern)
    parts = os.path.relpath(pattern, base).split(os.sep)
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, base)
        prefix = [] if rel == "." else rel.split(os.sep)
        out.extend(os.path.join(dirpath, name) for name in dirnames + filenames
                   if not name.startswith(".") and _match(parts, prefix + [name]))
    return out


def list_files(spec: StreamSpec) -> list[str]:
    """Absolute paths of the stream's files now, sorted. Directories are read recursively
    (a drop folder: hidden and ``*.tmp``/``*.part`` files are skipped); a glob may match
    nothing yet if its directory exists; a missing path raises ``SourceNotFoundError``.
    Paths that are directories or dangling links where a file is expected are *kept*, so
    that reading them raises ``UnreadableFileError`` naming them."""
    found: set[str] = set()
    for src in spec.sources:
        src = os.path.abspath(os.path.expanduser(src))
        if _GLOB_CHARS & set(src):
            base = src
            while _GLOB_CHARS & set(base):
                base = os.path.dirname(base)
            if not os.path.isdir(base):
                raise SourceNotFoundError(f"stream {spec.name!r}: directory {show_path(base)} of glob "
                                          f"{show_path(src)} does not exist")
            for p in _glob(src, base):
                rel = os.path.relpath(p, base)
                if not _ignored_name(os.path.basename(p)) and \
                        not any(fnmatch.fnmatch(rel, ex) for ex in spec.exclude):
                    found.add(p)
        elif os.path.isdir(src):
            found.update(_walk(src, spec))
        elif os.path.lexists(src):
            found.add(src)
        else:
            raise SourceNotFoundError(f"stream {spec.name!r}: source {show_path(src)} does not exist")
    return sorted(found)


def format_of(name: str) -> str:
    """The format a file name's extension says (``text`` for any other extension)."""
    return EXTENSION_FORMATS.get(os.path.splitext(name)[1].lower(), "text")


def _candidates(src: str, pattern: str | None) -> Iterable[str]:
    """The files a local source would offer (before a format's default pattern)."""
    src = os.path.abspath(os.path.expanduser(src))
    if _GLOB_CHARS & set(src):
        base = src
        while _GLOB_CHARS & set(base):
            base = os.path.dirname(base)
        if os.path.isdir(base):
            yield from (p for p in _glob(src, base) if os.path.isfile(p))
    elif os.path.isdir(src):
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            yield from (os.path.join(dirpath, n) for n in filenames if not _ignored_name(n)
                        and (pattern is None or fnmatch.fnmatch(n, pattern)))
    elif os.path.lexists(src):
        yield src


def infer_format(sources: Iterable[str], pattern: str | None = None) -> tuple[str, str]:
    """``(format, why)`` of local ``sources`` from their files' extensions (``.jsonl`` /
    ``.ndjson``, ``.json``, ``.csv``, ``.parquet``; anything else is ``text``), for a drop
    folder or glob from the files in it now (those matching ``pattern``). Files of several
    formats raise ``SpecError`` saying which; no file at all gives ``text``."""
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for src in sources:
        for n, path in enumerate(_candidates(src, pattern)):
            if n >= _INFER_MAX_FILES:
                break
            fmt = format_of(path)
            counts[fmt] += 1
            example.setdefault(fmt, os.path.basename(path))
    if not counts:
        return "text", "no file to infer it from yet"
    if len(counts) > 1:
        found = ", ".join(f"{n} {fmt} (e.g. {show_path(example[fmt])})" for fmt, n in counts.most_common())
        raise SpecError(f"cannot infer the format: the source holds files of several formats "
                        f"({found}); pass --format, and --pattern to choose the files")
    (fmt, n), = counts.items()
    return fmt, (f"inferred from the extension of {example[fmt]}" if n == 1
                 else f"inferred from the extensions of its {n} files, e.g. {example[fmt]}")


def _convert(exc: BaseException, path: str, fmt: str = "jsonl") -> BadInputError:
    """Map an exception escaping ``datasets`` (reading a file of format ``fmt``) onto this
    package's errors, on one line, with the line when the parser names one."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, RuntimeError) and isinstance(cause, StopIteration) or isinstance(exc, StopIteration):
        return EmptyFileError(path, "no rows (datasets ended the file with a bare StopIteration)")
    if isinstance(exc, FileNotFoundError):
        return VanishedFileError(path, "file disappeared while being read")
    if isinstance(exc, (IsADirectoryError, PermissionError)):
        return UnreadableFileError(path, str(exc))
    inner = cause if cause is not None and type(exc).__name__ == "DatasetGenerationError" else exc
    if isinstance(inner, UnicodeDecodeError):
        return EncodingError(path, f"not valid UTF-8 ({inner.reason} at byte {inner.start})")
    name = type(inner).__name__
    if name == "EmptyDataError":  # pandas: nothing to read, not even a header
        return EmptyFileError(path, "no CSV header or rows")
    if name in _PARSER_ERRORS or (fmt == "parquet" and isinstance(inner, (OSError, ValueError))):
        cls = MalformedJSONError if fmt in ("json", "jsonl") else MalformedFileError
        kw = {}
        if fmt == "csv" and (m := re.search(r"\bline (\d+)", str(inner))):
            kw["line"] = int(m.group(1))
        elif fmt == "csv" and (m := re.search(r"\bstarting at row (\d+)", str(inner))):
            kw["line"] = int(m.group(1)) + 1  # pandas counts lines from 0 there
        what = {"csv": "CSV", "parquet": "Parquet"}.get(fmt, "JSON")
        return cls(path, f"cannot parse as {what}: {inner}", **kw)
    if isinstance(inner, OSError):
        return UnreadableFileError(path, f"read error: {inner}")
    # anything else the reader raised on this content (a RecursionError, a TypeError...)
    cls = MalformedJSONError if fmt in ("json", "jsonl") else MalformedFileError
    return cls(path, f"cannot read this content: {type(inner).__name__}: {inner}")


def text_of(value: Any, path: str, row: int, field: str) -> str:
    """The text of one row's field, or a ``BadInputError`` raised naming the row."""
    if value is None:
        raise MissingFieldError(path, f"missing or null text field {field!r}", row=row)
    if not isinstance(value, str):
        raise FieldTypeError(path, f"field {field!r} is {type(value).__name__}, expected a string", row=row)
    return value


def read_rows(spec: StreamSpec, path: str, start_row: int = 0,
              read_path: str | None = None) -> Iterator[tuple[int, list[Any]]]:
    """Yield ``(first_row_index, values)`` batches of the text field of a local file, from
    ``start_row`` on, read by the ``datasets`` builder of ``spec.format`` (streaming).
    ``read_path`` is the file actually read (a sanitized copy), ``path`` the one named
    in errors. Values are raw (``None`` / non-string values are left to ``text_of``)."""
    from datasets import load_dataset  # lazy: ~1 s import

    src = read_path or path
    kwargs: dict[str, Any] = {}
    if spec.format == "text":
        kwargs = {"sample_by": _SAMPLE_BY[spec.text_mode], "chunksize": TEXT_CHUNK}
    field = "text" if spec.format == "text" else spec.text_field
    try:
        # datasets leaves a lock file per read in its cache dir: a private one, removed after
        # (the user's ~/.cache held 64k of them after the test suite, and slowed every lookup)
        with tempfile.TemporaryDirectory(prefix="lifelong-read-", ignore_cleanup_errors=True) as cache:
            ds = load_dataset(_BUILDER[spec.format], data_files=[src], split="train",
                              streaming=True, cache_dir=cache, **kwargs)
            yield from _batches(ds, field, path, start_row)
    except BadInputError:
        raise
    except (Exception, StopIteration) as exc:
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS and exc.filename not in (path, src):
            raise  # the disk refused datasets a write (its cache's lock files): not the input's fault
        raise _convert(exc, path, spec.format) from exc


def _batches(ds: Any, field: str, where: Any, start_row: int) -> Iterator[tuple[int, list[Any]]]:
    """``(first row, values)`` batches of ``field`` from a streaming dataset, from ``start_row``.

    The loop catches ``StopIteration`` itself: ``datasets`` can raise a bare one (an empty
    JSONL), which must end this generator, not leak out of an outer loop.
    """
    if start_row:
        ds = ds.skip(start_row)
    row = start_row
    it = iter(ds.iter(batch_size=BATCH_ROWS))
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        if field not in batch:
            raise MissingFieldError(where, f"no column {field!r} (columns: {sorted(batch)})", row=row)
        yield row, batch[field]
        row += len(batch[field])


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers within ``timeout`` seconds, name lookup included (the socket
    timeout does not cover DNS, which can hang for tens of seconds without a network)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                answered.append(True)
        except OSError:
            answered.append(False)

    probe = threading.Thread(target=connect, daemon=True)  # left behind if the lookup hangs
    probe.start()
    probe.join(timeout)
    return bool(answered and answered[0])


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def read_hub_rows(spec: StreamSpec, start_row: int = 0) -> Iterator[tuple[int, list[Any]]]:
    """Like ``read_rows`` for a hub dataset (streaming). Offline (``HF_*_OFFLINE=1``) it
    uses the local cache only; online it first checks, with a 3 s timeout, that the hub is
    reachable. Either way failure is a prompt ``SourceUnavailableError``, never a hang."""
    name = spec.sources[0]
    if not _offline() and not _hub_reachable():
        raise SourceUnavailableError(
            f"stream {spec.name!r}: hub dataset {name!r}: the hub is not reachable; set "
            "HF_DATASETS_OFFLINE=1 to use a cached copy")
    from datasets import load_dataset

    if _offline():  # the libraries read these variables once, at import: make them agree now
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    try:
        ds = load_dataset(name, spec.hub_config, split=spec.split, streaming=True)
        yield from _batches(ds, spec.text_field, name, start_row)
    except BadInputError:
        raise
    except (Exception, StopIteration) as exc:
        raise SourceUnavailableError(
            f"stream {spec.name!r}: hub dataset {name!r} is not reachable or not cached "
            f"({type(exc).__name__}: {exc})") from exc
