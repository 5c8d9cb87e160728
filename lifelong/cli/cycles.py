"""Cycle verbs: `cycle` (one growth cycle on a stream) and `eval` (the loss matrix; `--plot` draws it).

`cycle` is thin over :func:`lifelong.cycle.run_cycle`: the same function the scheduler and
the tests call. SIGTERM/SIGINT ask it to stop after the current step; a stopped cycle
writes no version (exit 130). A second Ctrl-C aborts at once (still no version: the commit
is one transaction).

Several processes: ``--nproc N`` reruns the same command under ``torchrun`` (``python -m
torch.distributed.run --standalone``) on N local processes; ``torchrun ... -m lifelong cycle
...`` does the same across hosts. Rank 0 prints, holds the lease and commits
(:mod:`lifelong.distributed`); ``--expert-parallel`` splits the expert tables along d_model.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from expert_store import ExpertStore

from ..config import CycleConfig, add_cycle_flags, cycle_config
from ..cycle import CycleInterrupted, CycleResult, HeadMovedError
from ..errors import CLIError, LifelongError
from ..evaluate import LossMatrix, continual_metrics, loss_matrix
from ..workspace import open_registry, tensorboard_dir
from .common import NO_HELDOUT, add_parser, fmt, missing, open_store, print_json, print_table
from .streams import stream_hints

EXIT_INTERRUPTED = 130


class _StopFlag:
    """SIGTERM/SIGINT set the flag (the cycle stops after its current step); a second
    signal restores the default handlers, so another Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.set = False
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.set

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: stopping after the current step; no version will be written "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        old: dict[int, Any] = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, the flag stays unset
            pass
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def _print_result(res: CycleResult, store: ExpertStore, cfg: CycleConfig, parent_experts: int) -> None:
    m = res.metrics
    head = store.head()
    print(f"cycle {res.cycle_id}: stream '{res.stream}', policy {res.policy}, "
          f"{m.get('new_docs', 0):,} docs / {m.get('new_tokens', 0):,} tokens, {m.get('steps')} steps "
          f"in {res.seconds:.1f}s")
    losses = m.get("losses", {})
    mean = m.get("mean_heldout_loss")
    print("held-out loss (nats/token): "
          + "  ".join(f"{s} {fmt(v)}" + (NO_HELDOUT if v is None else "") for s, v in losses.items())
          + f"   mean {fmt(mean)}" + (NO_HELDOUT if missing(mean) and all(v is None for v in losses.values()) else ""))
    forgetting = m.get("forgetting", {})
    limit = "" if cfg.max_forgetting is None else f" (guard: max {cfg.max_forgetting:g})"
    print("forgetting (nats, > 0 is worse): "
          + ("  ".join(f"{s} {fmt(v, '+.3f')}" for s, v in forgetting.items()) or "none (no earlier stream)") + limit)
    branches = f", {m['branches']} frozen branches (prediction mixes them)" if m.get("branches") else ""
    print(f"experts: {m.get('experts')} (+{m.get('experts', 0) - parent_experts}){branches}, "
          f"train loss {fmt(m.get('train_loss'))}, {m.get('tokens_per_s', 0):,.0f} tokens/s")
    if res.accepted:
        print(f"committed version {res.version}: HEAD {res.parent} -> {head}")
    else:
        worst = max(forgetting.values(), default=0.0)
        msg = (f"GUARD FAILED: forgetting {worst:.3f} nats > max_forgetting {cfg.max_forgetting:g}. "
               f"Version {res.version} kept as '{res.ref}'; HEAD stays at {head} (automatic rollback).")
        print(msg)
        print(f"  inspect: lifelong --store {store.path} show {res.ref}   "
              f"adopt anyway: lifelong --store {store.path} rollback {res.ref}")
        print(f"warning: {msg}", file=sys.stderr)


def _launch(args: argparse.Namespace, cfg: CycleConfig) -> int:
    """``--nproc N``: check the layout, then become ``torchrun`` running this command on N processes."""
    from ..distributed import check_layout, relaunch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("--nproc given inside a torchrun launch", hint="use either --nproc N or torchrun, not both")
    store = open_store(args, read_only=True)
    d_model = int(store.config.get("model", {}).get("d_model", 0)) or None
    store.close()
    check_layout(args.nproc, cfg.train.batch_size, d_model, args.expert_parallel)
    return relaunch(getattr(args, "argv", None) or sys.argv[1:], args.nproc)


