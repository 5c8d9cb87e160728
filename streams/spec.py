"""What a stream is: its name, where its data lies, how to read it (``StreamSpec``)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from .errors import SpecError, StreamNameError
from .split import HELDOUT_SPLITS

FORMATS = ("text", "jsonl", "json", "csv", "parquet", "hub")
TEXT_MODES = ("file", "paragraph", "line")
ON_BAD_ROWS = ("error", "skip")
ON_CHANGED = ("error", "reread", "skip")
DEFAULT_HOLDOUT = 0.05

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid stream name, else raise ``StreamNameError``.

    Valid: 1-64 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit
    (so no ``/``, ``\\``, no ``..`` traversal, no leading dot, no spaces or control chars).
    """
    if not isinstance(name, str):
        raise StreamNameError(f"stream name must be a string, got {type(name).__name__}")
    if ".." in name or "/" in name or "\\" in name or not _NAME_RE.match(name):
        raise StreamNameError(
            f"invalid stream name {name!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..' or path separators"
        )
    return name


@dataclass(frozen=True)
class StreamSpec:
    """A registered stream (one row of ``stream_registry``).

    source:   a file, a directory (read recursively: a drop folder), a glob, or a list of
              them; for ``format='hub'`` a Hugging Face dataset name.
    format:   ``text`` | ``jsonl`` | ``json`` | ``csv`` | ``parquet`` | ``hub``.
    text_field: the JSON key / CSV or Parquet column / hub column holding the text.
    text_mode:  for ``text``: a document is a whole ``file``, a ``paragraph`` (blank-line
              separated) or a ``line``.
    on_bad_rows: ``error`` (stop, cursor unchanged) or ``skip`` (skip and count by kind).
    on_changed: what to do with a consumed file whose sha256 changed: ``error``,
              ``reread`` (read it again from the start as new data; reported) or ``skip``.
    holdout:  fraction of documents held out, by a hash of their content.
    heldout_split: ``document`` (hold out whole documents) or ``chunk`` (hold out ~512-
              character chunks of every document: for streams of few, long documents);
              see ``split.py``. Registrations made before the option are ``document``.
    exclude:  fnmatch patterns on paths relative to a directory source to leave out.
    pattern:  fnmatch pattern on file names inside a directory source (default by format).
    hub_config / split: for hub datasets.
    """

    name: str
    source: str | tuple[str, ...]
    format: str = "text"
    text_field: str = "text"
    text_mode: str = "line"
    on_bad_rows: str = "error"
    on_changed: str = "reread"
    holdout: float = DEFAULT_HOLDOUT
    heldout_split: str = "document"
    exclude: tuple[str, ...] = ()
    pattern: str | None = None
    hub_config: str | None = None
    split: str = "train"
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if isinstance(self.source, list):
            object.__setattr__(self, "source", tuple(self.source))
        if isinstance(self.exclude, list):
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.source:
            raise SpecError(f"stream {self.name!r}: empty source")
        if self.format not in FORMATS:
            raise SpecError(f"stream {self.name!r}: format {self.format!r} not in {FORMATS}")
        if self.text_mode not in TEXT_MODES:
            raise SpecError(f"stream {self.name!r}: text_mode {self.text_mode!r} not in {TEXT_MODES}")
        if self.on_bad_rows not in ON_BAD_ROWS:
            raise SpecError(f"stream {self.name!r}: on_bad_rows {self.on_bad_rows!r} not in {ON_BAD_ROWS}")
        if self.on_changed not in ON_CHANGED:
            raise SpecError(f"stream {self.name!r}: on_changed {self.on_changed!r} not in {ON_CHANGED}")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise SpecError(f"stream {self.name!r}: holdout must be in [0, 1), got {self.holdout}")
        if self.heldout_split not in HELDOUT_SPLITS:
            raise SpecError(f"stream {self.name!r}: heldout_split {self.heldout_split!r} not in {HELDOUT_SPLITS}")
        if not self.text_field:
            raise SpecError(f"stream {self.name!r}: empty text_field")

    @property
    def sources(self) -> tuple[str, ...]:
        """The source as a tuple of paths/globs (or the one hub name)."""
        return self.source if isinstance(self.source, tuple) else (self.source,)

    def options(self) -> dict[str, Any]:
        """The reading options, as stored in the registry's ``options`` JSON column."""
        return {
            "text_field": self.text_field, "text_mode": self.text_mode,
            "on_bad_rows": self.on_bad_rows, "on_changed": self.on_changed,
            "exclude": list(self.exclude), "pattern": self.pattern,
            "hub_config": self.hub_config, "split": self.split,
            "heldout_split": self.heldout_split,
        }

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes what ``ingest`` returns (used to key staged data)."""
        return {"source": list(self.sources), "format": self.format,
                "holdout": float(self.holdout), **self.options()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for ``lifelong stream show``)."""
        d = asdict(self)
        d["source"] = list(self.sources) if isinstance(self.source, tuple) else self.source
        d["exclude"] = list(self.exclude)
        d["created_at"] = self.created_at.isoformat() if self.created_at else None
        return d
