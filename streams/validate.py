"""One pass over a local file before ``datasets`` reads it: sha256, and for line-based
formats (``text``, ``jsonl``/``json``) a line-by-line check that names the exact line of
any problem — the ``datasets`` builders report these poorly or not at all.

With ``on_bad_rows='skip'`` a file with bad lines is rewritten, minus those lines, into a
sanitized temp copy which ``datasets`` then reads (row numbers refer to that copy, which is
a pure function of the file's bytes, so cursors stay exact).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import (BadInputError, BinaryFileError, BlankFileError, EmptyFileError,
                     EncodingError, FieldTypeError, MalformedJSONError, MissingFieldError,
                     NotAnObjectError, UnreadableFileError, VanishedFileError)
from .fsutil import CHUNK, atomic_write_bytes

SNIFF_BYTES = 8192
_WS = b" \t\r\n\x0b\x0c"


@dataclass
class FileCheck:
    """Result of ``check_file``: identity of the bytes read and the problems found.

    ``fatal`` is a whole-file problem (empty, blank, binary); ``bad_lines`` are 1-based
    line numbers with their error, in file order.
    """

    path: str
    size: int
    sha256: str
    fatal: BadInputError | None = None
    bad_lines: list[tuple[int, BadInputError]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.bad_lines


def open_checked(path: str):
    """``open(path, 'rb')`` with OS errors turned into ``UnreadableFileError``/``VanishedFileError``."""
    try:
        return open(path, "rb")
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise UnreadableFileError(path, "dangling symbolic link") from exc
        raise VanishedFileError(path, "file disappeared after it was listed") from exc
    except IsADirectoryError as exc:
        raise UnreadableFileError(path, "is a directory, expected a file") from exc
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot open: {exc.strerror or exc}") from exc


def _check_json_line(path: str, lineno: int, raw: bytes, text_field: str) -> BadInputError | None:
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as exc:
        return EncodingError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", line=lineno)
    except ValueError as exc:
        return MalformedJSONError(path, f"malformed JSON: {exc}", line=lineno)
    if not isinstance(obj, dict):
        return NotAnObjectError(path, f"expected a JSON object, got {type(obj).__name__}", line=lineno)
    if text_field not in obj or obj[text_field] is None:
        return MissingFieldError(path, f"missing text field {text_field!r}", line=lineno)
    if not isinstance(obj[text_field], str):
        return FieldTypeError(path, f"field {text_field!r} is {type(obj[text_field]).__name__}, "
                              "expected a string", line=lineno)
    return None


def _check_text_line(path: str, lineno: int, raw: bytes) -> BadInputError | None:
    if b"\x00" in raw:
        return EncodingError(path, "NUL byte in text (binary data?)", line=lineno)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return EncodingError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start} "
                             "of the line)", line=lineno)
    return None


def _is_json_array(path: str) -> bool:
    with open_checked(path) as f:
        head = f.read(SNIFF_BYTES).lstrip(_WS + b"\xef\xbb\xbf")
    return head[:1] == b"["


def check_file(path: str, fmt: str, text_field: str = "text", *, stop_at_first: bool = False) -> FileCheck:
    """Hash ``path`` and, for ``text``/``jsonl``/``json``, validate it line by line."""
    h = hashlib.sha256()
    size = 0
    bad: list[tuple[int, BadInputError]] = []
    lines_fmt = fmt in ("text", "jsonl", "json")
    if fmt == "json" and _is_json_array(path):
        lines_fmt = False
    any_content = False
    with open_checked(path) as f:
        try:
            if not lines_fmt:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            else:
                head = f.read(SNIFF_BYTES)
                f.seek(0)
                if b"\x00" in head:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                        size += len(chunk)
                    return FileCheck(path, size, h.hexdigest(),
                                     fatal=BinaryFileError(path, "binary file (NUL bytes in its first 8 KiB)"))
                for lineno, raw in enumerate(f, 1):
                    h.update(raw)
                    size += len(raw)
                    if not raw.strip(_WS):
                        continue
                    any_content = True
                    err = (_check_text_line(path, lineno, raw) if fmt == "text"
                           else _check_json_line(path, lineno, raw, text_field))
                    if err is not None:
                        bad.append((lineno, err))
                        if stop_at_first:
                            break
        except FileNotFoundError as exc:  # pragma: no cover - races on network filesystems
            raise VanishedFileError(path, "file disappeared while being read") from exc
        except OSError as exc:
            raise UnreadableFileError(path, f"read error: {exc.strerror or exc}") from exc
    check = FileCheck(path, size, h.hexdigest(), bad_lines=bad)
    if size == 0:
        check.fatal = EmptyFileError(path, "empty file (0 bytes)")
    elif lines_fmt and not any_content and not bad:
        check.fatal = BlankFileError(path, "file holds only blank lines / whitespace")
    return check


def write_sanitized(check: FileCheck, dest_dir: str) -> str:
    """Copy ``check.path`` without its bad lines into ``dest_dir``; return the copy's path."""
    skip = {ln for ln, _ in check.bad_lines}
    dest = Path(dest_dir) / f"{check.sha256}{Path(check.path).suffix}"
    if dest.exists():
        return str(dest)
    with open_checked(check.path) as src:
        atomic_write_bytes(dest, (raw for lineno, raw in enumerate(src, 1) if lineno not in skip))
    return str(dest)
