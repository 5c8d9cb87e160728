"""Shared by the cycle tests: tiny streams, a store, the a -> b -> c chain of cycles."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from expert_store import ExpertStore
from lifelong.checkpoint import init_store
from lifelong.config import CycleConfig, ModelConfig, TrainConfig
from lifelong.cycle import run_cycle
from lifelong.records import CycleRow
from streams import StreamRegistry

GROW = 2
BUDGET = 20_000  # more than each stream holds: one cycle consumes a stream


def _lines(kind: str, n: int = 200, seed: int = 0) -> str:
    rng = random.Random(seed)
    if kind == "a":  # lowercase prose about fruit
        words = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
        return "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(n))
    if kind == "b":  # arithmetic
        return "\n".join(f"{rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1999)} ; "
                         f"{rng.randint(0, 99)} * {rng.randint(0, 99)}" for _ in range(n))
    return "\n".join("".join(rng.choice("XYZ#@!") for _ in range(50)) for _ in range(n))  # symbols


def make_store(root: Path, model: ModelConfig) -> Path:
    """A fresh store of ``model`` with streams a, b, c registered (sources under ``root/src``)."""
    src = root / "src"
    src.mkdir(parents=True)
    store, _ = init_store(str(root / "store"), model)
    reg = registry(store)
    for name in "abc":
        (src / f"{name}.txt").write_text(_lines(name))
        reg.add(name, str(src / f"{name}.txt"))
    store.close()
    return root / "store"


def registry(store: ExpertStore) -> StreamRegistry:
    work = Path(store.path) / "streams"
    work.mkdir(exist_ok=True)
    return StreamRegistry(store.engine, work_dir=str(work))


def cfg(policy: str = "freeze-experts", **kw) -> CycleConfig:
    return CycleConfig(policy=policy, grow_rows=GROW, token_budget=BUDGET, eval_tokens=2048,
                       train=TrainConfig(batch_size=8), **kw)


def cycle(store: ExpertStore, stream: str, config: CycleConfig | None = None, log=lambda s: None, **kw):
    return run_cycle(store, registry(store), stream, config or cfg(), device="cpu", progress=False, log=log, **kw)


def cycle_rows(store: ExpertStore) -> list[CycleRow]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(CycleRow.__table__).order_by(CycleRow.id)))


def experts_by_layer(info) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in info.shards:
        out[s.layer] = out.get(s.layer, 0) + s.n_experts
    return out


def old_tables_equal(parent_model, child_model) -> bool:
    """Old rows' keys, their experts' u/v and the column keys: all bit-identical?"""
    for name, old in parent_model.peer_layers().items():
        new = child_model.peer_layers()[name]
        n = old.num_experts
        if not (torch.equal(old.expert_u, new.expert_u[:n]) and torch.equal(old.expert_v, new.expert_v[:n])
                and torch.equal(old.all_row_keys(), new.all_row_keys()[: old.n_rows])
                and torch.equal(old.col_keys, new.col_keys)):
            return False
    return True


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_config) -> Path:
    return make_store(tmp_path_factory.mktemp("base"), tiny_config())


@pytest.fixture(scope="module")
def chain(tmp_path_factory, base):
    """a (freeze-experts asked; the untrained base makes it full) -> b (freeze-experts) ->
    c (freeze-all), on a copy of ``base``; with each cycle's log lines."""
    path = tmp_path_factory.mktemp("chain") / "store"
    shutil.copytree(base, path)
    store = ExpertStore.open(path)
    expected = {s: registry(store).ingest(s, None, BUDGET, use_staged=False) for s in "abc"}
    logs: dict[str, list[str]] = {s: [] for s in "abc"}
    results = {s: cycle(store, s, cfg(p), log=logs[s].append) for s, p in (("a", "freeze-experts"), ("b", "freeze-experts"),
                                                                          ("c", "freeze-all"))}
    return store, results, expected, logs


@pytest.fixture()
def after_a(tmp_path, chain):
    """A private store whose HEAD is the chain's version after cycle a (b, c pending)."""
    store, results, _, _ = chain
    path = tmp_path / "store"
    shutil.copytree(store.path, path)
    copy = ExpertStore.open(path)
    copy.rollback(results["a"].version, why="test: back to after cycle a")
    yield copy
    copy.close()
