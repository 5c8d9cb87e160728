"""Token streams -> fixed-length training blocks.

Layout: a block is ``block_len + 1`` consecutive tokens of the flat stream (documents
separated by EOS), so ``x = blocks[:, :-1]`` and ``y = blocks[:, 1:]``; block ``i`` starts
at token ``i * block_len`` (consecutive blocks share one token, none is wasted). The
last, partial block is padded with ``pad_id`` (targets equal to ``pad_id`` are to be
ignored by the loss) unless ``drop_last``. Block order is shuffled by ``seed``
(deterministic); ``seed=None`` keeps stream order.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .tokenizer import PAD_ID, ByteTokenizer, Tokenizer


def pack_blocks(tokens: np.ndarray, block_len: int, *, pad_id: int = PAD_ID,
                seed: int | None = 0, drop_last: bool = False) -> np.ndarray:
    """Cut a flat token array into ``(n_blocks, block_len + 1)`` blocks (see module doc)."""
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    tokens = np.asarray(tokens)
    n = tokens.shape[0]
    if n < 2:
        return np.empty((0, block_len + 1), dtype=tokens.dtype)
    n_full = (n - 1) // block_len  # blocks whose block_len+1 tokens all exist
    n_blocks = n_full if drop_last or (n - 1) % block_len == 0 else n_full + 1
    need = n_blocks * block_len + 1
    if need > n:
        tokens = np.concatenate([tokens, np.full(need - n, pad_id, dtype=tokens.dtype)])
    starts = np.arange(n_blocks, dtype=np.int64) * block_len  # (n_blocks,)
    if seed is not None:
        starts = starts[np.random.default_rng(seed).permutation(n_blocks)]
    idx = starts[:, None] + np.arange(block_len + 1, dtype=np.int64)[None, :]  # (n_blocks, L+1)
    return tokens[idx]


def pack_documents(docs: Iterable[str], block_len: int, *, tokenizer: Tokenizer | None = None,
                   seed: int | None = 0, drop_last: bool = False) -> np.ndarray:
    """Tokenize ``docs`` (EOS after each) and ``pack_blocks`` them."""
    tok = tokenizer or ByteTokenizer()
    return pack_blocks(tok.encode_docs(list(docs)), block_len, pad_id=tok.pad_id,
                       seed=seed, drop_last=drop_last)


class BlockPacker:
    """Streaming packer: feed token chunks, get full blocks; the remainder carries over.

    Memory stays at one chunk plus less than one block, whatever the stream's length.
    Blocks come out in stream order; ``flush()`` returns the padded last block.
    """

    def __init__(self, block_len: int, pad_id: int = PAD_ID) -> None:
        self.block_len, self.pad_id = block_len, pad_id
        self._rest: np.ndarray | None = None

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens``; return every block now complete, ``(n, block_len + 1)``."""
        buf = tokens if self._rest is None else np.concatenate([self._rest, tokens])
        n_full = max(buf.shape[0] - 1, 0) // self.block_len
        self._rest = buf[n_full * self.block_len:]  # keeps the shared boundary token
        return pack_blocks(buf[: n_full * self.block_len + 1], self.block_len,
                           seed=None, drop_last=True) if n_full else \
            np.empty((0, self.block_len + 1), dtype=buf.dtype)

    def flush(self) -> np.ndarray:
        """The last partial block, padded (empty if nothing is left)."""
        rest, self._rest = self._rest, None
        if rest is None or rest.shape[0] < 2:
            return np.empty((0, self.block_len + 1), dtype=np.uint16)
        return pack_blocks(rest, self.block_len, pad_id=self.pad_id, seed=None)
