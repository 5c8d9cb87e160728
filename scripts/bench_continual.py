"""Benchmark: does a growing PEER model actually remember, without replay?

The streams in sequence (by default the embedded stdlib -> pydoc -> licenses; `--order` for
another order, `--stream NAME=PATH[:mode]` for your own), the same token budgets and
training settings for every arm:

    dense               dense model (no PEER, FFN everywhere), full fine-tune on each stream
    dense-replay        control: the dense fine-tune with 25% replay
    full                PEER model, full fine-tune (no growth)
    full-replay         control: the PEER full fine-tune with 25% replay
    freeze-experts      PEER, grow + freeze old experts and keys (dense parts train)
    freeze-all          PEER, grow + freeze everything old (only the new rows train)
    freeze-experts-iso  freeze-experts + routing isolation (query anchors keep new keys
                        out of earlier streams' top-k)
    freeze-all-iso      freeze-all + routing isolation
    sparse              sparse memory finetuning: per batch only the top-t experts by TF-IDF
                        against earlier streams' usage train; no growth
    sparse-grow         sparse + growth: new rows (isolated) train in full, old experts
                        only where TF-IDF picks them
    sparse-tN, sparse-grow-tN   the same with top-t = N (a sweep: sparse-t32,sparse-t64,...)
    branch              grow + freeze old experts and keys; the parent's dense weights are kept
                        as a frozen branch that sees only the old experts; prediction mixes the
                        branches by their posterior on the context (lifelong.branches)
    dense-branch        control: branches of the dense model (no growth)
    replay              control: the better of freeze-experts / freeze-all + 25% replay
    replay-distill      control: the same plus distillation to the previous version

Every PEER arm starts from a copy of ONE base store trained once on the first stream
(policy full), the dense arms from a copy of one dense base store. The models match in
active compute per token: every block's FFN is a PEER layer with heads x top_k = 8 x 16 =
128 active expert neurons, or a dense FFN with 128 hidden units.

Per arm: the loss matrix (held-out nats/byte), forgetting, final mean held-out loss, the
new-stream loss after each cycle (plasticity) and the routing retention of each earlier
stream; then a summary and the two targets for the best arm WITHOUT replay (lowest final
mean held-out loss) against the dense fine-tune: (a) mean forgetting <= 10% of the dense
fine-tune's, (b) new-stream loss within 5%; and the recommended arm, memory first: of the
arms without replay meeting (a), the lowest new-stream loss (if none does, the one that
forgets least).

    python scripts/bench_continual.py                 # full run, the default arms (16-19 min here)
    python scripts/bench_continual.py --arms all      # every arm
    python scripts/bench_continual.py --quick         # tiny budgets, a few minutes
    python scripts/bench_continual.py --smoke         # tiny model too, seconds (the test)
    python scripts/bench_continual.py --json --plot arms.png
    python scripts/bench_continual.py --order pydoc,licenses,stdlib --seed 1
    python scripts/bench_continual.py --arms dense,sparse-t4,sparse-t16,sparse-grow-t16   # a top-t sweep
    python scripts/bench_continual.py --stream news=./news/:paragraph --stream tickets=./t.txt:line
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from expert_store import ExpertStore
from lifelong.checkpoint import init_store
from lifelong.config import ModelConfig, PEERConfig, TrainConfig
from lifelong.config import CycleConfig
from lifelong.cycle import run_cycle
from lifelong.evaluate import loss_matrix
from lifelong.model import PEERLM
from lifelong.workspace import open_registry
from streams import register_defaults

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual_report import GROWTH_POLICIES, STREAMS, fmt, print_arm, print_summary, summarise, write_arms_figure  # noqa: E402



@dataclass(frozen=True)
class Arm:
    name: str
    model: str  # "dense" | "peer"
    policy: str | None  # None: the better growth policy, resolved at run time
    replay_ratio: float = 0.0
    distill_weight: float = 0.0
    about: str = ""
    isolation: bool = False  # routing isolation of the growth policies (query anchors)
    sparse_growth: bool = False
    top_t: int | None = None  # policy sparse: None = the cycle's default


ARMS = {
    a.name: a
    for a in (
        Arm("dense", "dense", "full", about="dense model, full fine-tune on each stream"),
        Arm("dense-replay", "dense", "full", 0.25, about="control: dense full fine-tune + 25% replay"),
        Arm("full", "peer", "full", about="PEER, full fine-tune (no growth)"),
        Arm("full-replay", "peer", "full", 0.25, about="control: PEER full fine-tune + 25% replay (no growth)"),
        Arm("freeze-experts", "peer", "freeze-experts", about="PEER, grow + freeze old experts and keys"),
        Arm("freeze-all", "peer", "freeze-all", about="PEER, grow + freeze everything old"),
        Arm("freeze-experts-iso", "peer", "freeze-experts", about="PEER, freeze-experts + routing isolation", isolation=True),
        Arm("freeze-all-iso", "peer", "freeze-all", about="PEER, freeze-all + routing isolation", isolation=True),
        Arm("sparse", "peer", "sparse", about="PEER, sparse memory finetuning: top-t experts per batch by TF-IDF, no growth"),
        Arm("sparse-grow", "peer", "sparse", about="PEER, sparse + growth: new rows (isolated) train, old experts top-t by TF-IDF",
            isolation=True, sparse_growth=True),
        Arm("branch", "peer", "branch", about="PEER, grow + freeze old experts; the parent's dense weights stay as a branch "
            "that sees only the old experts; prediction mixes the branches by their posterior"),
        Arm("dense-branch", "dense", "branch", about="control: the dense model with branches (no growth, no PEER)"),
        Arm("replay", "peer", None, 0.25, about="best growth policy + 25% replay"),
        Arm("replay-distill", "peer", None, 0.25, 1.0, about="best growth policy + 25% replay + distillation"),
    )
}


# The default run (within 30 minutes on the project's 2-core VM): `--arms all` for every arm.
DEFAULT_ARMS = ("dense", "dense-replay", "freeze-experts", "freeze-all-iso", "sparse", "branch", "dense-branch")


def arm_named(name: str) -> Arm | None:
    """A fixed arm, or a sparse arm with its top-t in the name (``sparse-t64``, ``sparse-grow-t32``)."""
    if name in ARMS:
        return ARMS[name]
    base, _, t = name.rpartition("-t")
    if base in ("sparse", "sparse-grow") and t.isdigit() and int(t) > 0:
        return replace(ARMS[base], name=name, top_t=int(t), about=f"{ARMS[base].about} (top-t {int(t)})")
    return None


@dataclass(frozen=True)
class Sizes:
    """Model shape and budgets of one mode."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    block_size: int = 128
    peer_heads: int = 8
    top_k: int = 16
    d_key: int = 64
    n_rows: int = 32
    n_cols: int = 64
    grow_rows: int = 8
    base_budget: int = 400_000  # tokens of stdlib for the base cycle
    budget: int = 200_000  # tokens per growth cycle (pydoc, licenses)
    eval_tokens: int = 100_000  # held-out tokens per stream (a stable prefix of whole documents)
    # Tokens read per stream up front to fill the held-out sets (None: the whole stream).
    # stdlib: its first four held-out files (99,678 tokens) lie in the first 2M tokens;
    # licenses: the whole stream (~1M tokens) holds ~22k held-out tokens.
    heldout_scan: tuple[tuple[str, int | None], ...] = (("stdlib", 2_000_000), ("pydoc", 2_200_000), ("licenses", None))
    batch_size: int = 16
    lr: float = 2e-3
    expert_lr: float = 2e-2
    warmup_steps: int = 20
    epochs: float = 1.0


