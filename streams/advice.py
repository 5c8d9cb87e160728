"""Warnings about a stream's held-out set: too little held-out text to measure a loss.

A stream is evaluated on its held-out text (``split.py``). With the default ``document``
split, a source of one or a few documents (one file in ``text_mode='file'``, one long
paragraph) most likely holds nothing out, and its held-out loss cannot be measured. These
functions say so, in one line, with what to do; the registry exposes them as
``source_warning`` (at ``stream add``) and ``heldout_warning`` (after an ingest, at a cycle).
"""
from __future__ import annotations

from .spec import StreamSpec
from .split import CHUNK_CHARS

MIN_HELDOUT_DOCS = 2         # fewer held-out documents (or chunks) than this: warn
MIN_HELDOUT_TOKENS = 1000    # fewer held-out tokens than this: warn
MIN_EXPECTED_HELDOUT = 2.0   # at `stream add`: pending docs x holdout below this: warn


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _what_is_a_document(spec: StreamSpec) -> str:
    if spec.format == "text":
        return {"file": "text mode 'file': each file is one document",
                "paragraph": "text mode 'paragraph': a document is a blank-line separated paragraph",
                "line": "text mode 'line': a document is a line"}[spec.text_mode]
    return f"a document is one row's '{spec.text_field}'"


def _options(spec: StreamSpec) -> str:
    """The registration options that would hold out more text."""
    if spec.heldout_split == "chunk":
        return "a larger --holdout"
    chunk = f"--heldout-split chunk (holds out ~{CHUNK_CHARS}-character chunks of every document)"
    if spec.format == "text" and spec.text_mode == "file":
        return f"--text-mode paragraph or line, or {chunk}"
    if spec.format == "text" and spec.text_mode == "paragraph":
        return f"--text-mode line, or {chunk}"
    return chunk


def source_warning(spec: StreamSpec, pending_docs: int | None) -> str | None:
    """One line when a newly registered stream will likely hold out no text, given the
    documents pending in its source (``None``: unknown, e.g. a hub dataset); else None."""
    h = float(spec.holdout)
    if h == 0.0:
        return "holdout 0: nothing is held out, so cycles measure no held-out loss on this stream"
    if spec.heldout_split != "document" or pending_docs is None:
        return None
    if pending_docs * h >= MIN_EXPECTED_HELDOUT:
        return None
    file_mode = spec.format == "text" and spec.text_mode == "file"
    if pending_docs == 0 and not file_mode:
        return None  # an empty source says nothing about the size of its documents
    have = "no files pending yet" if pending_docs == 0 else f"only {_plural(pending_docs, 'document')} pending"
    return (f"{have} ({_what_is_a_document(spec)}); documents are held out whole at holdout {h:g}, "
            f"so few or none will be, and a stream without held-out text gets no held-out loss; "
            f"to hold out more, remove the stream and add it again with {_options(spec)}")


def heldout_warning(spec: StreamSpec, docs: int, tokens: int) -> str | None:
    """One line when the held-out text seen so far (``docs`` documents or chunks,
    ``tokens`` tokens; the tokens need only be counted up to ``MIN_HELDOUT_TOKENS``) is
    missing or too small for a sound held-out loss; else None."""
    name, h = spec.name, float(spec.holdout)
    if h == 0.0:
        return f"stream '{name}' holds nothing out (holdout 0): its held-out loss is not measured"
    if docs >= MIN_HELDOUT_DOCS and tokens >= MIN_HELDOUT_TOKENS:
        return None
    unit = "chunk" if spec.heldout_split == "chunk" else "document"
    if docs == 0:
        state = (f"has no held-out text (no {unit} read so far fell in the held-out {h:g}): "
                 "its held-out loss cannot be measured")
    else:
        state = (f"has little held-out text ({_plural(docs, unit)}, {_plural(tokens, 'token')}; "
                 f"a sound loss wants >= {MIN_HELDOUT_DOCS} and >= {MIN_HELDOUT_TOKENS:,}): "
                 "its held-out loss is noisy")
    if spec.heldout_split == "chunk":
        fix = "add more data, or re-register it with a larger --holdout"
    else:
        fix = (f"add more data, or re-register it (`stream remove {name}`, then `stream add` with "
               f"{_options(spec)}; committed data stays consumed)")
    return f"stream '{name}' {state}; {fix}"
