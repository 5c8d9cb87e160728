"""The reading loop: data new relative to a cursor -> validated, split, tokenized chunks.

``iter_ingest`` yields ``IngestResult`` chunks, each ending at a document boundary with
the cursor just after its last row, so a consumer may stop after any chunk; memory stays
at one chunk whatever the stream's size. Nothing here writes a cursor anywhere: the
caller commits ``new_cursor`` with its model version (exactly-once is the caller's
transaction; a crash before it re-reads the same rows).
"""
from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from .cursor import Cursor, FileCursor
from .errors import BadInputError, ChangedFileError
from .fileindex import FileIndex
from .result import MAX_EXAMPLES, FileReport, IngestResult
from .sources import list_files, read_hub_rows, read_rows, text_of
from .spec import StreamSpec
from .split import split_document
from .tokenizer import Tokenizer
from .validate import check_file, write_sanitized

DEFAULT_CHUNK_TOKENS = 1 << 20


class _Chunk:
    """Documents gathered for the next ``IngestResult``."""

    def __init__(self) -> None:
        self.train: list[str] = []
        self.held: list[str] = []
        self.rows = 0
        self.bytes = 0
        self.bad: Counter[str] = Counter()
        self.examples: list[str] = []
        self.files: dict[str, FileReport] = {}

    @property
    def est_tokens(self) -> int:  # exact for the byte tokenizer
        return self.bytes + len(self.train) + len(self.held)

    def report(self, path: str, status: str, **kw: Any) -> FileReport:
        if path not in self.files:
            self.files[path] = FileReport(path, status, **kw)
        return self.files[path]


