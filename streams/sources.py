"""Where a stream's data lies and how it is read: local files through ``datasets``
builders (``text``, ``json``, ``csv``, ``parquet``) in streaming mode, or a hub dataset.

``datasets`` is imported lazily (its import costs ~1 s), and its inconsistent errors are
converted into ``streams.errors`` exceptions here, in one place.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from .errors import (BadInputError, EmptyFileError, EncodingError, FieldTypeError,
                     MalformedJSONError, MissingFieldError, SourceNotFoundError,
                     SourceUnavailableError, UnreadableFileError, VanishedFileError)
from .spec import StreamSpec

BATCH_ROWS = 1024
TEXT_CHUNK = 1 << 20  # bytes per read of the text builder (its default is 10 MB)
_BUILDER = {"text": "text", "jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
_SAMPLE_BY = {"file": "document", "paragraph": "paragraph", "line": "line"}
_DEFAULT_PATTERN = {"text": "*", "jsonl": "*.jsonl", "json": "*.json*", "csv": "*.csv",
                    "parquet": "*.parquet"}
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")
_GLOB_CHARS = set("*?[")


def _ignored_name(name: str) -> bool:
    """Hidden and temp files are never data: writers should write those, then rename."""
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES)


def _walk(root: str, spec: StreamSpec) -> list[str]:
    pattern = spec.pattern or _DEFAULT_PATTERN[spec.format]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if _ignored_name(name) or not fnmatch.fnmatch(name, pattern):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if any(fnmatch.fnmatch(rel, ex) for ex in spec.exclude):
                continue
            out.append(path)
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
                raise SourceNotFoundError(f"stream {spec.name!r}: directory {base} of glob {src} does not exist")
            for p in glob.glob(src, recursive=True):
                rel = os.path.relpath(p, base)
                if not _ignored_name(os.path.basename(p)) and \
                        not any(fnmatch.fnmatch(rel, ex) for ex in spec.exclude):
                    found.add(p)
        elif os.path.isdir(src):
            found.update(_walk(src, spec))
        elif os.path.lexists(src):
            found.add(src)
        else:
            raise SourceNotFoundError(f"stream {spec.name!r}: source {src} does not exist")
    return sorted(found)


def _convert(exc: BaseException, path: str) -> BadInputError:
    """Map an exception escaping ``datasets`` onto this package's errors."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, RuntimeError) and isinstance(cause, StopIteration) or isinstance(exc, StopIteration):
        return EmptyFileError(path, "no rows (datasets ended the file with a bare StopIteration)")
    if isinstance(exc, UnicodeDecodeError):
        return EncodingError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
    if isinstance(exc, FileNotFoundError):
        return VanishedFileError(path, "file disappeared while being read")
    if isinstance(exc, (IsADirectoryError, PermissionError)):
        return UnreadableFileError(path, str(exc))
    inner = cause if cause is not None and type(exc).__name__ == "DatasetGenerationError" else exc
    if isinstance(inner, UnicodeDecodeError):
        return EncodingError(path, f"not valid UTF-8 ({inner.reason} at byte {inner.start})")
    if type(inner).__name__ in ("ArrowInvalid", "JSONDecodeError", "ParserError", "ArrowTypeError"):
        return MalformedJSONError(path, f"cannot parse: {inner}")
    return UnreadableFileError(path, f"{type(exc).__name__}: {exc}")


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
        ds = load_dataset(_BUILDER[spec.format], data_files=[src], split="train",
                          streaming=True, **kwargs)
        yield from _batches(ds, field, path, start_row)
    except BadInputError:
        raise
    except (Exception, StopIteration) as exc:
        raise _convert(exc, path) from exc


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
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


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

    try:
        ds = load_dataset(name, spec.hub_config, split=spec.split, streaming=True)
        yield from _batches(ds, spec.text_field, name, start_row)
    except BadInputError:
        raise
    except (Exception, StopIteration) as exc:
        raise SourceUnavailableError(
            f"stream {spec.name!r}: hub dataset {name!r} is not reachable or not cached "
            f"({type(exc).__name__}: {exc})") from exc
