"""The stream verbs of the real CLI: stream add/add-defaults/list/show/remove and ingest.

Cursors belong to versions: ingest stages data after HEAD's cursor and never moves it;
committing a version with the new cursor (what a cycle does) is what makes data consumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from expert_store import ExpertStore
from lifelong.checkpoint import checkout_model, commit_model
from lifelong.cli.main import main
from lifelong.cli.streams import STAGED_NOTE
from streams import StreamRegistry

DOCS = [f"document number {i} about streams and cursors" for i in range(20)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def store_dir(tmp_path, tiny_init_flags):
    path = tmp_path / "store"
    assert main(["--store", str(path), "init", *tiny_init_flags]) == 0
    return path


@pytest.fixture()
def data(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    notes = tmp_path / "notes.txt"
    notes.write_text("first line\nsecond line\n\nthird line\n")
    return drop, notes


def run(store_dir, *args, capsys):
    code = main(["--store", str(store_dir), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(store_dir, *args, capsys):
    code, out, err = run(store_dir, *args, "--json", capsys=capsys)
    assert code == 0, err
    return json.loads(out)


def usage_error(store_dir, *args) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["--store", str(store_dir), *args])
    return exc.value.code


def head_cursors(store_dir) -> dict:
    with ExpertStore.open(store_dir) as store:
        return store.version("HEAD").cursors


def commit_cursors(store_dir, cursors: dict) -> None:
    """What a cycle does at its end: a version whose row carries the new cursors."""
    with ExpertStore.open(store_dir) as store:
        model, origin = checkout_model(store, device="cpu")
        commit_model(store, model, origin=origin, message="cycle", cursors={**store.version("HEAD").cursors, **cursors})


def test_add_list_show_ingest_remove(store_dir, data, capsys):
    drop, notes = data
    assert run(store_dir, "stream", "add", "docs", str(drop), "--format", "jsonl", capsys=capsys)[0] == 0
    code, out, _ = run(store_dir, "stream", "add", "notes", str(notes), "--holdout", "0", capsys=capsys)
    assert code == 0 and "added stream notes" in out
    listed = {s["name"]: s for s in run_json(store_dir, "stream", "list", capsys=capsys)}
    assert listed["docs"]["pending"]["docs"] == 20 and listed["docs"]["committed_cursor"] is None
    assert listed["notes"]["holdout"] == 0 and listed["notes"]["pending"]["docs"] == 4
    code, out, _ = run(store_dir, "stream", "list", capsys=capsys)
    assert code == 0 and "pending docs" in out and "notes" in out

    before = head_cursors(store_dir)
    code, out, _ = run(store_dir, "ingest", "docs", capsys=capsys)
    assert code == 0 and STAGED_NOTE in out and "read now" in out
    first = run_json(store_dir, "ingest", "docs", capsys=capsys)  # the same data: reused
    assert first["from_staging"] and first["train_docs"] + first["heldout_docs"] == 20
    assert first["cursor_committed"] is False and head_cursors(store_dir) == before
    shown = run_json(store_dir, "stream", "show", "docs", capsys=capsys)
    assert len(shown["staged"]) == 1 and shown["staged"][0]["from_head_cursor"]
    assert shown["committed_cursor"] is None and shown["pending"]["docs"] == 20

    # a new file in the drop folder: staged again from HEAD's cursor, nothing counted twice
    (drop / "b.jsonl").write_text(json.dumps({"text": "one more document"}) + "\n")
    second = run_json(store_dir, "ingest", "docs", capsys=capsys)
    assert not second["from_staging"] and second["train_docs"] + second["heldout_docs"] == 21
    assert second["files"] == {"new": 2}
    assert len(run_json(store_dir, "stream", "show", "docs", capsys=capsys)["staged"]) == 1
    assert head_cursors(store_dir) == before

    notes_res = run_json(store_dir, "ingest", "notes", "--budget", "12", capsys=capsys)
    assert notes_res["train_docs"] == 2 and not notes_res["exhausted"]
    assert notes_res["remaining"]["docs"] == 2  # an estimate: newlines after the cursor
    code, out, _ = run(store_dir, "stream", "show", "notes", capsys=capsys)
    assert code == 0 and "nothing of this stream committed yet" in out and "staged" in out

    assert run(store_dir, "stream", "remove", "notes", capsys=capsys)[0] == 0
    assert [s["name"] for s in run_json(store_dir, "stream", "list", capsys=capsys)] == ["docs"]
    assert notes.exists()
    code, _, err = run(store_dir, "stream", "show", "notes", capsys=capsys)
    assert code == 1 and "no stream named 'notes'" in err and "hint:" in err


def test_pending_follows_the_committed_cursor(store_dir, data, capsys):
    drop, _ = data
    assert run(store_dir, "stream", "add", "docs", str(drop), "--format", "jsonl", capsys=capsys)[0] == 0
    assert run(store_dir, "ingest", "docs", capsys=capsys)[0] == 0
    with ExpertStore.open(store_dir) as store:  # what the next cycle does: reuse the staged data
        res = StreamRegistry(store.engine).ingest("docs", None)
    assert res.from_staging and res.train_docs + res.heldout_docs == 20
    commit_cursors(store_dir, {"docs": res.new_cursor})
    listed = run_json(store_dir, "stream", "list", capsys=capsys)
    assert listed[0]["pending"]["docs"] == 0 and listed[0]["committed_cursor"] == res.new_cursor
    empty = run_json(store_dir, "ingest", "docs", capsys=capsys)
    assert empty["train_docs"] == empty["heldout_docs"] == 0
    (drop / "b.jsonl").write_text(json.dumps({"text": "dropped after the commit"}) + "\n")
    after = run_json(store_dir, "ingest", "docs", capsys=capsys)
    assert after["train_docs"] + after["heldout_docs"] == 1 and after["files"] == {"new": 1}
    code, out, _ = run(store_dir, "stream", "show", "docs", capsys=capsys)
    assert code == 0 and "HEAD (v2)'s cursor: 20 rows consumed, 1/1 files" in out
    with ExpertStore.open(store_dir) as store:  # rolling back makes the data pending again
        store.rollback(1)
    listed = run_json(store_dir, "stream", "list", capsys=capsys)
    assert listed[0]["committed_cursor"] is None and listed[0]["pending"]["docs"] == 21
    again = run_json(store_dir, "ingest", "docs", capsys=capsys)  # from the beginning again
    assert again["train_docs"] + again["heldout_docs"] == 21 and again["files"] == {"new": 2}


def test_bad_input_and_exit_codes(store_dir, tmp_path, data, monkeypatch, capsys):
    drop, notes = data
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "good one"}\n{"text": broken\n{"body": "no text"}\n')
    assert run(store_dir, "stream", "add", "bad", str(bad), "--format", "jsonl", capsys=capsys)[0] == 0
    before = head_cursors(store_dir)
    code, out, err = run(store_dir, "ingest", "bad", capsys=capsys)
    assert code == 1 and STAGED_NOTE not in out
    assert f"{bad / 'x.jsonl'}, line 2: malformed JSON" in err and "--on-bad-rows skip" in err
    assert head_cursors(store_dir) == before
    assert run_json(store_dir, "stream", "show", "bad", capsys=capsys)["staged"] == []

    res = run_json(store_dir, "ingest", "bad", "--on-bad-rows", "skip", capsys=capsys)
    assert res["bad_rows"] == {"malformed_json": 1, "missing_field": 1}
    assert res["train_docs"] + res["heldout_docs"] == 1 and head_cursors(store_dir) == before
    code, out, _ = run(store_dir, "ingest", "bad", "--on-bad-rows", "skip", capsys=capsys)
    assert "malformed_json=1, missing_field=1" in out and "applies to this staging only" in out
    # a stream registered to skip counts too
    assert run(store_dir, "stream", "add", "bad2", str(bad), "--format", "jsonl", "--on-bad-rows", "skip", capsys=capsys)[0] == 0
    assert run_json(store_dir, "ingest", "bad2", capsys=capsys)["bad_rows"]["malformed_json"] == 1

    # failures: exit 1 with one line (and a hint)
    for args, msg in [
        (("stream", "show", "nope"), "no stream named 'nope'"),
        (("ingest", "nope"), "no stream named 'nope'"),
        (("stream", "remove", "nope"), "no stream named 'nope'"),
        (("stream", "add", "../x", str(notes)), "invalid stream name '../x'"),
        (("stream", "add", "bad", str(notes)), "already exists"),
        (("stream", "add", "gone", str(tmp_path / "missing.txt")), "missing.txt"),
    ]:
        code, _, err = run(store_dir, *args, capsys=capsys)
        assert code == 1 and msg in err and err.startswith("error:"), (args, err)
    code, _, err = run(store_dir, "stream", "add", "x2", str(notes), capsys=capsys)
    assert code == 0

    # usage: exit 2
    assert usage_error(store_dir, "stream", "add") == 2
    assert usage_error(store_dir, "stream", "add", "x", str(notes), "--format", "xml") == 2
    assert usage_error(store_dir, "stream", "add", "x", str(notes), "--holdout", "1.5") == 2
    assert usage_error(store_dir, "ingest", "bad", "--budget", "0") == 2
    assert usage_error(store_dir, "ingest") == 2
    assert run(store_dir, "stream", capsys=capsys)[0] == 2
    monkeypatch.delenv("LIFELONG_STORE", raising=False)
    assert main(["stream", "list"]) == 1 and "no store given" in capsys.readouterr().err


def test_add_defaults(store_dir, tmp_path, monkeypatch, capsys):
    import streams.defaults as defaults

    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "mod.py").write_text('"""A module."""\n\ndef f():\n    return 1\n')
    (lib / "tests").mkdir()
    (lib / "tests" / "test_x.py").write_text("X = 1  # a test module the stdlib stream must skip\n")

    def pydoc(cache_dir):
        out = cache_dir / "pydoc"
        out.mkdir(parents=True, exist_ok=True)
        (out / "topics.jsonl").write_text(json.dumps({"text": "Topic text."}) + "\n")
        return out

    def licenses(cache_dir):
        out = cache_dir / "licenses" / "pkg-1.0"
        out.mkdir(parents=True, exist_ok=True)
        (out / "LICENSE.txt").write_text("Permission is hereby granted.\n")
        return out.parent

    monkeypatch.setattr(defaults, "stdlib_dir", lambda: str(lib))  # the real ones take ~15 s
    monkeypatch.setattr(defaults, "materialise_pydoc", pydoc)
    monkeypatch.setattr(defaults, "materialise_licenses", licenses)
    rows = {r["name"]: r for r in run_json(store_dir, "stream", "add-defaults", capsys=capsys)}
    assert set(rows) == {"stdlib", "pydoc", "licenses"}
    assert rows["stdlib"]["pending"]["files"] == 1  # tests/ excluded
    assert rows["licenses"]["source"].startswith(str(store_dir.resolve() / "cache" / "defaults"))
    code, out, _ = run(store_dir, "stream", "add-defaults", "--names", "pydoc", capsys=capsys)
    assert code == 0 and "registered 1 default streams" in out and "pydoc" in out
    assert usage_error(store_dir, "stream", "add-defaults", "--names", "wikipedia") == 2


def test_ingest_through_a_real_process(store_dir, data, capsys):
    _, notes = data
    assert run(store_dir, "stream", "add", "notes", str(notes), "--holdout", "0", capsys=capsys)[0] == 0
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lifelong.cli.main", "--store", str(store_dir), "ingest", "notes"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train     3 docs" in proc.stdout and STAGED_NOTE in proc.stdout
    assert head_cursors(store_dir) == {}


def one_long_document(lines: int = 240) -> str:
    """~12 KB of lines without a blank one: a single document in paragraph mode."""
    import random

    rng = random.Random(7)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + "\n" for _ in range(lines))


@pytest.fixture()
def report_drop(tmp_path):
    """A drop folder holding one file of one paragraph (issue 11 §6's new user)."""
    from streams import is_heldout

    drop = tmp_path / "reports"
    drop.mkdir()
    text = one_long_document()
    assert not is_heldout(text, 0.05)  # held out whole, this document would be trained on
    (drop / "report.txt").write_text(text)
    return drop


def test_single_document_stream_warns_and_chunk_split_holds_out(store_dir, report_drop, capsys):
    code, out, err = run(store_dir, "stream", "add", "rep", str(report_drop), "--text-mode", "paragraph", capsys=capsys)
    assert code == 0 and "added stream rep" in out
    assert err.startswith("warning: only 1 document pending") and "--text-mode line" in err
    assert "--heldout-split chunk" in err

    code, out, err = run(store_dir, "ingest", "rep", capsys=capsys)
    assert code == 0 and "train     1 docs" in out and "held out  0 docs, 0 tokens" in out
    assert "held-out set so far (what cycles evaluate on): 0 docs, 0 tokens" in out
    assert err.startswith("warning: stream 'rep' has no held-out text") and "--heldout-split chunk" in err
    res = run_json(store_dir, "ingest", "rep", capsys=capsys)
    assert res["stream_heldout"] == {"docs": 0, "tokens": 0} and "no held-out text" in res["heldout_warning"]
    code, out, _ = run(store_dir, "stream", "show", "rep", capsys=capsys)
    assert code == 0 and "  warning      stream 'rep' has no held-out text" in out

    code, out, err = run(store_dir, "stream", "add", "chunked", str(report_drop), "--text-mode", "paragraph",
                         "--heldout-split", "chunk", capsys=capsys)
    assert code == 0 and err == "" and "~512-character chunks" in out
    code, out, err = run(store_dir, "ingest", "chunked", capsys=capsys)
    assert code == 0 and err == ""
    res = run_json(store_dir, "ingest", "chunked", capsys=capsys)
    assert res["heldout_docs"] >= 2 and res["heldout_tokens"] >= 1000 and res["heldout_warning"] is None
    assert res["train_tokens"] + res["heldout_tokens"] == len(one_long_document().encode()) + res["train_docs"] + res["heldout_docs"]
    shown = run_json(store_dir, "stream", "show", "chunked", capsys=capsys)
    assert shown["spec"]["heldout_split"] == "chunk" and shown["heldout_warning"] is None
    assert usage_error(store_dir, "stream", "add", "x", str(report_drop), "--heldout-split", "line") == 2


def test_no_nan_for_a_stream_without_heldout_text(store_dir, report_drop, capsys):
    import re

    nan = re.compile(r"\bnan\b", re.IGNORECASE)
    assert run(store_dir, "stream", "add", "rep", str(report_drop), "--text-mode", "paragraph", capsys=capsys)[0] == 0
    code, out, err = run(store_dir, "train", "--stream", "rep", "--budget", "20000", "--eval-tokens", "2048",
                         "--batch-size", "8", "--device", "cpu", "--no-progress", capsys=capsys)
    assert code == 0, err
    assert not nan.search(out) and "rep - (no held-out text)   mean - (no held-out text)" in out
    code, out, _ = run(store_dir, "versions", capsys=capsys)
    assert code == 0 and not nan.search(out) and "mean_heldout_loss=- (no held-out text)" in out
    code, out, _ = run(store_dir, "show", "HEAD", capsys=capsys)
    assert code == 0 and not nan.search(out)
    assert "  losses: {'rep': -}  (-: no held-out text)" in out.splitlines()
    assert "  loss_before: - (no held-out text)" in out.splitlines()
    code, out, _ = run(store_dir, "eval", capsys=capsys)
    assert code == 0 and not nan.search(out)


def test_add_infers_the_format_from_extensions_and_says_so(store_dir, data, tmp_path, capsys):
    drop, notes = data
    code, out, _ = run(store_dir, "stream", "add", "docs", str(drop / "a.jsonl"), capsys=capsys)
    assert code == 0 and "added stream docs (jsonl)" in out
    assert "format jsonl: inferred from the extension of a.jsonl; pass --format to choose another" in out
    assert run_json(store_dir, "stream", "list", capsys=capsys)[0]["pending"]["docs"] == 20
    code, out, _ = run(store_dir, "stream", "add", "dropped", str(drop), capsys=capsys)
    assert code == 0 and "added stream dropped (jsonl)" in out
    code, out, err = run(store_dir, "stream", "add", "notes", str(notes), "--json", capsys=capsys)
    res = json.loads(out)
    assert res["spec"]["format"] == "text" and res["format_inferred"] == "inferred from the extension of notes.txt"
    assert err.startswith("note: format text: inferred")
    code, out, _ = run(store_dir, "stream", "add", "forced", str(drop), "--format", "text", capsys=capsys)
    assert code == 0 and "(text)" in out and "inferred" not in out
    (drop / "readme.md").write_text("about this folder\n")
    code, _, err = run(store_dir, "stream", "add", "mixed", str(drop), capsys=capsys)
    assert code == 1 and "several formats (" in err and "1 jsonl (e.g. a.jsonl)" in err and "pass --format" in err
    code, out, _ = run(store_dir, "stream", "add", "mixed", str(drop), "--pattern", "*.jsonl", capsys=capsys)
    assert code == 0 and "added stream mixed (jsonl)" in out


def test_add_refuses_a_fifo_or_device_and_never_blocks(store_dir, tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for source in (fifo, "/dev/zero"):
        code, _, err = run(store_dir, "stream", "add", "hostile", str(source), capsys=capsys)
        assert code == 1 and err.startswith("error: stream 'hostile': source ") and len(err.splitlines()) <= 2
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "a.txt").write_text("alpha\n")
    os.mkfifo(drop / "b.txt")
    assert run(store_dir, "stream", "add", "d", str(drop), capsys=capsys)[0] == 0
    code, _, err = run(store_dir, "ingest", "d", capsys=capsys)
    assert code == 1 and "b.txt: is a FIFO" in err
    res = run_json(store_dir, "ingest", "d", "--on-bad-rows", "skip", capsys=capsys)
    assert res["bad_rows"] == {"unreadable": 1} and res["train_docs"] + res["heldout_docs"] == 1
