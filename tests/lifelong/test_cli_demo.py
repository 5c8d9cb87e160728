"""`lifelong demo` end to end on the real embedded streams, with a tiny model and budgets."""

from __future__ import annotations

import dataclasses

import pytest

from expert_store import ExpertStore
from lifelong.cli import demo
from lifelong.cli.main import main


@pytest.fixture()
def tiny_demo(monkeypatch, tiny_config, request, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The materialised default streams are a function of this Python: keep them across runs
    # in pytest's cache (as test_bench_continual does) instead of rebuilding them per store.
    cache = request.config.cache.mkdir("demo_defaults") if getattr(request.config, "cache", None) else tmp_path / "defaults"
    monkeypatch.setattr(demo, "defaults_cache_dir", lambda store: cache)
    monkeypatch.setattr(demo, "demo_model_config", lambda: tiny_config(n_cols=16, block_size=32))
    real = demo._cycle_config

    def small(first, quick, seed):
        cfg = real(first, quick, seed)
        return dataclasses.replace(cfg, token_budget=3000, eval_tokens=1024, train=dataclasses.replace(cfg.train, batch_size=8))

    monkeypatch.setattr(demo, "_cycle_config", small)


def test_demo_runs_the_whole_loop_and_resumes(tmp_path, capsys, tiny_demo):
    path = tmp_path / "demo"
    assert main(["demo", "--quick", "--dir", str(path), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for section in ("== stdlib: base training", "== pydoc: growth cycle", "== licenses: growth cycle",
                    "== audit", "rollback: HEAD 4 -> 3", "roll forward: HEAD -> 4", "loss matrix", "sample from version",
                    "tensorboard --logdir"):
        assert section in out, section
    store = ExpertStore.open(path)
    head = store.version("HEAD")
    assert head.id == 4 and set(head.cursors) == {"stdlib", "pydoc", "licenses"}
    assert head.n_experts > store.version(2).n_experts  # grown
    assert store.verify() == []
    # Re-running in the same directory resumes: nothing is trained twice.
    assert main(["demo", "--quick", "--dir", str(path), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "resuming the demo store" in out and out.count("already trained") == 3
    assert store.head() == 4


def test_demo_refuses_a_non_empty_non_store_directory(tmp_path, capsys, tiny_demo):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("mine")
    assert main(["demo", "--dir", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "not an expert store" in capsys.readouterr().err
    assert (tmp_path / "x" / "file.txt").read_text() == "mine"
