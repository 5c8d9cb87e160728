"""Store verbs: init, versions/log, show, diff, rollback, tag, checkout, verify, gc, status."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from expert_store import Residency, VersionInfo
from expert_store.ioerrors import os_error
from expert_store.maintenance import GC_GRACE_S

from ..checkpoint import checkout_model, init_store
from ..config import ModelConfig, PEERConfig, config_to_dict, load_config
from ..errors import CLIError
from ..model import resolve_device
from .common import NO_HELDOUT, add_parser, missing, open_store, print_json, print_table


_HELDOUT_LOSSES = ("mean_heldout_loss", "loss_before")  # missing when there was no held-out text


def _no_heldout(metrics: dict) -> bool:
    """The version's cycle evaluated no stream: none had held-out text (loss None)."""
    losses = metrics.get("losses")
    return isinstance(losses, dict) and all(x is None for x in losses.values())


def _metric_summary(v: VersionInfo) -> str:
    """The headline metrics of a version (``-`` for one not measured; never ``nan``)."""
    out = []
    for k in ("mean_heldout_loss", "mean_forgetting", "recall"):
        if k not in v.metrics:
            continue
        x = v.metrics[k]
        if missing(x):
            out.append(f"{k}=-" + (NO_HELDOUT if k == "mean_heldout_loss" and _no_heldout(v.metrics) else ""))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(f"{k}={x:.4g}")
    return " ".join(out)


def _metric_value(key: str, val: object, metrics: dict) -> str:
    """One metric as `show` prints it: nested dicts and lists element-wise, ``-`` for a
    missing number (with the reason for a held-out loss), never ``nan``."""
    def fmt(x: object, nested: bool = True) -> str:
        if missing(x):
            return "-"
        if isinstance(x, dict):
            return "{" + ", ".join(f"{k!r}: {fmt(y)}" for k, y in x.items()) + "}"
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(fmt(y) for y in x) + "]"
        return repr(x) if nested and isinstance(x, str) else str(x)

    text = fmt(val, nested=False)
    if key == "losses" and isinstance(val, dict) and any(x is None for x in val.values()):
        text += "  (-: no held-out text)"
    elif key in _HELDOUT_LOSSES and missing(val) and (key == "loss_before" or _no_heldout(metrics)):
        text += NO_HELDOUT
    return text


def _version_dict(v: VersionInfo) -> dict:
    return {
        "id": v.id,
        "parent": v.parent,
        "created_at": v.created_at.isoformat(timespec="seconds"),
        "message": v.message,
        "experts": v.n_experts,
        "shards": len(v.shards),
        "metrics": v.metrics,
    }


def cmd_init(args: argparse.Namespace) -> int:
    if not args.store:
        raise CLIError("no store given", hint="pass --store PATH before the command")
    if args.config:
        cfg = load_config(ModelConfig, args.config)
    else:
        peer = PEERConfig(d_model=args.d_model, n_rows=args.rows, n_cols=args.cols, heads=args.heads, top_k=args.top_k, d_key=args.d_key)
        cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, peer=peer, peer_layers=_peer_layers(args.peer_layers, args.layers))
    store, info = init_store(args.store, cfg, url=args.url, seed=args.seed)
    if args.json:
        print_json({"store": str(store.path), "version": _version_dict(info), "config": config_to_dict(cfg)})
    else:
        print(f"created store {store.path}: version {info.id} ({info.n_experts} experts in {len(info.shards)} shards)")
    return 0


def _peer_layers(text: str, n_layers: int) -> list[int] | None:
    """``all`` | ``middle`` | comma-separated block indices -> ModelConfig.peer_layers."""
    if text == "all":
        return list(range(n_layers))
    if text == "middle":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--peer-layers takes all, middle or block indices like 0,2; got {text!r}") from None


