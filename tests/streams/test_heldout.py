"""Held-out text of streams of few, long documents: the ``chunk`` split and the warnings."""
from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
from sqlalchemy import insert

from stream_testlib import docs_of, write_jsonl
from streams import SpecError, is_heldout, split_document
from streams.advice import MIN_HELDOUT_TOKENS, heldout_warning, source_warning
from streams.schema import stream_registry
from streams.spec import StreamSpec
from streams.split import CHUNK_CHARS, chunks

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def long_text(seed: int, lines: int = 1200) -> str:
    """~60 KB of lines without a blank one: one document in paragraph (and file) mode."""
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + "\n"
                   for _ in range(lines))


def test_chunks_cover_the_text_and_keep_their_cuts_as_it_grows():
    text = long_text(0)
    pieces = chunks(text)
    assert "".join(pieces) == text and len(pieces) > 50
    assert all(CHUNK_CHARS <= len(p) < 2 * CHUNK_CHARS for p in pieces[:-1])
    assert all(p.endswith("\n") for p in pieces)  # cut after whole lines where it can
    for cut in (5_000, 20_001, len(text) - 3):  # a prefix keeps all but its last pieces
        head = chunks(text[:cut])
        assert head[:-2] == pieces[: len(head) - 2]
    blob = "x" * (5 * CHUNK_CHARS + 7)  # no newline at all: hard cuts
    assert [len(p) for p in chunks(blob)] == [CHUNK_CHARS] * 5 + [7]
    assert chunks("") == [] and chunks("short") == ["short"]


def test_chunk_split_is_disjoint_content_only_and_covers_the_document():
    text = long_text(1)
    pieces = chunks(text)
    train, held = split_document(text, 0.05, "chunk")
    assert held == [p for p in pieces if is_heldout(p, 0.05)] and train
    assert "".join(train) == "".join(p for p in pieces if not is_heldout(p, 0.05))
    assert len(train) <= len(held) + 1 and all(t in text for t in train)
    # the document grows (text appended): every held-out chunk but the last two stays held out
    _, grown = split_document(text + long_text(2), 0.05, "chunk")
    assert set(held) - set(pieces[-2:]) <= set(grown)
    # document split: the whole document goes to one side
    assert split_document(text, 0.05, "document") in (([text], []), ([], [text]))
    assert split_document("  \n", 0.99, "chunk") == ([], [])  # blank text: nowhere


