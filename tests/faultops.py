"""The operations ``faultlib.sweep`` breaks, each with the world it runs on.

A store's first commit and an incremental one (API), ``lifelong ingest``, a cycle's commit
with its cursor move (``run_cycle``, faults from ``commit_model`` on), ``lifelong gc``,
``lifelong rollback``, ``lifelong tag`` and ``lifelong init``: :data:`OPERATIONS`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from faultinject import Injector
from faultlib import Operation, Outcome, api, cli, init_state, objects_state, store_path, store_state



LAYERS = ("blocks.0.peer", "blocks.1.peer")


def _tensors(seed: int, rows: int = 2, n2: int = 4, d: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"row_keys": torch.randn(rows, 4, generator=gen), "u": torch.randn(rows * n2, d, generator=gen),
            "v": torch.randn(rows * n2, d, generator=gen)}


def _dense(seed: int) -> dict[str, torch.Tensor]:
    return {"embed": torch.randn(16, 8, generator=torch.Generator().manual_seed(1000 + seed))}


def _first_commit(store: Any, seed: int = 0) -> Any:
    from expert_store import NewShard

    shards = [NewShard(layer, start, start + 2, 8, _tensors(seed + 10 * i + start), frozen=start == 0)
              for i, layer in enumerate(LAYERS) for start in (0, 2)]
    return store.commit(shards=shards, dense=_dense(seed), optimizer={"step": torch.tensor(seed)},
                        message=f"v{seed}", parent=None, cursors={"s": {"offset": seed}})


def _incremental_commit(store: Any, seed: int = 1) -> Any:
    from expert_store import DeltaShard, ExistingShard, NewShard

    head = store.version()
    shards: list[Any] = []
    for i, layer in enumerate(LAYERS):
        mine = [s for s in head.shards if s.layer == layer]
        shards.append(ExistingShard(mine[0].id))  # frozen: reused as is
        ids = torch.tensor([1], dtype=torch.int64)
        shards.append(DeltaShard(mine[1].id, {"u": (ids, torch.full((1, 8), float(seed)))}))  # a sparse update
        end = max(s.row_end for s in mine)
        shards.append(NewShard(layer, end, end + 2, 8, _tensors(100 + seed + i)))  # growth
    return store.commit(shards=shards, dense=_dense(seed), optimizer={"step": torch.tensor(seed)},
                        message=f"v{seed}", parent=head.id, cursors={"s": {"offset": seed}})


def _prepare_store(versions: int) -> Callable[[Path], None]:
    def prepare(world: Path) -> None:
        from expert_store import ExpertStore

        with ExpertStore.init(store_path(world), {"d_model": 8}) as store:
            if versions >= 1:
                _first_commit(store)
            for seed in range(1, versions):
                _incremental_commit(store, seed)
    return prepare


def _api_on_store(call: Callable[[Any], Any]) -> Callable[[Path, Injector], Outcome]:
    def run(world: Path, inj: Injector) -> Outcome:
        from expert_store import ExpertStore, objects

        writers, objects.WRITERS = objects.WRITERS, 1  # one writer thread: the Nth call is always the same
        try:
            with inj:
                store = ExpertStore.open(store_path(world))
                try:
                    return api(lambda: call(store))
                finally:
                    store.close()
        except Exception as exc:  # noqa: BLE001 - the open itself failed
            return Outcome(error=exc)
        finally:
            objects.WRITERS = writers
    return run


def _cli_on_store(*argv: str) -> Callable[[Path, Injector], Outcome]:
    def run(world: Path, inj: Injector) -> Outcome:
        from expert_store import objects

        writers, objects.WRITERS = objects.WRITERS, 1
        try:
            with inj:
                return cli(world, *argv)
        finally:
            objects.WRITERS = writers
    return run


def commit_first() -> Operation:
    """A store's first commit: 4 new shards (2 layers), dense weights, optimizer state."""
    return Operation("commit-first", _prepare_store(0), _api_on_store(_first_commit), "nothing was committed")


def commit_incremental() -> Operation:
    """A commit on HEAD: per layer a reused frozen shard, a delta shard and a new shard."""
    return Operation("commit-incremental", _prepare_store(1), _api_on_store(_incremental_commit),
                     "nothing was committed")


def rollback() -> Operation:
    """``lifelong rollback 1`` on a store at version 2."""
    return Operation("rollback", _prepare_store(2), _cli_on_store("rollback", "1"), "HEAD was not moved", cli=True)


def tag() -> Operation:
    """``lifelong tag good 1``."""
    return Operation("tag", _prepare_store(2), _cli_on_store("tag", "good", "1"), "no tag 'good' was made", cli=True)


