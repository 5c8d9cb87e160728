"""``StreamRegistry``: the streams of one database, and the verbs on them."""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from . import advice
from .cursor import cursor_key
from .errors import SourceError, StreamExistsError, StreamNotFoundError, show_path
from .fileindex import FileIndex, not_regular
from .ingest import DEFAULT_CHUNK_TOKENS, iter_ingest
from .pending import pending as _pending
from .result import HeldOut, IngestResult, Pending, StagedInfo, StreamInfo
from .schema import metadata, stream_files, stream_heldout, stream_registry, stream_staged, write_begin
from .sources import list_files
from .spec import StreamSpec, validate_name
from .fsutil import write_errors
from .staging import (NOTHING_STAGED, add_heldout, clear_staged, get_heldout, heldout_size,
                      list_staged, load_staged, save_staged)
from .tokenizer import ByteTokenizer, Tokenizer


def _refuse_special(spec: StreamSpec) -> None:
    """A source path that is a FIFO, device, socket or symbolic link loop is refused at
    registration (reading a FIFO would wait forever, ``/dev/zero`` never ends)."""
    for src in spec.sources:
        path = os.path.abspath(os.path.expanduser(src))
        if set("*?[") & set(path):
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SourceError(f"stream {spec.name!r}: source {show_path(path)} is a "
                                  "symbolic link loop") from exc
            continue  # a dangling link: refused when read, naming it
        problem = None if stat.S_ISDIR(st.st_mode) else not_regular(st.st_mode)
        if problem:
            raise SourceError(f"stream {spec.name!r}: source {show_path(path)} {problem}")


