"""Exceptions of the ``streams`` package: one base, specific subclasses.

Errors about a bad piece of input carry ``path`` and, where known, ``line`` (1-based line
of a text/JSONL file) or ``row`` (0-based row of a CSV/Parquet file) so the message can
name exactly what to fix.
"""
from __future__ import annotations

import re

_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def one_line(text: str) -> str:
    """``text`` on one line (messages of ``datasets``/pandas/pyarrow may end in newlines)."""
    return _BREAKS.sub(" ", text).strip()


def show_path(path: str) -> str:
    """A path as messages print it: as is, or quoted with escapes if it holds control
    characters or bytes that are not UTF-8 (a hostile file name stays on one line)."""
    return path if path.isprintable() else ascii(path)


class StreamError(Exception):
    """Base class of every error raised by ``streams``."""


class StreamNameError(StreamError, ValueError):
    """A stream name is not acceptable (path separators, traversal, odd characters)."""


class StreamExistsError(StreamError):
    """A stream with this name is already registered."""


class StreamNotFoundError(StreamError, KeyError):
    """No stream with this name is registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "stream not found"


class SpecError(StreamError, ValueError):
    """A stream's source specification or options are invalid."""


class CursorError(StreamError, ValueError):
    """A cursor is not valid JSON of the expected shape."""


class TokenizerError(StreamError):
    """The tokenizer cannot be loaded or used."""


class StreamWriteError(StreamError):
    """Writing the stream's state failed (disk full, an I/O error): its staged data, held-out
    documents, file index or a temp copy. One line saying what failed and what it left,
    e.g. "disk full while saving the staged data of stream 'a' (database or disk is full);
    nothing was staged and no cursor moved". ``errno`` when the OS gave one."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SourceError(StreamError):
    """The source of a stream cannot be read."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The source path, directory or glob does not exist / matches nothing."""


class SourceUnavailableError(SourceError):
    """A hub dataset that is neither reachable nor cached (offline, no network)."""


class ChangedFileError(SourceError):
    """A file already (partly) consumed was rewritten: its sha256 differs from the cursor's."""

    def __init__(self, path: str, old_sha256: str, new_sha256: str) -> None:
        super().__init__(
            f"{path}: file changed since it was consumed "
            f"(sha256 {old_sha256[:12]}… -> {new_sha256[:12]}…); set on_changed='reread' "
            f"to read it again as new data or 'skip' to ignore its new content"
        )
        self.path, self.old_sha256, self.new_sha256 = path, old_sha256, new_sha256


class BadInputError(SourceError):
    """Base of errors about bad content; names the file and the line or row.

    ``kind`` is the key under which ``on_bad_rows='skip'`` counts such a problem.
    """

    kind = "bad_input"

    def __init__(self, path: str, message: str, *, line: int | None = None,
                 row: int | None = None) -> None:
        where = show_path(path)
        if line is not None:
            where += f", line {line}"
        if row is not None:  # both for an element of a JSON array
            where += f", row {row}"
        message = one_line(message)
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.row, self.detail = path, line, row, message


class MalformedFileError(BadInputError):
    """A CSV or Parquet file that its parser rejects (a JSON one: ``MalformedJSONError``)."""

    kind = "malformed"


class MalformedJSONError(MalformedFileError):
    kind = "malformed_json"


class NotAnObjectError(BadInputError):
    kind = "not_object"


class EncodingError(BadInputError):
    kind = "encoding"


class MissingFieldError(BadInputError):
    kind = "missing_field"


class FieldTypeError(BadInputError):
    kind = "field_type"


class BinaryFileError(BadInputError):
    kind = "binary_file"


class EmptyFileError(BadInputError):
    kind = "empty_file"


class BlankFileError(BadInputError):
    kind = "blank_file"


class UnreadableFileError(BadInputError):
    """The path cannot be opened or is no regular file: a directory, a dangling symlink, a
    symbolic link loop, a FIFO or device, no permission, a name that is not UTF-8."""

    kind = "unreadable"


class VanishedFileError(UnreadableFileError):
    """The file was listed but deleted before it could be read."""

    kind = "vanished"