def cmd_versions(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=True)
    versions = store.log(args.ref) if args.command == "log" else store.versions()
    head = store.head()
    if args.json:
        print_json([_version_dict(v) for v in versions])
        return 0
    refs: dict[int, list[str]] = {}
    for r in store.refs():
        refs.setdefault(r.version_id, []).append(r.name)
    rows = [
        (
            ("* " if v.id == head else "  ") + str(v.id),
            v.parent if v.parent is not None else "-",
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            v.n_experts,
            len(v.shards),
            ",".join(refs.get(v.id, [])),
            _metric_summary(v),
            v.message,
        )
        for v in versions
    ]
    print_table(["id", "parent", "time (UTC)", "experts", "shards", "refs", "metrics", "message"], rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=True)
    v = store.version(args.version)
    if args.json:
        data = _version_dict(v)
        data.update(config=v.config, cursors=v.cursors, shards=[{**s.__dict__, "created_at": str(s.created_at), "parts": [p.__dict__ for p in s.parts]}
                                                             for s in v.shards])
        print_json(data)
        return 0
    print(f"version {v.id}  parent {v.parent}  {v.created_at:%Y-%m-%d %H:%M:%S} UTC\n  {v.message}")
    print(f"  experts {v.n_experts}, shard bytes {v.shard_bytes} loaded, {v.object_bytes} stored (deltas count their rows), dense object {v.dense_hash[:12]}")
    geometry = v.config.get("layers", {})

    def frozen(s) -> str:  # in this version (a shard written while trainable can be frozen later)
        rows = geometry.get(s.layer, {}).get("frozen_rows")
        return "yes" if (s.row_end <= rows if rows is not None else s.frozen) else "no"

    rows = [(s.id, s.layer, f"{s.row_start}-{s.row_end}", s.n_experts, s.dtype, s.bytes, frozen(s),
             f"delta on {s.base_id}" if s.base_id is not None else f"{len(s.parts)} column parts" if s.parts else "-",
             s.object_hash[:12]) for s in v.shards]
    print_table(["shard", "layer", "rows", "experts", "dtype", "bytes", "frozen", "stored as", "object"], rows)
    run = v.config.get("run")
    if run:
        print("resolved config of the run that made it:")
        for what, cfg in run.items():
            for k, val in _flat(cfg):
                print(f"  {what}.{k}: {val}")
    if v.metrics:
        print("metrics:")
        for k, val in v.metrics.items():
            print(f"  {k}: {_metric_value(k, val, v.metrics)}")
    if v.cursors:
        print("stream cursors: " + ", ".join(sorted(v.cursors)))
    return 0


