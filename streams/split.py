"""Held-out split by a stable hash of content: of each document, or of each chunk of it.

``document`` (the default): a document is held out iff ``sha1(utf8(text))``, read as a
64-bit fraction, is below the stream's ``holdout`` fraction. Membership depends only on
the text and the fraction, so it never changes as the stream grows, and a held-out
document is never trained on (even if it appears again, in another file or another stream).

``chunk`` (opt-in per stream, for streams of few, long documents): every document is cut
into chunks of about ``CHUNK_CHARS`` characters (whole lines where it can, see
``chunks``) and a chunk is held out by the same rule applied to the chunk's text. The
runs of training chunks between held-out ones are the training documents. Chunk
boundaries depend only on the text before them, so membership still depends only on
content: the stream growing never moves text between the splits.
"""
from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)
HELDOUT_SPLITS = ("document", "chunk")
CHUNK_CHARS = 512


def doc_hash(text: str) -> str:
    """sha1 hex digest of a document's UTF-8 bytes."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def is_heldout(text: str, fraction: float) -> bool:
    """True if ``text`` belongs to the held-out split at ``fraction``."""
    if fraction <= 0.0:
        return False
    h = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / _SCALE < fraction


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into consecutive pieces (joined, they are ``text``).

    A piece ends after the first newline at or after ``size`` characters, or at ``size``
    characters when no newline comes before ``2 * size``; the rest (at most ``size``
    characters) is the last piece. Each cut depends only on the text before it, so a
    document that grows keeps all but its last one or two pieces.
    """
    out: list[str] = []
    start, n = 0, len(text)
    while n - start > size:
        nl = text.find("\n", start + size - 1, start + 2 * size)
        end = nl + 1 if nl >= 0 else start + size
        out.append(text[start:end])
        start = end
    if start < n:
        out.append(text[start:])
    return out


def split_document(text: str, fraction: float, how: str = "document") -> tuple[list[str], list[str]]:
    """``(train, held_out)`` texts of one document under the split ``how`` (see module doc).

    ``document``: the document itself goes to one side. ``chunk``: held-out chunks (never
    blank ones) are held-out texts; each run of other chunks between them is one training
    text (blank ones are dropped, as blank documents are).
    """
    if how == "document":
        return ([], [text]) if is_heldout(text, fraction) else ([text], [])
    train: list[str] = []
    held: list[str] = []
    run: list[str] = []
    for piece in chunks(text):
        if piece.strip() and is_heldout(piece, fraction):
            train.append("".join(run))
            run = []
            held.append(piece)
        else:
            run.append(piece)
    train.append("".join(run))
    return [t for t in train if t.strip()], held
