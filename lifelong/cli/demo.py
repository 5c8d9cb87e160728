"""`lifelong demo`: the whole loop on embedded data, no downloads, no configuration.

Creates a store, registers the embedded default streams (standard-library source, Python's
documentation topics and docstrings, licence texts), trains the base model on the first,
runs a growth cycle for each further stream (printing the loss-matrix row and forgetting),
audits retrieval with FAISS, shows a rollback and roll-forward, and prints a summary with
samples from the first and last version. Re-running in the same directory resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from expert_store import ExpertStore, NotAStoreError

from ..audit_version import audit_version
from ..checkpoint import checkout_model, init_store
from ..config import CycleConfig, ModelConfig, PEERConfig, TrainConfig
from ..cycle import run_cycle
from ..evaluate import loss_matrix
from ..model import resolve_device, sample_text
from ..monitor import Monitor
from ..workspace import defaults_cache_dir, open_registry, tensorboard_dir
from .common import add_parser, print_table

STREAMS = ("stdlib", "pydoc", "licenses")  # code, technical English, legal English


def demo_model_config() -> ModelConfig:
    peer = PEERConfig(d_model=128, heads=4, top_k=8, d_key=64, n_rows=32, n_cols=64)
    return ModelConfig(d_model=128, n_layers=4, n_heads=4, block_size=128, peer=peer)


def _cycle_config(first: bool, quick: bool, seed: int) -> CycleConfig:
    budget = (40_000 if first else 15_000) if quick else (2_000_000 if first else 600_000)
    train = TrainConfig(batch_size=16, lr=2e-3, expert_lr=2e-2, warmup_steps=20, seed=seed)
    return CycleConfig(  # growth cycles: the default policy (branch), no replay
        policy="full" if first else "branch",
        grow_rows=8,
        token_budget=budget,
        eval_tokens=8_192 if quick else 65_536,
        seed=seed,
        train=train,
    )


def _sample(store: ExpertStore, version: int, device: object, seed: int) -> str:
    return sample_text(checkout_model(store, version, device=device)[0], "def ", 120, seed=seed)


def run_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    path = Path(args.store or args.dir)
    device = resolve_device(args.device)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        store = ExpertStore.open(path, url=args.url)
        print(f"resuming the demo store at {path}: HEAD -> version {store.head()}, {len(store.versions())} versions")
    except NotAStoreError:
        if path.exists() and any(path.iterdir()):
            raise
        store, info = init_store(str(path), demo_model_config(), url=args.url, seed=args.seed)
        print(f"created store {path} (version {info.id}: fresh model, {info.n_experts} experts), device {device}")

    registry = open_registry(store, progress=progress)
    t = time.perf_counter()
    from streams import register_defaults

    register_defaults(registry, defaults_cache_dir(store))
    print(f"embedded streams registered ({time.perf_counter() - t:.0f}s): " + ", ".join(STREAMS))
    monitor = Monitor(tensorboard_dir(store))
    try:
        done = set(store.version("HEAD").cursors)
        for i, stream in enumerate(STREAMS):
            if stream in done:
                print(f"- {stream}: already trained in this store (skipped)")
                continue
            what = "base training (policy full)" if i == 0 else "growth cycle (policy branch: grow, the old dense weights kept as a branch; no replay)"
            print(f"\n== {stream}: {what}")
            result = run_cycle(
                store, registry, stream, _cycle_config(i == 0, args.quick, args.seed),
                device=device, monitor=monitor, progress=progress,
            )
            m = result.metrics
            row = "  ".join(f"{s}={v:.3f}" for s, v in m["losses"].items() if v is not None)
            forget = "  ".join(f"{s}={v:+.3f}" for s, v in m["forgetting"].items()) or "-"
            print(f"   version {result.version}: {m['new_tokens']:,} new tokens, {m['steps']} steps, "
                  f"{m['tokens_per_s']:.0f} tokens/s, {m['experts']:,} experts")
            print(f"   held-out loss (nats/byte): {row}")
            print(f"   forgetting (nats, + = worse): {forget}")
            retention = "  ".join(f"{s}={v:.1%}" for s, v in m.get("routing_retention", {}).items() if v is not None)
            if retention:
                print(f"   routing retention (router weight of earlier streams still on their experts): {retention}")

        print("\n== audit: FAISS exact top-k vs product-key retrieval on held-out text of every stream")
        report = audit_version(store, registry, "HEAD", max_queries=256 if args.quick else 2048, progress=progress, monitor=monitor)
        print(report.format_table(per_head=False))

        head = store.head()
        chain = list(reversed(store.log("HEAD")))
        if len(chain) >= 2:
            print("\n== rollback and roll forward (nothing is deleted)")
            t = time.perf_counter()
            store.rollback("HEAD~1", why="demo: rollback")
            print(f"   rollback: HEAD {head} -> {store.head()} in {(time.perf_counter() - t) * 1e3:.1f} ms")
            store.rollback(head, why="demo: roll forward")
            print(f"   roll forward: HEAD -> {store.head()}")
    finally:
        monitor.close()

    print("\n== summary")
    print_table(
        ["version", "experts", "shards", "message"],
        [(v.id, f"{v.n_experts:,}", len(v.shards), v.message) for v in chain],
    )
    print("\nloss matrix (held-out nats/byte; rows: versions, columns: streams)")
    print(loss_matrix(chain).format_table())
    print(f"\naudit recall@k: {report.total.recall:.4f} (up to float ties: {report.total.recall_up_to_ties:.4f})")
    first = next((v.id for v in chain if v.metrics.get("stream")), chain[0].id)
    print(f"\nsample from version {first} (after base training):\n{_sample(store, first, device, args.seed)}")
    print(f"\nsample from version {head} (after all cycles):\n{_sample(store, head, device, args.seed)}")
    print(f"\nTensorBoard logs: tensorboard --logdir {tensorboard_dir(store)}")
    print(f"explore: lifelong --store {path} versions | eval | show HEAD | diff HEAD~1 HEAD | audit")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0 if report.passed() else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "demo",
        "run the whole loop on embedded data: base training, growth cycles, audit, rollback",
        "lifelong demo --quick --dir /tmp/demo",
    )
    p.add_argument("--dir", default="lifelong-demo", help="store directory (default ./lifelong-demo; --store wins)")
    p.add_argument("--quick", action="store_true", help="small token budgets (about 2 minutes on 2 CPU cores)")
    p.add_argument("--device", help="cpu, cuda, ... (default: GPU if there is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (hidden anyway when stderr is not a terminal)")
    p.set_defaults(func=run_demo)