def _flat(cfg: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of a nested config dict."""
    out: list[tuple[str, object]] = []
    for k, val in cfg.items():
        out.extend(_flat(val, f"{prefix}{k}.") if isinstance(val, dict) else [(f"{prefix}{k}", val)])
    return out


def cmd_diff(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=True)
    d = store.diff(args.a, args.b)
    if args.json:
        print_json(
            {
                "a": d.a,
                "b": d.b,
                "layers": {n: {"experts_added": l.experts_added, "experts_removed": l.experts_removed,
                               "experts_changed": l.experts_changed, "shards_added": [s.id for s in l.added],
                               "shards_removed": [s.id for s in l.removed],
                               "shards_changed": [[a.id, b.id] for a, b in l.changed]} for n, l in d.layers.items()},
                "metrics": d.metrics,
                "dense_changed": d.dense_changed,
                "shared_shards": d.shared_shards,
            }
        )
    else:
        print(d.summary())
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    store = open_store(args)
    old = store.head()
    t0 = time.perf_counter()
    new = store.rollback(args.version, why=args.why or f"rollback to {args.version}")
    ms = (time.perf_counter() - t0) * 1e3
    print(f"HEAD moved {old} -> {new} ({ms:.1f} ms); nothing deleted: `lifelong rollback {old}` rolls forward again")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = open_store(args)
    vid = store.tag(args.name, args.version)
    print(f"tag {args.name} -> version {vid}")
    return 0


def cmd_checkout(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=True)
    device = str(resolve_device(args.device))
    budget = int(args.budget_mb * 2**20) if args.budget_mb else None
    residency = Residency(store, device, budget_bytes=budget)
    t0 = time.perf_counter()
    model, origin = checkout_model(store, args.version, device=device, residency=residency)
    info = origin.version
    seconds = time.perf_counter() - t0
    layers = {name: {"rows": l.n_rows, "frozen_rows": l.frozen_rows, "experts": l.num_experts} for name, l in model.peer_layers().items()}
    if args.json:
        print_json({"version": info.id, "device": device, "seconds": seconds, "layers": layers, "resident_bytes": residency.bytes_by_device()})
    else:
        print(f"checked out version {info.id} on {device} in {seconds:.2f}s (every shard verified)")
        print_table(["layer", "rows", "frozen rows", "experts"], [(n, d["rows"], d["frozen_rows"], d["experts"]) for n, d in layers.items()])
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=True)
    problems = store.verify()
    if args.json:
        print_json([{"kind": p.kind, "detail": p.detail} for p in problems])
    elif problems:
        for p in problems:
            print(f"{p.kind}: {p.detail}")
    else:
        print(f"ok: every reachable object of {store.path} re-hashed and present")
    return 1 if problems else 0


def _stale_stream_temps(store_path: Path, grace_s: float, dry_run: bool) -> list[Path]:
    """Temp directories an ingest could not remove (``streams-*`` in the registry's work
    directory, see :func:`lifelong.workspace.open_registry`) older than ``grace_s``; deleted
    unless ``dry_run``."""
    work = Path(store_path).resolve() / "streams"
    now = time.time()
    stale = sorted(p for p in work.glob("streams-*") if p.is_dir() and now - p.lstat().st_mtime >= grace_s) \
        if work.is_dir() else []
    if not dry_run:
        for path in stale:
            try:
                shutil.rmtree(path)
            except OSError as exc:
                raise os_error(exc, f"deleting the stale temp directory {path}",
                               "no version was changed; run gc again to finish") from exc
    return stale


def cmd_gc(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=args.dry_run)
    result = store.gc(dry_run=args.dry_run, grace_s=args.grace)
    temps = [*result.temp_files, *_stale_stream_temps(store.path, args.grace, args.dry_run)]
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        print_json({"dry_run": args.dry_run, "objects": result.objects, "temp_files": [str(p) for p in temps], "bytes": result.bytes})
    else:
        for h in result.objects:
            print(f"  {h}")
        print(f"{verb} {len(result.objects)} unreachable objects and {len(temps)} temp files ({result.bytes} bytes)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=True)
    head = store.head()
    info = store.version(head) if head is not None else None
    per_layer: dict[str, int] = {}
    if info is not None:
        for s in info.shards:
            per_layer[s.layer] = per_layer.get(s.layer, 0) + s.bytes
    data = {
        "store": str(store.path),
        "head": head,
        "versions": len(store.versions()),
        "refs": {r.name: r.version_id for r in store.refs()},
        "experts": info.n_experts if info else 0,
        "resident_bytes_on_checkout": {"device": str(resolve_device()), "total": sum(per_layer.values()), "by_layer": per_layer},
    }
    if args.json:
        print_json(data)
        return 0
    print(f"store {data['store']}: HEAD -> {head}, {data['versions']} versions, {data['experts']} experts at HEAD")
    print("refs: " + ", ".join(f"{k}={v}" for k, v in data["refs"].items()))
    print(f"a checkout of HEAD holds {data['resident_bytes_on_checkout']['total']} bytes of shards on {resolve_device()}:")
    print_table(["layer", "bytes"], sorted(per_layer.items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "init", "create a store holding a fresh model", "lifelong --store ./store init --rows 128 --cols 128")
    p.add_argument("--config", help="JSON file with ModelConfig fields (nested 'peer' for PEERConfig)")
    p.add_argument("--url", default=argparse.SUPPRESS,
                   help="SQLAlchemy database URL (default: SQLite file in the store); same as the global --url")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=128, help="n1: rows of the row codebook")
    p.add_argument("--cols", type=int, default=128, help="n2: columns")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--d-key", type=int, default=128)
    p.add_argument("--peer-layers", default="all", metavar="all|middle|I,J",
                   help="blocks whose FFN is a PEER layer (default: all: growth and routing isolation then reach every "
                        "FFN, nothing dense drifts under the freezing policies; see docs/continual.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_init)

    for name, example in (("versions", "lifelong --store ./store versions --json"), ("log", "lifelong --store ./store log HEAD")):
        p = add_parser(sub, name, "list versions" if name == "versions" else "first-parent history of a version", example)
        if name == "log":
            p.add_argument("ref", nargs="?", default="HEAD")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_versions)

    p = add_parser(sub, "show", "show one version: shards, metrics, cursors", "lifelong --store ./store show HEAD~1")
    p.add_argument("version", nargs="?", default="HEAD", help="id, tag, ref or HEAD~n")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = add_parser(sub, "diff", "shards and experts added/removed per layer, metric changes", "lifelong --store ./store diff HEAD~1 HEAD")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)

    p = add_parser(sub, "rollback", "move HEAD to an older (or newer) version; nothing is deleted", "lifelong --store ./store rollback HEAD~1")
    p.add_argument("version")
    p.add_argument("--why", help="reason recorded in the reflog")
    p.set_defaults(func=cmd_rollback)

    p = add_parser(sub, "tag", "name a version", "lifelong --store ./store tag baseline HEAD")
    p.add_argument("name")
    p.add_argument("version", nargs="?", default="HEAD")
    p.set_defaults(func=cmd_tag)

    p = add_parser(sub, "checkout", "build a version's model on a device (verifies every shard it loads)", "lifelong --store ./store checkout HEAD --device cpu")
    p.add_argument("version", nargs="?", default="HEAD")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: GPU if there is one)")
    p.add_argument("--budget-mb", type=float, help="refuse a checkout whose shards exceed this many MiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkout)

    p = add_parser(sub, "verify", "re-hash every reachable object; exit 1 listing any problem", "lifelong --store ./store verify")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = add_parser(sub, "gc", "delete unreachable objects", "lifelong --store ./store gc --dry-run")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--grace", type=float, default=GC_GRACE_S, metavar="SECONDS",
                   help=f"spare unreachable objects and temp files younger than this (default {GC_GRACE_S:g}: a commit "
                        "may be writing them); 0 only when nothing else writes to the store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)

    p = add_parser(sub, "status", "HEAD, refs and the bytes a checkout holds per layer", "lifelong --store ./store status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