class _Reader:
    """One ingest pass over one stream (state shared by the helpers below)."""

    def __init__(self, spec: StreamSpec, cursor: dict[str, Any] | None, tokenizer: Tokenizer,
                 index: FileIndex | None, *, chunk_tokens: int, token_budget: int | None,
                 work_dir: str, on_heldout: Callable[[list[str]], None], progress: bool) -> None:
        self.spec, self.tok, self.index = spec, tokenizer, index
        self.cur = Cursor.from_json(cursor)
        self.prev_json = cursor
        self.chunk_tokens, self.budget = chunk_tokens, token_budget
        self.work_dir, self.on_heldout, self.progress = work_dir, on_heldout, progress
        self.acc = _Chunk()
        self.emitted = 0

    # -- policy -------------------------------------------------------------------------
    def bad(self, err: BadInputError) -> None:
        """Stop on ``err`` (default) or count it by kind (``on_bad_rows='skip'``)."""
        if self.spec.on_bad_rows == "error":
            raise err
        self.acc.bad[err.kind] += 1
        if len(self.acc.examples) < MAX_EXAMPLES:
            self.acc.examples.append(str(err))

    # -- chunks -------------------------------------------------------------------------
    def threshold(self) -> int:
        if self.budget is None:
            return self.chunk_tokens
        return max(1, min(self.chunk_tokens, self.budget - self.emitted))

    def budget_spent(self) -> bool:
        return self.budget is not None and self.emitted >= self.budget

    def emit(self, exhausted: bool) -> IngestResult:
        acc, self.acc = self.acc, _Chunk()
        if acc.held:
            self.on_heldout(acc.held)
        new = self.cur.to_json()
        res = IngestResult(
            stream=self.spec.name, cursor=self.prev_json, new_cursor=new,
            train_tokens=self.tok.encode_docs(acc.train),
            heldout_tokens=self.tok.encode_docs(acc.held),
            train_docs=len(acc.train), heldout_docs=len(acc.held), rows=acc.rows,
            bytes=acc.bytes, bad_rows=dict(acc.bad), bad_examples=acc.examples,
            files=list(acc.files.values()), exhausted=exhausted)
        self.prev_json = new
        self.emitted += res.train_token_count + res.heldout_token_count
        return res

    def consume(self, batches: Iterable[tuple[int, list[Any]]], label: str,
                set_pos: Callable[[int, int], None], report: FileReport | None) -> Iterator[IngestResult]:
        """Feed rows to the chunk; after each row ``set_pos(rows_done, bytes)`` moves the
        cursor; yields a chunk whenever it is full (a row boundary)."""
        field = "text" if self.spec.format == "text" else self.spec.text_field
        holdout, how = float(self.spec.holdout), self.spec.heldout_split
        acc = self.acc
        for row0, values in batches:
            for i, value in enumerate(values):
                row = row0 + i
                try:
                    text = text_of(value, label, row, field)
                except BadInputError as err:
                    self.bad(err)
                    text = ""
                acc.rows += 1
                if text.strip():
                    nbytes = len(text.encode("utf-8"))
                    acc.bytes += nbytes
                    train, held = split_document(text, holdout, how)
                    acc.train.extend(train)
                    acc.held.extend(held)
                    if report is not None:
                        report.docs += 1
                else:
                    nbytes = 0
                if report is not None:
                    report.rows += 1
                set_pos(row + 1, nbytes)
                if acc.est_tokens >= self.threshold():
                    yield self.emit(exhausted=False)
                    acc = self.acc
                    if self.budget_spent():
                        return
                    if report is not None:  # the file continues in the next chunk
                        report = acc.report(report.path, "resumed")

    # -- files --------------------------------------------------------------------------
    def run_files(self) -> Iterator[IngestResult]:
        assert self.index is not None
        paths = list_files(self.spec)
        for path in tqdm(paths, desc=f"ingest {self.spec.name}", unit="file",
                         disable=not self.progress):
            yield from self.run_file(path)
            if self.budget_spent():
                return
        yield self.emit(exhausted=True)

    def run_file(self, path: str) -> Iterator[IngestResult]:
        spec, index = self.spec, self.index
        entry = self.cur.files.get(path)
        try:
            if entry is not None:
                size, sha = index.identity(path)
                if sha == entry.sha256 and entry.done:
                    return
            st = index.stat(path)
            check = check_file(path, spec.format, spec.text_field,
                               stop_at_first=spec.on_bad_rows == "error")
        except BadInputError as err:
            self.acc.report(path, "bad")
            self.bad(err)
            return
        index.record(path, check.size, st.st_mtime_ns, check.sha256)
        start, status, action, old = 0, "new", None, None
        if entry is not None and entry.sha256 == check.sha256:
            start, status = entry.rows, "resumed"
        elif entry is not None:
            status, action, old = "changed", spec.on_changed, entry.sha256
            if spec.on_changed == "error":
                raise ChangedFileError(path, entry.sha256, check.sha256)
        report = self.acc.report(path, status, action=action, old_sha256=old,
                                 new_sha256=check.sha256 if old else None)
        entry = FileCursor(size=check.size, sha256=check.sha256, rows=start,
                           bytes=entry.bytes if status == "resumed" else 0)
        self.cur.files[path] = entry
        if action == "skip":
            entry.done = report.done = True
            return
        if check.fatal is not None:
            report.status = "bad"
            self.bad(check.fatal)
            entry.done = report.done = True
            return
        read_path = None
        if check.bad_lines:
            if spec.on_bad_rows == "error":
                raise check.bad_lines[0][1]
            if start == 0:
                for _, err in check.bad_lines:
                    self.bad(err)
            read_path = write_sanitized(check, self.work_dir)

        def set_pos(rows: int, nbytes: int) -> None:
            entry.rows = rows
            entry.bytes += nbytes

        try:
            yield from self.consume(read_rows(spec, path, start, read_path), path, set_pos, report)
        except BadInputError as err:  # the reader gave up inside the file (a CSV parse error)
            self.bad(err)  # skip: counted; the rows before it are kept, the file is consumed
            entry.done = self.acc.report(path, "resumed").done = True
            return
        if self.budget_spent():
            return  # stopped on the budget, maybe mid-file: the cursor says where
        entry.done = True
        self.acc.report(path, "resumed").done = True

    # -- hub ----------------------------------------------------------------------------
    def run_hub(self) -> Iterator[IngestResult]:
        def set_pos(rows: int, _nbytes: int) -> None:
            self.cur.rows = rows

        yield from self.consume(read_hub_rows(self.spec, self.cur.rows),
                                self.spec.sources[0], set_pos, None)
        if not self.budget_spent():
            yield self.emit(exhausted=True)


def iter_ingest(spec: StreamSpec, cursor: dict[str, Any] | None, tokenizer: Tokenizer,
                index: FileIndex | None, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                token_budget: int | None = None, work_dir: str | None = None,
                on_heldout: Callable[[list[str]], None] = lambda docs: None,
                progress: bool = False) -> Iterator[IngestResult]:
    """Yield chunks of the data new relative to ``cursor`` (see module doc). The last
    chunk has ``exhausted=True`` unless ``token_budget`` stopped the reading (the budget
    may be exceeded by less than one document)."""
    # A temp dir that cannot be removed is left for `lifelong gc` rather than failing the ingest.
    with tempfile.TemporaryDirectory(prefix="streams-", dir=work_dir, ignore_cleanup_errors=True) as tmp:
        reader = _Reader(spec, cursor, tokenizer, index, chunk_tokens=chunk_tokens,
                         token_budget=token_budget, work_dir=tmp, on_heldout=on_heldout,
                         progress=progress)
        if spec.format == "hub":
            yield from reader.run_hub()
        else:
            try:
                yield from reader.run_files()
            finally:
                index.flush()
