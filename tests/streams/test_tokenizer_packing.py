from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from streams import (EOS_ID, PAD_ID, BlockPacker, ByteTokenizer, TokenizerError, load_tokenizer,
                     pack_blocks, pack_documents)


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 and tok.eos_id == 256 and tok.pad_id == 257
    text = "héllo wörld ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids + [EOS_ID, PAD_ID]) == text
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # errors="replace"
    flat = tok.encode_docs(["ab", "", "é"])
    assert flat.dtype == np.uint16
    assert flat.tolist() == [97, 98, EOS_ID, EOS_ID, 0xC3, 0xA9, EOS_ID]


def test_tokenizers_json_is_optional(monkeypatch):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(TokenizerError, match="pip install tokenizers") as info:
        load_tokenizer("/nonexistent/tokenizer.json")
    assert isinstance(info.value.__cause__, ImportError)


class _FakeTokenizer:
    """The part of ``tokenizers.Tokenizer`` that ``HFTokenizer`` uses: one id per word."""

    VOCAB = {"<eos>": 0, "<pad>": 1, "a": 2, "b": 3}

    @classmethod
    def from_file(cls, path):
        if not path.endswith(".json"):
            raise Exception("bad file")
        return cls()

    def get_vocab_size(self, with_added_tokens):
        return len(self.VOCAB)

    def token_to_id(self, token):
        return self.VOCAB.get(token)

    def encode(self, text, add_special_tokens):
        return types.SimpleNamespace(ids=[self.VOCAB[w] for w in text.split()])

    def encode_batch(self, texts, add_special_tokens):
        return [self.encode(t, add_special_tokens) for t in texts]


def test_hf_tokenizer_wraps_a_tokenizers_file(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=_FakeTokenizer))
    path = tmp_path / "tok.json"
    path.write_text("{}")
    tok = load_tokenizer(path, eos_token="<eos>")
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (4, 0, 0)  # pad falls back to EOS
    assert tok.fingerprint.startswith("hf-") and tok.encode("a b a") == [2, 3, 2]
    flat = tok.encode_docs(["a b", "", "b"])
    assert flat.dtype == np.uint16 and flat.tolist() == [2, 3, 0, 0, 3, 0]
    assert tok.encode_docs([]).shape == (0,)
    assert load_tokenizer(path, eos_token="<eos>", pad_token="<pad>").pad_id == 1
    with pytest.raises(TokenizerError, match="EOS token"):
        load_tokenizer(path)  # the default <|endoftext|> is not in this vocabulary
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path / "tok.txt")


def test_pack_blocks_layout_and_padding():
    tokens = np.arange(10, dtype=np.uint16)
    b = pack_blocks(tokens, 4, seed=None)
    assert b.shape == (3, 5)
    assert b[0].tolist() == [0, 1, 2, 3, 4] and b[1].tolist() == [4, 5, 6, 7, 8]
    assert b[2].tolist() == [8, 9, PAD_ID, PAD_ID, PAD_ID]
    assert pack_blocks(tokens, 4, seed=None, drop_last=True).shape == (2, 5)
    # every token (but the shared boundaries) appears once as a target
    assert sorted(b[:, 1:].ravel()[b[:, 1:].ravel() != PAD_ID].tolist()) == list(range(1, 10))


def test_pack_is_deterministic_per_seed():
    docs = [f"document {i} " * (i % 7 + 1) for i in range(50)]
    a = pack_documents(docs, 16, seed=3)
    b = pack_documents(docs, 16, seed=3)
    c = pack_documents(docs, 16, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    plain = pack_documents(docs, 16, seed=None)
    as_rows = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert as_rows(a) == as_rows(c) == as_rows(plain)  # shuffling permutes whole blocks
    # unshuffled blocks overlap by one token: undoing that gives the stream, then padding
    stream = ByteTokenizer().encode_docs(docs)
    flat = np.concatenate([plain[0]] + [row[1:] for row in plain[1:]])
    assert np.array_equal(flat[: stream.shape[0]], stream) and (flat[stream.shape[0]:] == PAD_ID).all()
    assert (stream == EOS_ID).sum() == 50  # EOS after every doc


def test_block_packer_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=1000).astype(np.uint16)
    packer = BlockPacker(32)
    parts = [packer.add(tokens[i:i + 77]) for i in range(0, 1000, 77)] + [packer.flush()]
    assert np.array_equal(np.concatenate(parts), pack_blocks(tokens, 32, seed=None))
