"""The store verbs of the real CLI: init, versions, show, tag, diff, rollback, checkout, verify, gc, status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from expert_store import ExpertStore
from lifelong import ConfigError, LifelongError
from lifelong.checkpoint import checkout_model, commit_model
from lifelong.cli import store as store_verbs
from lifelong.cli.main import main


@pytest.fixture()
def store_dir(tmp_path, tiny_init_flags):
    path = tmp_path / "store"
    assert main(["--store", str(path), "init", *tiny_init_flags]) == 0
    store = ExpertStore.open(path)
    model, origin = checkout_model(store, device="cpu")
    for layer in model.peer_layers().values():
        layer.freeze()
        layer.grow(2)
    commit_model(store, model, origin=origin, message="grown", metrics={"mean_heldout_loss": 3.5})
    store.close()
    return path


def run(store_dir, *args, capsys):
    code = main(["--store", str(store_dir), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_history_and_rollback_round_trip(store_dir, capsys):
    code, out, _ = run(store_dir, "versions", "--json", capsys=capsys)
    versions = json.loads(out)
    assert code == 0 and [v["id"] for v in versions] == [1, 2]
    assert versions[1]["experts"] == 80 and versions[1]["metrics"]["mean_heldout_loss"] == 3.5
    assert run(store_dir, "tag", "base", "1", capsys=capsys)[0] == 0
    code, out, _ = run(store_dir, "diff", "base", "HEAD", "--json", capsys=capsys)
    diff = json.loads(out)
    assert diff["layers"]["blocks.1.ffn"]["experts_added"] == 16
    code, out, _ = run(store_dir, "rollback", "HEAD~1", capsys=capsys)
    assert code == 0 and "2 -> 1" in out
    assert ExpertStore.open(store_dir).head() == 1
    assert run(store_dir, "rollback", "2", capsys=capsys)[0] == 0  # roll forward again
    code, out, _ = run(store_dir, "show", "HEAD", "--json", capsys=capsys)
    assert json.loads(out)["id"] == 2
    code, out, _ = run(store_dir, "checkout", "base", "--device", "cpu", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["layers"]["blocks.1.ffn"]["experts"] == 64
    assert run(store_dir, "verify", capsys=capsys)[0] == 0
    assert run(store_dir, "status", capsys=capsys)[0] == 0
    code, out, _ = run(store_dir, "gc", "--dry-run", capsys=capsys)
    assert code == 0 and "would delete 0" in out


def test_checkout_budget_and_corruption_are_clear_errors(store_dir, capsys):
    code, _, err = run(store_dir, "checkout", "--device", "cpu", "--budget-mb", "0.01", capsys=capsys)
    assert code == 1 and "budget" in err and "Traceback" not in err
    # Flip a byte in the grown version's new shard: verify and checkout catch it; v1 still works.
    store = ExpertStore.open(store_dir)
    new_shard = [s for s in store.version(2).shards if s.id not in {x.id for x in store.version(1).shards}][0]
    obj = store_dir / "objects" / new_shard.object_hash[:2] / new_shard.object_hash[2:]
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    code, out, _ = run(store_dir, "verify", capsys=capsys)
    assert code == 1 and new_shard.object_hash[:12] in out
    code, _, err = run(store_dir, "checkout", "HEAD", "--device", "cpu", capsys=capsys)
    assert code == 1 and f"shard {new_shard.id}" in err
    assert run(store_dir, "rollback", "1", capsys=capsys)[0] == 0
    assert run(store_dir, "checkout", "HEAD", "--device", "cpu", capsys=capsys)[0] == 0


def test_bad_input_exit_codes(tmp_path, store_dir, tiny_init_flags, capsys):
    assert run(store_dir, "show", "nope", capsys=capsys)[0] == 1
    assert run(tmp_path / "not-a-store", "versions", capsys=capsys)[0] == 1
    code, _, err = run(store_dir, "init", *tiny_init_flags, capsys=capsys)
    assert code == 1 and "error:" in err
    with pytest.raises(SystemExit) as exc:
        main(["--store", str(store_dir), "rollback"])  # missing argument: usage error
    assert exc.value.code == 2


class Refused(LifelongError):
    """An error raised on purpose, with a hint."""

    hint = "do the other thing"


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys, debug):
    def buggy(args):
        raise ValueError("a bug, not a refusal")

    monkeypatch.setattr(store_verbs, "cmd_versions", buggy)
    with pytest.raises(ValueError, match="a bug"):  # propagates: Python prints the traceback
        main([*debug, "--store", str(tmp_path), "versions"])
    assert "error:" not in capsys.readouterr().err


def test_a_refusal_is_one_line_and_debug_reraises_it(tmp_path, monkeypatch, capsys):
    errors = iter([Refused("refused on purpose"), Refused("no hint here", hint=""),
                   ConfigError("invalid config field 'x'"),  # a ValueError too, but raised on purpose
                   Refused("shown in full")])

    def refuse(args):
        raise next(errors)

    monkeypatch.setattr(store_verbs, "cmd_versions", refuse)
    argv = ["--store", str(tmp_path), "versions"]
    assert main(argv) == 1
    assert capsys.readouterr().err == "error: refused on purpose\nhint: do the other thing\n"
    assert main(argv) == 1
    assert capsys.readouterr().err == "error: no hint here\n"
    assert main(argv) == 1
    assert capsys.readouterr().err == "error: invalid config field 'x'\n"
    with pytest.raises(Refused, match="shown in full"):
        main(["--debug", *argv])


def test_real_subprocess_cli(store_dir):
    env = {**os.environ, "LIFELONG_STORE": str(store_dir)}
    proc = subprocess.run([sys.executable, "-m", "lifelong.cli.main", "versions"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "grown" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lifelong.cli.main", "show", "v99"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_generate_samples_from_any_version(store_dir, capsys):
    code, out, _ = run(store_dir, "generate", "1", "--prompt", "ab", "--tokens", "12", "--device", "cpu", "--json", capsys=capsys)
    first = json.loads(out)
    assert code == 0 and first["version"] == 1 and first["text"].startswith("ab")
    code, again, _ = run(store_dir, "generate", "1", "--prompt", "ab", "--tokens", "12", "--device", "cpu", "--json", capsys=capsys)
    assert json.loads(again)["text"] == first["text"]  # seeded
    code, out, _ = run(store_dir, "generate", "HEAD", "--temperature", "0", "--tokens", "5", "--device", "cpu", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["version"] == 2
    assert run(store_dir, "generate", "v9", capsys=capsys)[0] == 1