def gc() -> Operation:
    """``lifelong gc``: 3 unreachable objects and a temp file, all older than the grace period."""
    def prepare(world: Path) -> None:
        from expert_store import ExpertStore

        _prepare_store(2)(world)
        with ExpertStore.open(store_path(world)) as store:
            for seed in (7, 8, 9):
                store.objects.put(_tensors(seed))
            some = store.objects.path(next(iter(store.objects.hashes())))
            (some.parent / f".{some.name}.tmp-1-dead").write_bytes(b"half an object")
        old = time.time() - 3600
        for path in (store_path(world) / "objects").rglob("*"):
            os.utime(path, (old, old))

    return Operation("gc", prepare, _cli_on_store("gc"), "no version was changed", state=store_state,
                     final=objects_state, cli=True)


STREAM_TEXT = "\n".join(f"line {i} of the stream: " + "apple banana cherry " * (i % 5 + 1) for i in range(120))


def _prepare_streams(world: Path, model: bool) -> None:
    """A store (a tiny model's, or an empty one) with stream ``a`` registered (text, 120 lines)."""
    from expert_store import ExpertStore
    from lifelong.workspace import open_registry

    src = world / "src"
    src.mkdir()
    (src / "a.txt").write_text(STREAM_TEXT)
    if model:
        from lifelong.checkpoint import init_store

        store, _ = init_store(str(store_path(world)), tiny_model_config())
    else:
        store = ExpertStore.init(store_path(world), {})
        _first_commit(store)
    open_registry(store, progress=False).add("a", str(src / "a.txt"))
    store.close()


def ingest() -> Operation:
    """``lifelong ingest a``: read, tokenize and stage a stream's new data (no cursor moves)."""
    return Operation("ingest", lambda world: _prepare_streams(world, model=False), _cli_on_store("ingest", "a"),
                     "nothing was staged", cli=True)


def tiny_model_config():
    from lifelong.config import ModelConfig, PEERConfig

    peer = PEERConfig(d_model=32, heads=2, top_k=4, d_key=16, n_rows=8, n_cols=8)
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, block_size=64, peer=peer)


def _cycle_run(world: Path, inj: Injector) -> Outcome:
    """One cycle on stream ``a``; faults are injected from its commit on (the commit, its
    cursor move, and what the cycle does after it)."""
    import lifelong.cycle as cycle_module
    from expert_store import ExpertStore, objects
    from lifelong.config import CycleConfig, TrainConfig
    from lifelong.workspace import open_registry

    cfg = CycleConfig(policy="freeze-experts", grow_rows=2, token_budget=2000, eval_tokens=512,
                      train=TrainConfig(batch_size=8))
    real_commit = cycle_module.commit_model
    writers = objects.WRITERS

    def commit_model(*args: Any, **kwargs: Any) -> Any:
        inj.armed = True
        return real_commit(*args, **kwargs)

    store = ExpertStore.open(store_path(world))
    try:
        registry = open_registry(store, progress=False)
        inj.armed = False
        cycle_module.commit_model, objects.WRITERS = commit_model, 1
        with inj:
            return api(lambda: cycle_module.run_cycle(store, registry, "a", cfg, device="cpu", progress=False,
                                                      log=lambda line: None, holder=_gone_holder()))
    finally:
        cycle_module.commit_model, objects.WRITERS = real_commit, writers
        store.close()


def _gone_holder() -> str:
    """A cycle holder name of this host whose process has ended: as in a CLI run, the next
    attempt comes from another process (which may release a lease its release left behind)."""
    import socket
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return f"cli:{socket.gethostname()}:{child.pid}"


def cycle() -> Operation:
    """A growth cycle's commit with its cursor move (``run_cycle`` on a tiny model)."""
    return Operation("cycle-commit", lambda world: _prepare_streams(world, model=True), _cycle_run,
                     "nothing was committed", warm_up=False)  # armed at the commit: the cycle has imported all


TINY_INIT = ("--d-model", "32", "--layers", "2", "--rows", "8", "--cols", "8", "--heads", "2", "--top-k", "4",
             "--d-key", "16")


def init() -> Operation:
    """``lifelong init`` of a tiny model: the store's creation and its first commit."""
    return Operation("init", lambda world: None, _cli_on_store("init", *TINY_INIT), "no store was created",
                     state=init_state, cli=True)


OPERATIONS: dict[str, Callable[[], Operation]] = {
    "commit-first": commit_first,
    "commit-incremental": commit_incremental,
    "ingest": ingest,
    "cycle-commit": cycle,
    "gc": gc,
    "rollback": rollback,
    "tag": tag,
    "init": init,
}
