"""One pass over a local file before ``datasets`` reads it: sha256, and for line-based
formats (``text``, ``jsonl``/``json``, ``csv``) a line-by-line check that names the exact
line of any problem — the ``datasets`` builders report these poorly or not at all (CSV
lines are checked for encoding only: NUL bytes and invalid UTF-8). A JSON array file is
checked as a whole, element by element, naming the line where the bad element starts.

JSON is checked as strictly as the reader behind ``datasets`` (pyarrow) parses it: nesting
deeper than 60 levels, duplicate keys, numbers out of double range and
``\\u`` escapes of lone UTF-16 surrogates are errors here, with their line, rather than
an unplaced failure halfway through reading.

Only regular files are opened (``open_checked``): a FIFO would block the reader forever
and a device such as ``/dev/zero`` never ends.

With ``on_bad_rows='skip'`` a file with bad lines is rewritten, minus those lines, into a
sanitized temp copy which ``datasets`` then reads (row numbers refer to that copy, which is
a pure function of the file's bytes, so cursors stay exact).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import (BadInputError, BinaryFileError, BlankFileError, EmptyFileError,
                     EncodingError, FieldTypeError, MalformedJSONError, MissingFieldError,
                     NotAnObjectError, UnreadableFileError, VanishedFileError)
from .fileindex import not_regular
from .fsutil import CHUNK, atomic_write_bytes

SNIFF_BYTES = 8192
_WS = b" \t\r\n\x0b\x0c"
_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_WS = " \t\r\n"
LINE_FORMATS = ("text", "jsonl", "json", "csv")


@dataclass
class FileCheck:
    """Result of ``check_file``: identity of the bytes read and the problems found.

    ``fatal`` is a whole-file problem (empty, blank, binary, a bad JSON array);
    ``bad_lines`` are 1-based line numbers with their error, in file order.
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
    """``open(path, 'rb')`` of a regular file, never blocking: a FIFO, device, socket or
    directory is refused, and OS errors become ``UnreadableFileError``/``VanishedFileError``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise UnreadableFileError(path, "dangling symbolic link") from exc
        raise VanishedFileError(path, "file disappeared after it was listed") from exc
    except IsADirectoryError as exc:
        raise UnreadableFileError(path, "is a directory, expected a file") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableFileError(path, "symbolic link loop") from exc
        raise UnreadableFileError(path, f"cannot open: {exc.strerror or exc}") from exc
    try:
        problem = not_regular(os.fstat(fd).st_mode)
        if problem:
            raise UnreadableFileError(path, problem)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# -- JSON ---------------------------------------------------------------------------------

def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup[:40]!r}")
    return obj


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:24]} is out of the range of a double")
    return value


def _int(text: str) -> int:
    value = int(text)  # more than 4300 digits: a ValueError
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"number {text[:24]}… is out of the range of a double") from None
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_float=_float, parse_int=_int)
MAX_JSON_DEPTH = 60  # pyarrow stops at 64 levels ("Recursion level in ArrowSchema struct exceeded")


def _too_deep(obj: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``obj`` nests objects/arrays more than ``limit`` levels (walked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _json_problem(text: str, start: int = 0) -> tuple[object, int, str | None]:
    """Decode one JSON value of ``text`` at ``start`` as strictly as pyarrow reads it:
    ``(value, end, None)`` or ``(None, position, problem)``."""
    try:
        obj, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        return None, exc.pos, f"malformed JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, start, "JSON nested too deeply to parse"
    except ValueError as exc:  # from the hooks above
        return None, start, f"malformed JSON: {exc}"
    if isinstance(obj, (dict, list)) and text.count("[", start, end) + text.count("{", start, end) > MAX_JSON_DEPTH \
            and _too_deep(obj):
        return None, start, f"JSON nested deeper than {MAX_JSON_DEPTH} levels (the reader's limit)"
    if _SURROGATE_ESCAPE.search(text, start, end):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, start, "a \\u escape encodes a lone UTF-16 surrogate, not a character"
    return obj, end, None


def _check_record(path: str, obj: object, text_field: str, **where: int) -> BadInputError | None:
    if not isinstance(obj, dict):
        return NotAnObjectError(path, f"expected a JSON object, got {type(obj).__name__}", **where)
    if text_field not in obj or obj[text_field] is None:
        return MissingFieldError(path, f"missing text field {text_field!r}", **where)
    if not isinstance(obj[text_field], str):
        return FieldTypeError(path, f"field {text_field!r} is {type(obj[text_field]).__name__}, "
                              "expected a string", **where)
    if "\x00" in obj[text_field]:  # a \u0000 escape: text never holds it (and PostgreSQL text cannot)
        return EncodingError(path, f"NUL character in field {text_field!r} (binary data?)", **where)
    return None


def _check_json_line(path: str, lineno: int, raw: bytes, text_field: str) -> BadInputError | None:
    if lineno == 1 and raw.startswith(_BOM):  # the reader skips a BOM at the start
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return EncodingError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", line=lineno)
    text = text.strip(_JSON_WS)
    obj, end, problem = _json_problem(text)
    if problem is None and end != len(text):
        problem = f"malformed JSON: extra data after the value (column {end + 1})"
    if problem is not None:
        return MalformedJSONError(path, problem, line=lineno)
    return _check_record(path, obj, text_field, line=lineno)


def _is_json_array(path: str) -> bool:
    """Whether ``datasets`` reads the file as one JSON array (``[`` first, after a BOM)."""
    with open_checked(path) as f:
        head = f.read(len(_BOM) + 1)
    return head.removeprefix(_BOM)[:1] == b"["


def check_json_array(path: str, data: bytes, text_field: str) -> BadInputError | None:
    """The first problem of a JSON array file, naming the line where its bad element
    starts (and the element as ``row``); None if every element is a record with a string
    text field — or, as ``datasets`` also reads, if all are strings (field ``text``)."""
    data = data.removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return EncodingError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", line=line)
    ws = re.compile(r"[ \t\r\n]*")
    pos, row, line, seen = 1, 0, 1, 0
    strings = None
    while True:
        pos = ws.match(text, pos).end()
        line += text.count("\n", seen, pos)
        seen = pos
        if row == 0 and text.startswith("]", pos):
            break
        obj, end, problem = _json_problem(text, pos)
        if problem is not None:
            line += text.count("\n", seen, end)
            return MalformedJSONError(path, problem, line=line, row=row)
        if strings is None:
            strings = isinstance(obj, str)
        err = (None if strings and isinstance(obj, str) and text_field == "text"
               else _check_record(path, obj, text_field, line=line, row=row))
        if err is not None:
            return err
        pos = ws.match(text, end).end()
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            line += text.count("\n", seen, pos)
            return MalformedJSONError(path, f"malformed JSON: expected ',' or ']' after element {row}",
                                      line=line, row=row)
        pos, row = pos + 1, row + 1
    end = ws.match(text, pos + 1).end()
    if end != len(text):
        line += text.count("\n", seen, end)
        return MalformedJSONError(path, "malformed JSON: extra data after the array", line=line)
    return None


# -- text ---------------------------------------------------------------------------------

def _check_text_line(path: str, lineno: int, raw: bytes) -> BadInputError | None:
    if b"\x00" in raw:
        return EncodingError(path, "NUL byte in text (binary data?)", line=lineno)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return EncodingError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start} "
                             "of the line)", line=lineno)
    return None


def check_file(path: str, fmt: str, text_field: str = "text", *, stop_at_first: bool = False) -> FileCheck:
    """Hash ``path`` and, for ``text``/``jsonl``/``json``/``csv``, validate it line by line
    (a JSON array as a whole). ``stop_at_first``: validate no further after a bad line (the
    whole file is still hashed)."""
    h = hashlib.sha256()
    size = 0
    bad: list[tuple[int, BadInputError]] = []
    array = fmt == "json" and _is_json_array(path)
    lines_fmt = fmt in LINE_FORMATS and not array
    any_content = False
    fatal: BadInputError | None = None
    with open_checked(path) as f:
        try:
            head = f.read(SNIFF_BYTES)
            f.seek(0)
            if array:
                data = f.read()
                h.update(data)
                size = len(data)
                fatal = check_json_array(path, data, text_field)
            elif not lines_fmt or b"\x00" in head:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                if lines_fmt:
                    fatal = BinaryFileError(path, "binary file (NUL bytes in its first 8 KiB)")
            else:
                for lineno, raw in enumerate(f, 1):
                    h.update(raw)
                    size += len(raw)
                    if (stop_at_first and bad) or not raw.strip(_WS):
                        continue
                    any_content = True
                    err = (_check_text_line(path, lineno, raw) if fmt in ("text", "csv")
                           else _check_json_line(path, lineno, raw, text_field))
                    if err is not None:
                        bad.append((lineno, err))
        except FileNotFoundError as exc:  # pragma: no cover - races on network filesystems
            raise VanishedFileError(path, "file disappeared while being read") from exc
        except OSError as exc:
            raise UnreadableFileError(path, f"read error: {exc.strerror or exc}") from exc
    check = FileCheck(path, size, h.hexdigest(), fatal=fatal, bad_lines=bad)
    if size == 0:
        check.fatal = EmptyFileError(path, "empty file (0 bytes)")
    elif lines_fmt and fatal is None and not any_content and not bad:
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