class StreamRegistry:
    """Streams registered in the database behind ``engine`` (tables created on first use).

    ``tokenizer`` defaults to the byte tokenizer; ``work_dir`` is where temporary
    sanitized copies go (system temp by default); ``progress`` shows tqdm bars.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer | None = None, *,
                 work_dir: str | None = None, progress: bool = False) -> None:
        self.engine = engine
        self.tokenizer: Tokenizer = tokenizer or ByteTokenizer()
        self.work_dir, self.progress = work_dir, progress
        metadata.create_all(engine)

    # -- registry -------------------------------------------------------------------------
    def add(self, name: str, source: str | list[str] | tuple[str, ...], format: str = "text", *,
            text_field: str = "text", text_mode: str = "line", on_bad_rows: str = "error",
            on_changed: str = "reread", holdout: float = 0.05, heldout_split: str = "document",
            exclude: tuple[str, ...] = (), pattern: str | None = None,
            hub_config: str | None = None, split: str = "train",
            exist_ok: bool = False) -> StreamSpec:
        """Register a stream; the source must exist now (except hub names). With
        ``exist_ok`` an identical existing registration is returned instead of an error.
        ``source_warning`` says whether the source likely holds out no text."""
        spec = StreamSpec(name=validate_name(name), source=source, format=format,
                          text_field=text_field, text_mode=text_mode, on_bad_rows=on_bad_rows,
                          on_changed=on_changed, holdout=float(holdout),
                          heldout_split=heldout_split, exclude=tuple(exclude),
                          pattern=pattern, hub_config=hub_config, split=split,
                          created_at=datetime.now(timezone.utc))
        if spec.format != "hub":
            list_files(spec)  # raises SourceNotFoundError naming the missing path
            _refuse_special(spec)
        src = list(spec.sources) if isinstance(spec.source, tuple) else spec.source
        try:
            with write_begin(self.engine) as conn:
                conn.execute(insert(stream_registry), [{
                    "name": spec.name, "source": src, "format": spec.format,
                    "options": spec.options(), "holdout": spec.holdout,
                    "created_at": spec.created_at}])
        except IntegrityError as exc:
            old = self.get(name)
            if exist_ok and old.fingerprint() == spec.fingerprint():
                return old
            raise StreamExistsError(f"stream {name!r} already exists (source {old.source!r})") from exc
        return spec

    @staticmethod
    def _spec(row: Any) -> StreamSpec:
        opts = dict(row.options)
        opts["exclude"] = tuple(opts.get("exclude") or ())
        return StreamSpec(name=row.name, source=row.source, format=row.format,
                          holdout=row.holdout, created_at=row.created_at, **opts)

    def list(self) -> list[StreamSpec]:
        """All streams, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(stream_registry).order_by(stream_registry.c.name)).all()
        return [self._spec(r) for r in rows]

    def get(self, name: str) -> StreamSpec:
        validate_name(name)
        with self.engine.connect() as conn:
            row = conn.execute(select(stream_registry).where(stream_registry.c.name == name)).first()
        if row is None:
            raise StreamNotFoundError(f"no stream named {name!r}")
        return self._spec(row)

    def remove(self, name: str) -> None:
        """Unregister a stream and drop its file index, staged data and held-out docs
        (source files are never touched)."""
        self.get(name)
        with write_begin(self.engine) as conn:
            for table in (stream_files, stream_staged, stream_heldout):
                conn.execute(delete(table).where(table.c.stream == name))
            conn.execute(delete(stream_registry).where(stream_registry.c.name == name))

    # -- data -----------------------------------------------------------------------------
    def iter_ingest(self, name: str, cursor: dict[str, Any] | None, *,
                    token_budget: int | None = None,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[IngestResult]:
        """Stream the new data as chunks (bounded memory); see ``ingest.iter_ingest``."""
        spec = self.get(name)
        index = None if spec.format == "hub" else FileIndex(self.engine, name)
        return iter_ingest(spec, cursor, self.tokenizer, index, chunk_tokens=chunk_tokens,
                           token_budget=token_budget, work_dir=self.work_dir,
                           on_heldout=lambda docs: add_heldout(self.engine, name, docs),
                           progress=self.progress)

    def _key(self, spec: StreamSpec, cursor: dict[str, Any] | None, budget: int | None) -> str:
        return cursor_key(cursor, budget, self.tokenizer.fingerprint, spec.fingerprint())

    def _staged_valid(self, spec: StreamSpec, res: IngestResult) -> bool:
        """A staged result is stale if a file it read has changed since."""
        if spec.format == "hub":
            return True
        index = FileIndex(self.engine, spec.name)
        try:
            for path, fc in res.new_cursor.get("files", {}).items():
                if index.identity(path)[1] != fc["sha256"]:
                    return False
        except Exception:
            return False
        finally:
            index.flush()
        return True

    def ingest(self, name: str, cursor: dict[str, Any] | None = None,
               token_budget: int | None = None, *, use_staged: bool = True,
               stage: bool = False) -> IngestResult:
        """Read, validate, split and tokenize the data new relative to ``cursor``.

        Returns train tokens, held-out tokens, counts and ``new_cursor`` — NOT committed:
        the caller stores ``new_cursor`` with its version. A staged result for the same
        ``(cursor, token_budget)`` is returned if its files are unchanged; ``stage=True``
        stores this result for a later call."""
        spec = self.get(name)
        key = self._key(spec, cursor, token_budget)
        if use_staged:
            res = load_staged(self.engine, name, key)
            if res is not None and self._staged_valid(spec, res):
                return res
        with write_errors(f"ingesting stream {name!r}", NOTHING_STAGED):  # temp copies, the file index
            parts = list(self.iter_ingest(name, cursor, token_budget=token_budget))
        res = IngestResult.merge(parts)
        if stage:
            save_staged(self.engine, key, res)
        return res

    def stage(self, name: str, cursor: dict[str, Any] | None = None,
              token_budget: int | None = None) -> IngestResult:
        """Read and tokenize ahead of the next cycle (``lifelong ingest NAME``)."""
        return self.ingest(name, cursor, token_budget, use_staged=True, stage=True)

    def staged(self, name: str) -> list[StagedInfo]:
        self.get(name)
        return list_staged(self.engine, name)

    def clear_staged(self, name: str) -> int:
        """Drop the stream's staged data (e.g. once a version using it is committed)."""
        self.get(name)
        return clear_staged(self.engine, name)

    def pending(self, name: str, cursor: dict[str, Any] | None = None) -> Pending:
        spec = self.get(name)
        if spec.format == "hub":
            return _pending(spec, cursor, None)  # type: ignore[arg-type]
        return _pending(spec, cursor, FileIndex(self.engine, name))

    def heldout(self, name: str, *, max_docs: int | None = None,
                max_tokens: int | None = None) -> HeldOut:
        """Held-out documents seen so far by any ingest, first-seen order, tokenized (EOS
        after each); capped at ``max_docs`` / ``max_tokens`` (a stable prefix)."""
        self.get(name)
        docs = get_heldout(self.engine, name, max_docs)
        tokens = self.tokenizer.encode_docs(docs)
        if max_tokens is not None and tokens.shape[0] > max_tokens:
            eos = np.flatnonzero(tokens[:max_tokens] == self.tokenizer.eos_id)
            cut = int(eos[-1]) + 1 if eos.size else 0
            docs, tokens = docs[: eos.size], tokens[:cut]
        return HeldOut(stream=name, tokens=tokens, docs=len(docs))

    def source_warning(self, name: str, pending: Pending | None = None) -> str | None:
        """One line if the stream's source (``pending``: its pending estimate, computed
        from the beginning if not given) will likely hold out no text, else None: a few
        documents held out whole (one file in text mode 'file', one long paragraph). For
        ``stream add``."""
        spec = self.get(name)
        if pending is None and spec.format != "hub":
            pending = self.pending(name)
        return advice.source_warning(spec, pending.docs if pending is not None else None)

    def heldout_size(self, name: str, *, enough_tokens: int | None = None) -> tuple[int, int]:
        """``(documents, tokens)`` of the held-out text recorded so far (by any ingest);
        tokens counted only up to ``enough_tokens`` when given."""
        self.get(name)
        tok = self.tokenizer
        count = ((lambda text: len(text.encode("utf-8")) + 1) if isinstance(tok, ByteTokenizer)
                 else (lambda text: len(tok.encode(text)) + 1))
        return heldout_size(self.engine, name, count, enough_tokens)

    def heldout_warning(self, name: str) -> str | None:
        """One line (no trailing period, no "warning:" prefix) when the stream's held-out
        text seen so far is missing or too small for a sound held-out loss (holdout 0, no
        held-out document, fewer than 2 documents/chunks or 1,000 tokens), saying what to
        do; None when it is enough. Call it after the cycle's ingest (which records the
        held-out text it read)."""
        spec = self.get(name)
        docs, tokens = self.heldout_size(name, enough_tokens=advice.MIN_HELDOUT_TOKENS)
        return advice.heldout_warning(spec, docs, tokens)

    def info(self, name: str, cursor: dict[str, Any] | None = None) -> StreamInfo:
        """Spec, pending estimate after ``cursor``, held-out count and staged data."""
        spec = self.get(name)
        try:
            pend: Pending | None = self.pending(name, cursor)
        except Exception:  # a vanished source must not break `stream show`
            pend = None
        docs, tokens = self.heldout_size(name, enough_tokens=advice.MIN_HELDOUT_TOKENS)
        return StreamInfo(spec=spec.to_dict(), pending=pend, heldout_docs=docs,
                          staged=list_staged(self.engine, name),
                          heldout_warning=advice.heldout_warning(spec, docs, tokens))
