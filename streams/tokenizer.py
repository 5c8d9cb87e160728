"""Tokenizers: the byte-level default and an optional ``tokenizers`` JSON file.

Both give flat numpy arrays in which every document is followed by ``eos_id``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import TokenizerError

EOS_ID, PAD_ID, BOS_ID, RESERVED_ID = 256, 257, 258, 259


class Tokenizer(Protocol):
    """What ``streams`` needs of a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def encode_docs(self, texts: Sequence[str]) -> np.ndarray: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte ``b`` -> id ``b``; 256 EOS, 257 PAD, 258 BOS, 259 reserved."""

    vocab_size = 260
    eos_id, pad_id, bos_id = EOS_ID, PAD_ID, BOS_ID
    fingerprint = "byte-260"

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no EOS added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; special ids are dropped, bad UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_docs(self, texts: Sequence[str]) -> np.ndarray:
        """All ``texts`` in one flat uint16 array, each followed by EOS (vectorised)."""
        encoded = [t.encode("utf-8") for t in texts]
        lens = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        out = np.empty(int(lens.sum()) + len(encoded), dtype=np.uint16)
        eos_pos = np.cumsum(lens + 1) - 1  # (n_docs,)
        mask = np.ones(out.shape[0], dtype=bool)
        mask[eos_pos] = False
        out[mask] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        out[eos_pos] = EOS_ID
        return out


class HFTokenizer:
    """A ``tokenizers`` JSON file (optional dependency, imported only here)."""

    def __init__(self, path: str | Path, eos_token: str = "<|endoftext|>",
                 pad_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as exc:
            raise TokenizerError(
                "a tokenizer JSON file needs the optional 'tokenizers' package "
                "(pip install tokenizers); without it use the default byte tokenizer"
            ) from exc
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{path}: cannot load tokenizer JSON: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._tok.token_to_id(eos_token)
        if eos is None:
            raise TokenizerError(f"{path}: EOS token {eos_token!r} is not in the vocabulary")
        self.eos_id = eos
        pad = self._tok.token_to_id(pad_token) if pad_token else None
        self.pad_id = eos if pad is None else pad
        self.fingerprint = "hf-" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        self._dtype = token_dtype(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids])

    def encode_docs(self, texts: Sequence[str]) -> np.ndarray:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        parts: list[np.ndarray] = []
        eos = np.array([self.eos_id], dtype=self._dtype)
        for e in encs:
            parts.append(np.asarray(e.ids, dtype=self._dtype))
            parts.append(eos)
        return np.concatenate(parts) if parts else np.empty(0, dtype=self._dtype)


def load_tokenizer(path: str | Path | None = None, **kwargs: str) -> ByteTokenizer | HFTokenizer:
    """The byte tokenizer if ``path`` is None, else the ``tokenizers`` JSON at ``path``."""
    return ByteTokenizer() if path is None else HFTokenizer(path, **kwargs)
