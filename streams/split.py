"""Held-out split by a stable hash of each document's content.

A document is held out iff ``sha1(utf8(text))``, read as a 64-bit fraction, is below the
stream's ``holdout`` fraction. Membership depends only on the text and the fraction, so it
never changes as the stream grows, and a held-out document is never trained on (even if
it appears again, in another file or another stream).
"""
from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def doc_hash(text: str) -> str:
    """sha1 hex digest of a document's UTF-8 bytes."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def is_heldout(text: str, fraction: float) -> bool:
    """True if ``text`` belongs to the held-out split at ``fraction``."""
    if fraction <= 0.0:
        return False
    h = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / _SCALE < fraction