def cmd_cycle(args: argparse.Namespace) -> int:
    from ..distributed import RankError, init_from_env, shutdown

    cfg = cycle_config(args, file=args.config)
    if args.nproc is not None and args.nproc > 1:
        return _launch(args, cfg)
    dist = init_from_env(args.device, expert_parallel=args.expert_parallel)
    try:
        return _cmd_cycle(args, cfg, dist)
    except RankError:  # rank 0 failed and said why; say nothing twice
        return 1
    except HeadMovedError:
        if dist is not None and not dist.is_main:
            return 1  # rank 0 says it
        raise
    finally:
        shutdown()


def _cmd_cycle(args: argparse.Namespace, cfg: CycleConfig, dist) -> int:  # noqa: ANN001
    from ..cycle import run_cycle
    from ..monitor import Monitor

    main = dist is None or dist.is_main
    if dist is not None:
        from ..distributed import check_layout

        try:
            check_layout(dist.world, cfg.train.batch_size, None, False)
        except LifelongError:
            if main:
                raise
            return 1  # rank 0 says it
    store = open_store(args, read_only=not main and not args.expert_parallel)  # expert parallel: every rank writes its columns
    log_to = sys.stderr if args.json else sys.stdout
    flag = _StopFlag()
    with stream_hints(args.store):
        registry = open_registry(store)
        registry.get(args.stream)  # an unknown stream fails before any event file is made
    monitor = Monitor(tensorboard_dir(store)) if main else None
    try:
        with stream_hints(args.store), flag.installed():
            head = store.head()
            parent_experts = store.version(head).n_experts if head is not None else 0
            result = run_cycle(
                store,
                registry,
                args.stream,
                cfg,
                device=args.device,
                monitor=monitor,
                progress=main and not args.no_progress and sys.stderr.isatty(),
                should_stop=flag,
                wait_s=args.wait,
                log=(lambda line: print(line, file=log_to, flush=True)) if main else (lambda line: None),
                dist=dist,
            )
    except CycleInterrupted as exc:
        if main:
            print(f"interrupted: {exc}; HEAD stays at {store.head()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if monitor is not None:
            monitor.close()
    if not main:
        return 0
    if args.json:
        print_json({
            "cycle": result.cycle_id,
            "stream": result.stream,
            "policy": result.policy,
            "version": result.version,
            "parent": result.parent,
            "ref": result.ref,
            "accepted": result.accepted,
            "head": store.head(),
            "seconds": result.seconds,
            "experts_added": result.metrics.get("experts", 0) - parent_experts,
            "config": store.version(result.version).config["run"]["cycle"],  # as resolved and saved with the version
            "metrics": result.metrics,
        })
    else:
        _print_result(result, store, cfg, parent_experts)
    if flag.set:
        print(f"note: {flag.signal} came after training; the version was complete and is committed", file=sys.stderr)
    return 0


def _nproc(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 1, got {text!r}")
    return n


def _plot_size(text: str) -> tuple[int, int]:
    """``WxH`` in pixels (``--plot-size``)."""
    w, sep, h = text.lower().partition("x")
    if not (sep and w.strip().isdigit() and h.strip().isdigit()) or not (100 <= int(w) <= 10000 and 100 <= int(h) <= 10000):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, each 100..10000 (e.g. 1200x500), got {text!r}")
    return int(w), int(h)


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (no ``nan`` in the output)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _write_plot(args: argparse.Namespace, matrix: LossMatrix, forgetting: dict[str, float], version: int) -> str:
    from ..plots import write_loss_matrix_png

    target = Path(args.plot)
    if not target.parent.is_dir():
        raise CLIError(f"cannot write the plot {target}: no directory {target.parent}", hint="create it first or pick another path")
    return str(write_loss_matrix_png(matrix, forgetting, target, size=args.plot_size, title=f"loss matrix along version {version}"))


def cmd_eval(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=True)
    info = store.version(args.version)
    chain = list(reversed(store.log(info.id)))
    matrix = loss_matrix(chain)
    summary = _finite(continual_metrics(matrix)) if matrix.values else {}
    usage = _finite(info.metrics.get("usage", {}))
    plot = _write_plot(args, matrix, summary["forgetting"], info.id) if args.plot and matrix.values else None
    empty = (f"version {info.id}: no cycle along its history has evaluated anything yet"
             + ("; no plot written" if args.plot else "") + f"; run `lifelong --store {args.store} cycle --stream NAME`")
    if args.json:
        print_json(_finite({
            "version": info.id,
            "matrix": matrix.to_dict(),
            "forgetting": summary.get("forgetting", {}),
            "mean_forgetting": summary.get("mean_forgetting"),
            "backward_transfer": summary.get("backward_transfer"),
            "forward_transfer": summary.get("forward_transfer"),
            "mean_heldout_loss": summary.get("mean_heldout_loss"),
            "usage": usage,
            **({"plot": plot} if args.plot else {}),
        }))
        if args.plot and plot is None:
            print(empty, file=sys.stderr)
        return 0
    if not matrix.values:
        print(empty)
        return 0
    print(f"loss matrix along version {info.id}'s first-parent history (held-out nats/token; rows: versions):")
    print(matrix.format_table())
    print()
    forgetting = summary["forgetting"]
    print("forgetting (last minus best earlier, nats; > 0 is worse): "
          + ("  ".join(f"{s} {v:+.3f}" for s, v in forgetting.items() if v is not None) or "none"))
    print(f"mean forgetting {fmt(summary['mean_forgetting'], '+.3f')}   "
          f"BWT {fmt(summary['backward_transfer'], '+.3f')}   FWT {fmt(summary['forward_transfer'], '+.3f')}   "
          f"mean held-out loss {fmt(summary['mean_heldout_loss'])}")
    if usage:
        print()
        print(f"expert usage at version {info.id} (on the last trained stream's held-out data):")
        print_table(["layer", "experts", "used %", "KL to uniform"],
                    [(name, u.get("experts"), fmt(None if u.get("used_share") is None else 100 * u["used_share"], ".1f"),
                      fmt(u.get("kl_uniform"))) for name, u in usage.items()])
    if plot:
        print()
        print(f"plot: {plot}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    verbs = (
        ("cycle", "run one growth cycle on a stream: ingest, grow, train, evaluate, commit",
         "lifelong --store ./store cycle --stream news --policy freeze-experts --grow-rows 8", None),
        ("train", "fine-tune the whole model on a stream's new data and commit (a cycle with policy full: no growth)",
         "lifelong --store ./store train --stream stdlib --budget 200000", "full"),
    )
    for name, help_text, example, policy in verbs:
        p = add_parser(sub, name, help_text, example)
        p.add_argument("--stream", required=True, help="registered stream to learn from")
        add_cycle_flags(p)
        if policy is not None:
            p.set_defaults(policy=policy)
        p.add_argument("--device", help="cpu, cuda, cuda:1 (default: GPU if there is one)")
        p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait this long for another running cycle's lease (default: refuse at once)")
        p.add_argument("--config", metavar="FILE", help="JSON of CycleConfig fields (nested 'train'); flags override it")
        p.add_argument("--json", action="store_true")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--nproc", type=_nproc, metavar="N",
                       help="run on N local processes (torchrun, gloo on CPU / NCCL on GPU): each takes 1/N of every batch")
        p.add_argument("--expert-parallel", action="store_true",
                       help="with several processes: split every expert table along d_model (memory per process 1/N)")
        p.set_defaults(func=cmd_cycle)

    p = add_parser(sub, "eval", "the loss matrix along HEAD's history, forgetting, transfer and expert usage",
                   "lifelong --store ./store eval --plot loss_matrix.png")
    p.add_argument("--version", default="HEAD", help="id, tag, ref or HEAD~n (default: HEAD)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the loss matrix (heatmap) and forgetting per stream into this PNG")
    p.add_argument("--plot-size", type=_plot_size, default=(1200, 500), metavar="WxH",
                   help="the PNG's size in pixels (default: 1200x500)")
    p.set_defaults(func=cmd_eval)