MODES = {
    "full": Sizes(),
    "quick": Sizes(base_budget=40_000, budget=20_000, eval_tokens=8_192,
                   heldout_scan=(("stdlib", 2_000_000), ("pydoc", 400_000), ("licenses", 200_000))),
    "smoke": Sizes(d_model=32, n_layers=2, n_heads=2, block_size=64, peer_heads=4, top_k=8, d_key=16,
                   n_rows=8, n_cols=8, grow_rows=2, base_budget=6_000, budget=3_000, eval_tokens=3_000,
                   heldout_scan=(("stdlib", 400_000), ("pydoc", 100_000), ("licenses", 150_000)), batch_size=8,
                   warmup_steps=2),
}


def model_configs(s: Sizes) -> dict[str, ModelConfig]:
    """Dense and PEER models of equal active compute: the dense FFN's hidden width equals
    the PEER layer's heads x top_k active expert neurons."""
    active = s.peer_heads * s.top_k
    if active % s.d_model:
        raise SystemExit(f"heads x top_k = {active} must be a multiple of d_model = {s.d_model}")
    peer = PEERConfig(d_model=s.d_model, heads=s.peer_heads, top_k=s.top_k, d_key=s.d_key, n_rows=s.n_rows, n_cols=s.n_cols)
    common = dict(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, block_size=s.block_size, peer=peer)
    return {
        "dense": ModelConfig(ffn_mult=active // s.d_model, peer_layers=[], **common),
        "peer": ModelConfig(ffn_mult=active // s.d_model, peer_layers=list(range(s.n_layers)), **common),
    }


def model_size(mc: ModelConfig) -> dict[str, int]:
    """Total parameters (expert tables included) and active FFN neurons per token per block."""
    with torch.device("meta"):
        m = PEERLM(mc)
    total = sum(p.numel() for p in m.parameters()) + sum(b.numel() for n, b in m.named_buffers() if "expert_" in n)
    experts = sum(layer.num_experts for layer in m.peer_layers().values())
    active = mc.peer.heads * mc.peer.top_k if mc.peer_layers else mc.ffn_mult * mc.d_model
    return {"params": int(total), "experts": int(experts), "active_ffn_neurons": int(active)}


def make_cycle_config(s: Sizes, policy: str, budget: int, seed: int, arm: Arm | None = None) -> CycleConfig:
    train = TrainConfig(batch_size=s.batch_size, lr=s.lr, expert_lr=s.expert_lr, warmup_steps=s.warmup_steps, seed=seed)
    extra: dict[str, Any] = {}
    if arm is not None:
        extra = {"replay_ratio": arm.replay_ratio, "distill_weight": arm.distill_weight, "routing_isolation": arm.isolation,
                 "sparse_growth": arm.sparse_growth, **({"top_t": arm.top_t} if arm.top_t else {})}
    return CycleConfig(policy=policy, grow_rows=s.grow_rows, token_budget=budget, epochs=s.epochs, eval_tokens=s.eval_tokens,
                       seed=seed, train=train, **extra)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cycle_record(result: Any) -> dict[str, Any]:
    m = result.metrics
    return {
        "stream": m["stream"],
        "policy": m["policy"],
        "version": result.version,
        "seconds": round(result.seconds, 1),
        "steps": m["steps"],
        "new_tokens": m["new_tokens"],
        "tokens_per_s": round(m["tokens_per_s"], 1),
        "loss_before": m["loss_before"],
        "loss_new": m["losses"].get(m["stream"]),
        "losses": m["losses"],
        "forgetting": m["forgetting"],
        "mean_forgetting": m["mean_forgetting"],
        "experts": m["experts"],
        "grown_rows": m.get("grown_rows", 0),
        "resumed_optimizer": m.get("resumed_optimizer"),  # AdamW state of the parent resumed (shapes fit)
    }


def parse_user_stream(text: str) -> tuple[str, str, str]:
    """``NAME=PATH[:mode]`` -> (name, path, text mode: line | paragraph | file; default paragraph)."""
    name, sep, rest = text.partition("=")
    path, mode = rest, "paragraph"
    if ":" in rest and rest.rsplit(":", 1)[1] in ("line", "paragraph", "file"):
        path, mode = rest.rsplit(":", 1)
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[:line|paragraph|file], got {text!r}")
    return name, path, mode


def build_base(root: Path, kind: str, mc: ModelConfig, s: Sizes, cache: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """One store per model kind: held-out sets filled, one base cycle on the first stream (policy full)."""
    path = root / f"base-{kind}"
    t0 = time.perf_counter()
    store, _ = init_store(str(path), mc, seed=args.seed)
    streams = args.stream_order
    try:
        registry = open_registry(store, progress=False)
        if args.stream:
            for name, source, mode in args.stream:
                registry.add(name, source, text_mode=mode)
            scans = [(name, None) for name in streams]  # the whole of each user stream
        else:
            register_defaults(registry, cache)
            scans = list(s.heldout_scan)
        # Held-out documents are collected by ingest as it reads (a stable hash split). Read a
        # prefix of every stream once, up front, so that every stream's held-out set is the
        # same, and large enough, in every arm and at every cycle. No cursor moves.
        heldout = {}
        for name, scan in scans:
            registry.ingest(name, None, scan)
            held = registry.heldout(name, max_tokens=s.eval_tokens)
            heldout[name] = {"docs": held.docs, "tokens": int(held.tokens.shape[0])}
        say(f"[base-{kind}] held-out sets (docs/tokens): " + ", ".join(f"{k} {v['docs']}/{v['tokens']}" for k, v in heldout.items()))
        result = run_cycle(store, registry, streams[0], make_cycle_config(s, "full", s.base_budget, args.seed),
                           device=args.device, progress=args.progress, log=lambda m: None)
        rec = cycle_record(result)
        say(f"[base-{kind}] {streams[0]}: {rec['new_tokens']:,} tokens, {rec['steps']} steps, {rec['seconds']:.0f}s "
            f"({rec['tokens_per_s']:.0f} tokens/s), held-out loss {fmt(rec['loss_new'])}")
    finally:
        store.close()
    return path, {"seconds": round(time.perf_counter() - t0, 1), "cycle": rec, "heldout": heldout}


def base_store(root: Path, kind: str, mc: ModelConfig, s: Sizes, cache: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """:func:`build_base`, or with ``--reuse-bases`` the base an earlier run left in the work
    dir when it was built from the same model, sizes, streams and seed."""
    sizes = {k: v for k, v in asdict(s).items() if k not in ("budget", "grow_rows")}  # what the base does not depend on
    key = json.loads(json.dumps({"model": asdict(mc), "sizes": sizes, "streams": args.stream or args.stream_order, "seed": args.seed}))
    record = root / f"base-{kind}.json"
    if args.reuse_bases and record.exists():
        saved = json.loads(record.read_text())
        if saved.get("key") == key:
            say(f"[base-{kind}] reused from {record.parent} (same model, sizes, streams and seed)")
            return root / f"base-{kind}", saved["record"]
        say(f"[base-{kind}] the one in {record.parent} was built differently: building it again")
    shutil.rmtree(root / f"base-{kind}", ignore_errors=True)
    path, rec = build_base(root, kind, mc, s, cache, args)
    record.write_text(json.dumps({"key": key, "record": rec}))
    return path, rec


def run_arm(arm: Arm, policy: str, base: Path, root: Path, s: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    path = root / arm.name
    shutil.rmtree(path, ignore_errors=True)  # a kept arm of an earlier run
    shutil.copytree(base, path)  # the base version, its stream registrations and held-out sets
    t0 = time.perf_counter()
    cycles = []
    store = ExpertStore.open(path)
    try:
        registry = open_registry(store, progress=False)
        for name in args.stream_order[1:]:
            cfg = make_cycle_config(s, policy, s.budget, args.seed, arm)
            result = run_cycle(store, registry, name, cfg, device=args.device, progress=args.progress, log=lambda m: None)
            rec = cycle_record(result)
            cycles.append(rec)
            say(f"[{arm.name}] {name}: {rec['steps']} steps, {rec['seconds']:.0f}s ({rec['tokens_per_s']:.0f} tokens/s), "
                f"new-stream loss {fmt(rec['loss_new'])}, forgetting "
                + ", ".join(f"{k} {v:+.3f}" for k, v in rec["forgetting"].items()))
        chain = list(reversed(store.log("HEAD")))
        matrix = loss_matrix(chain)
        last = chain[-1].metrics
    finally:
        store.close()
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    plasticity = [c["loss_new"] for c in cycles if c["loss_new"] is not None]
    return {
        "arm": arm.name,
        "about": arm.about,
        "model": arm.model,
        "policy": policy + ("+growth" if arm.sparse_growth else ""),
        "replay_ratio": arm.replay_ratio,
        "distill_weight": arm.distill_weight,
        "loss_matrix": matrix.to_dict(),
        "table": matrix.format_table(),
        "forgetting": last["forgetting"],
        "mean_forgetting": last["mean_forgetting"],
        "final_mean_loss": last["mean_heldout_loss"],
        "new_stream_loss": {c["stream"]: c["loss_new"] for c in cycles},
        "mean_new_stream_loss": sum(plasticity) / len(plasticity) if plasticity else None,
        "backward_transfer": last.get("backward_transfer"),
        "forward_transfer": last.get("forward_transfer"),
        "experts": last.get("experts", 0),
        "routing_retention": last.get("routing_retention", {}) if arm.model == "peer" else {},
        "cycles": cycles,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def better_growth_policy(results: dict[str, dict[str, Any]], forced: str | None) -> str:
    """The growth policy the replay arms build on: forced, else the lower final mean loss."""
    if forced:
        return forced
    ran = [results[p] for p in GROWTH_POLICIES if p in results]
    if not ran:
        return "freeze-experts"
    return min(ran, key=lambda r: r["final_mean_loss"])["policy"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny budgets (a few minutes)")
    mode.add_argument("--smoke", action="store_true", help="tiny model and budgets (seconds; the test)")
    p.add_argument("--json", action="store_true", help="one JSON object per arm and a summary on stdout (tables go to stderr)")
    p.add_argument("--budget", type=int, help="tokens per growth cycle (default: by mode; 200000 for the full run)")
    p.add_argument("--grow-rows", type=int, help="rows each growth adds per PEER layer (default: by mode; 8 for the full run: +25%%)")
    p.add_argument("--base-budget", type=int, help="tokens of the base cycle on stdlib (default: by mode; 400000 for the full run)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated, from: {', '.join(ARMS)}, or 'all' (default: {','.join(DEFAULT_ARMS)}: "
                        "the recommended policy, the one it replaced, sparse, the controls; 16-19 minutes on a 2-core CPU)")
    p.add_argument("--replay-policy", choices=GROWTH_POLICIES, help="growth policy of the replay arms (default: the better one)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="where the stores go (default: a temporary directory, removed at the end)")
    p.add_argument("--cache-dir", help="materialised default streams, shared by all stores (default: in the work dir)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--reuse-bases", action="store_true", help="reuse the base stores an earlier run left in --work-dir "
                   "(only when built from the same model, sizes, streams and seed)")
    p.add_argument("--progress", action="store_true", help="training progress bars")
    p.add_argument("--plot", metavar="FILE.png", help="write one figure comparing the arms")
    p.add_argument("--order", help=f"the embedded streams in another order, comma-separated (default: {','.join(STREAMS)})")
    p.add_argument("--stream", action="append", type=parse_user_stream, metavar="NAME=PATH[:MODE]",
                   help="your own stream instead of the embedded ones (repeatable, in order; MODE line | paragraph | file)")
    args = p.parse_args(argv)
    if args.reuse_bases and not args.work_dir:
        p.error("--reuse-bases needs --work-dir (where the earlier run left its bases)")
    if args.stream:
        args.stream_order = [name for name, _, _ in args.stream]
    else:
        args.stream_order = args.order.split(",") if args.order else list(STREAMS)
        if sorted(args.stream_order) != sorted(STREAMS):
            p.error(f"--order must list {', '.join(STREAMS)} once each")
    if len(args.stream_order) < 2 or len(set(args.stream_order)) != len(args.stream_order):
        p.error("give at least two streams, each once")

    names = list(ARMS) if args.arms.strip() == "all" else list(dict.fromkeys(a.strip() for a in args.arms.split(",") if a.strip()))
    unknown = [a for a in names if arm_named(a) is None]
    if unknown or not names:
        p.error(f"unknown arm(s): {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}, sparse-tN, sparse-grow-tN")
    chosen = {a: arm_named(a) for a in names}
    order = list(ARMS)  # fixed order: the replay arms need the growth arms first; a sweep sits after its base arm
    arms = sorted(names, key=lambda a: (order.index(a) if a in ARMS else order.index(a.rpartition("-t")[0]) + 0.5,
                                        chosen[a].top_t or 0))
    s = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.grow_rows is not None and args.grow_rows <= 0:
        p.error("--grow-rows must be positive")
    s = replace(s, budget=args.budget or s.budget, base_budget=args.base_budget or s.base_budget, grow_rows=args.grow_rows or s.grow_rows)
    torch.set_num_threads(args.threads)
    out = sys.stderr if args.json else sys.stdout

    t0 = time.perf_counter()
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_continual_"))
    root.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir) if args.cache_dir else root / "cache"
    configs = model_configs(s)
    sizes = {k: model_size(v) for k, v in configs.items()}
    machine = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads"
    say(f"mode {'smoke' if args.smoke else 'quick' if args.quick else 'full'}: base {s.base_budget:,} tokens on {args.stream_order[0]}, "
        f"{s.budget:,} tokens per growth cycle; arms {', '.join(arms)}; work dir {root}; {machine}")
    for k, v in sizes.items():
        say(f"model {k}: {v['params']:,} parameters, {v['experts']:,} experts, {v['active_ffn_neurons']} active FFN neurons per token per block")
    try:
        bases: dict[str, tuple[Path, dict]] = {}
        for kind in ("dense", "peer"):
            if any(chosen[a].model == kind for a in arms):
                bases[kind] = base_store(root, kind, configs[kind], s, cache, args)
        results: dict[str, dict[str, Any]] = {}
        for name in arms:
            arm = chosen[name]
            policy = arm.policy or better_growth_policy(results, args.replay_policy)
            results[name] = run_arm(arm, policy, bases[arm.model][0], root, s, args)
            print_arm(results[name], out)
            out.flush()
        summary = summarise(results)
        print_summary(results, summary, out, args.stream_order)
        if args.plot:
            say(f"figure: {write_arms_figure(results, args.plot)}")
        total = time.perf_counter() - t0
        print(f"\ntotal {total:.0f}s; {machine}", file=out)
        if args.json:
            for r in results.values():
                print(json.dumps({k: v for k, v in r.items() if k != "table"}))
            print(json.dumps({
                "summary": summary,
                "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
                "sizes": asdict(s),
                "models": {k: {"config": asdict(configs[k]), **sizes[k]} for k in configs},
                "bases": {k: v[1] for k, v in bases.items()},
                "seconds": round(total, 1),
                "machine": machine,
            }))
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