def test_chunk_stream_holds_out_text_of_a_single_document_stably(registry, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    first = long_text(3)
    assert not is_heldout(first, 0.05)  # as a document, it would be trained on whole
    (drop / "a.txt").write_text(first)
    registry.add("doc", str(drop), "text", text_mode="paragraph")
    registry.add("chunked", str(drop), "text", text_mode="paragraph", heldout_split="chunk")
    assert registry.get("chunked").heldout_split == "chunk"
    assert registry.get("doc").heldout_split == "document"

    whole = registry.ingest("doc")
    assert (whole.train_docs, whole.heldout_docs) == (1, 0)
    res = registry.ingest("chunked")
    train, held = docs_of(res.train_tokens), docs_of(res.heldout_tokens)
    assert res.heldout_docs == len(held) >= 2 and res.heldout_token_count >= MIN_HELDOUT_TOKENS
    assert res.train_docs == len(train) and abs(len(train) - len(held)) <= 1
    assert sum(map(len, train + held)) == len(first)  # nothing lost, nothing twice
    assert not set(held) & set(train)
    assert docs_of(registry.heldout("chunked").tokens) == held

    # the stream grows (a second document): the held-out set only grows
    (drop / "b.txt").write_text(long_text(4))
    more = registry.ingest("chunked", res.new_cursor)
    assert more.train_docs and docs_of(registry.heldout("chunked").tokens)[: len(held)] == held
    # and reading it all again from the beginning splits the first document the same way
    again = registry.ingest("chunked", None, use_staged=False)
    assert set(held) <= set(docs_of(again.heldout_tokens))
    assert not set(docs_of(again.heldout_tokens)) & set(docs_of(again.train_tokens))


def test_old_registrations_keep_the_document_split(registry, tmp_path):
    src = write_jsonl(tmp_path / "d" / "a.jsonl", [f"doc {i}" for i in range(50)])
    with registry.engine.begin() as conn:  # a row written before the option existed
        conn.execute(insert(stream_registry), [{
            "name": "legacy", "source": str(src), "format": "jsonl",
            "options": {"text_field": "text", "text_mode": "line", "on_bad_rows": "error",
                        "on_changed": "reread", "exclude": [], "pattern": None,
                        "hub_config": None, "split": "train"},
            "holdout": 0.2, "created_at": datetime.now(timezone.utc)}])
    spec = registry.get("legacy")
    assert spec.heldout_split == "document"
    held = docs_of(registry.ingest("legacy").heldout_tokens)
    assert held == [f"doc {i}" for i in range(50) if is_heldout(f"doc {i}", 0.2)]
    with pytest.raises(SpecError):
        registry.add("bad", str(src), "jsonl", heldout_split="sentence")


def test_source_warning_at_add(registry, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text(long_text(5))
    registry.add("para", str(one), "text", text_mode="paragraph")
    warning = registry.source_warning("para")
    assert "only 1 document pending" in warning and "paragraph" in warning
    assert "--text-mode line" in warning and "--heldout-split chunk" in warning
    assert registry.pending("para").docs == 1  # paragraph estimate counts the last one

    empty = tmp_path / "drop"
    empty.mkdir()
    registry.add("files", str(empty), "text", text_mode="file")
    warning = registry.source_warning("files")
    assert "no files pending yet" in warning and "each file is one document" in warning
    registry.add("lines-empty", str(empty), "text", text_mode="line")
    assert registry.source_warning("lines-empty") is None  # nothing known about its documents

    registry.add("lines", str(one), "text", text_mode="line")  # 1,200 lines
    assert registry.source_warning("lines") is None
    registry.add("chunked", str(one), "text", text_mode="paragraph", heldout_split="chunk")
    assert registry.source_warning("chunked") is None
    registry.add("none", str(one), "text", holdout=0.0)
    assert "holdout 0" in registry.source_warning("none")
    spec = StreamSpec(name="hub", source="some/dataset", format="hub")
    assert source_warning(spec, None) is None


def test_heldout_warning_after_ingest(registry, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text(long_text(3))
    registry.add("para", str(one), "text", text_mode="paragraph")
    assert "has no held-out text" in registry.heldout_warning("para")  # nothing read yet
    registry.ingest("para")
    warning = registry.heldout_warning("para")
    assert warning.startswith("stream 'para' has no held-out text") and "nan" not in warning
    assert "--heldout-split chunk" in warning and "stream remove para" in warning
    assert registry.info("para").heldout_warning == warning

    registry.add("chunked", str(one), "text", text_mode="paragraph", heldout_split="chunk")
    registry.ingest("chunked")
    assert registry.heldout_warning("chunked") is None and registry.info("chunked").heldout_warning is None
    docs, tokens = registry.heldout_size("chunked")
    assert docs >= 2 and tokens == registry.heldout("chunked").tokens.shape[0]
    assert registry.heldout_size("chunked", enough_tokens=10)[1] < tokens

    few = write_jsonl(tmp_path / "few" / "a.jsonl", [f"short {i}" for i in range(200)])
    registry.add("few", str(few.parent), "jsonl")
    registry.ingest("few")
    docs, tokens = registry.heldout_size("few")
    assert docs >= 2 and tokens < MIN_HELDOUT_TOKENS
    assert "has little held-out text" in registry.heldout_warning("few")

    registry.add("none", str(one), "text", holdout=0.0)
    assert "holds nothing out" in registry.heldout_warning("none")
    chunk_spec = StreamSpec(name="c", source="x", heldout_split="chunk")
    assert "larger --holdout" in heldout_warning(chunk_spec, 0, 0)
    assert heldout_warning(chunk_spec, 5, MIN_HELDOUT_TOKENS) is None
