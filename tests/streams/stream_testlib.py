"""Helpers of the streams tests: write JSONL, split tokens back into documents."""

from __future__ import annotations


def write_jsonl(path, texts, field="text"):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def docs_of(tokens):
    """Split a flat token array (EOS after each doc) back into document texts."""
    from streams import EOS_ID, ByteTokenizer

    tok, out, start = ByteTokenizer(), [], 0
    arr = list(tokens)
    for i, t in enumerate(arr):
        if t == EOS_ID:
            out.append(tok.decode(arr[start:i]))
            start = i + 1
    return out
