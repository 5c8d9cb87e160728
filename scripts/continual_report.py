"""Summary, tables and figure of scripts/bench_continual.py: ratios to the dense fine-tune, the
two targets, the printed per-arm and summary tables, and one PNG comparing the arms. Pure
functions over the arm results (the figure: a file)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

STREAMS = ("stdlib", "pydoc", "licenses")  # code, technical English, legal English
GROWTH_POLICIES = ("freeze-experts", "freeze-all")
FORGET_TARGET = 0.10  # (a) the best arm without replay forgets <= 10% of the dense fine-tune's
PLASTICITY_TARGET = 0.05  # (b) ... with new-stream loss within 5% of the dense fine-tune's


def no_replay_candidates(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The PEER arms that keep old knowledge without replaying old text: growth (with or
    without isolation) and sparse, no replay, no distillation."""
    return [r for r in results.values() if r["model"] == "peer" and r["policy"] != "full" and r["replay_ratio"] == 0]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a / b


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the dense fine-tune, the best arm without replay (lowest final mean held-out
    loss: a fixed rule, not tuned to the targets) and the two target checks."""
    dense = results.get("dense")
    for r in results.values():
        # a ratio to a dense forgetting <= 0 (nothing forgotten) means nothing: left out
        r["forgetting_vs_dense"] = _ratio(r["mean_forgetting"], dense["mean_forgetting"]) if dense and dense["mean_forgetting"] > 0 else None
        r["new_loss_vs_dense"] = _ratio(r["mean_new_stream_loss"], dense["mean_new_stream_loss"]) if dense else None
    growth = no_replay_candidates(results)
    summary: dict[str, Any] = {"arms": list(results), "best_growth_arm": None, "targets": None}
    if not growth:
        return summary
    best = min(growth, key=lambda r: r["final_mean_loss"])
    summary["best_growth_arm"] = best["arm"]
    if dense is None:
        return summary
    fd, fb = dense["mean_forgetting"], best["mean_forgetting"]
    pd, pb = dense["mean_new_stream_loss"], best["mean_new_stream_loss"]
    a_ok = fd > 0 and fb <= FORGET_TARGET * fd
    b_ok = pd is not None and pb is not None and pb <= (1 + PLASTICITY_TARGET) * pd
    summary["targets"] = {
        "a_forgetting": {
            "target": f"mean forgetting <= {FORGET_TARGET:.0%} of dense",
            "dense": fd, "best": fb, "moot": fd <= 0,  # the dense fine-tune forgot nothing
            "ratio": _ratio(fb, fd) if fd > 0 else None, "limit": FORGET_TARGET * fd if fd > 0 else None,
            "met": bool(a_ok), "miss_nats": None if a_ok or fd <= 0 else fb - FORGET_TARGET * fd,
        },
        "b_plasticity": {
            "target": f"mean new-stream loss within {PLASTICITY_TARGET:.0%} of dense",
            "dense": pd, "best": pb, "ratio": _ratio(pb, pd), "limit": None if pd is None else (1 + PLASTICITY_TARGET) * pd,
            "met": bool(b_ok), "miss_nats": None if b_ok or pd is None or pb is None else pb - (1 + PLASTICITY_TARGET) * pd,
        },
    }
    # Memory first (the system's promise), then learning: a fixed rule, stated before the runs.
    remembers = [r for r in growth if fd > 0 and r["mean_forgetting"] <= FORGET_TARGET * fd and r["mean_new_stream_loss"] is not None]
    summary["recommended_arm"] = (min(remembers, key=lambda r: r["mean_new_stream_loss"]) if remembers
                                  else min(growth, key=lambda r: r["mean_forgetting"]))["arm"]
    summary["arms_meeting_both"] = [
        r["arm"] for r in growth
        if fd > 0 and r["mean_forgetting"] <= FORGET_TARGET * fd and r["mean_new_stream_loss"] is not None
        and pd is not None and r["mean_new_stream_loss"] <= (1 + PLASTICITY_TARGET) * pd
    ]
    return summary


def fmt(x: float | None, spec: str = "{:.3f}") -> str:
    return "-" if x is None else spec.format(x)


def print_arm(r: dict[str, Any], out: Any) -> None:
    print(f"\n== {r['arm']}: {r['about']} (policy {r['policy']}, replay {r['replay_ratio']}, distill {r['distill_weight']})", file=out)
    print("loss matrix (held-out nats/byte; rows: versions after each cycle, columns: streams)", file=out)
    print(r["table"], file=out)
    forget = ", ".join(f"{k} {v:+.3f}" for k, v in r["forgetting"].items()) or "-"
    print(f"forgetting (nats, + = worse than its best): {forget}; mean {r['mean_forgetting']:+.3f}", file=out)
    print("new-stream loss after each growth cycle (plasticity): "
          + ", ".join(f"{k} {fmt(v)}" for k, v in r["new_stream_loss"].items()) + f"; mean {fmt(r['mean_new_stream_loss'])}", file=out)
    print(f"final mean held-out loss: {r['final_mean_loss']:.3f}; experts {r['experts']:,}; {r['seconds']:.0f}s", file=out)
    if r["routing_retention"]:
        print("routing retention (final version, each earlier stream's held-out text: router weight still on the experts "
              "it was trained with): " + ", ".join(f"{k} {fmt(v, '{:.1%}')}" for k, v in r["routing_retention"].items()), file=out)


def print_summary(results: dict[str, dict[str, Any]], summary: dict[str, Any], out: Any, order: list[str] | tuple[str, ...] = STREAMS) -> None:
    streams = list(order[:-1])
    head = ["arm", "policy", "replay", "distill"] + [f"fgt {s}" for s in streams] + [
        "mean fgt", "fgt/dense"] + [f"new {s}" for s in order[1:]] + ["mean new", "new/dense", "final mean"] + [
        f"ret {s}" for s in streams] + ["experts", "time s"]
    rows = []
    for r in results.values():
        rows.append([r["arm"], r["policy"], f"{r['replay_ratio']:g}", f"{r['distill_weight']:g}"]
                    + [fmt(r["forgetting"].get(s), "{:+.3f}") for s in streams]
                    + [fmt(r["mean_forgetting"], "{:+.3f}"), fmt(r["forgetting_vs_dense"], "{:.2f}")]
                    + [fmt(r["new_stream_loss"].get(s)) for s in order[1:]]
                    + [fmt(r["mean_new_stream_loss"]), fmt(r["new_loss_vs_dense"], "{:.3f}"), fmt(r["final_mean_loss"])]
                    + [fmt(r["routing_retention"].get(s), "{:.1%}") for s in streams]
                    + [f"{r['experts']:,}", f"{r['seconds']:.0f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("\n== summary (held-out nats/byte; fgt = forgetting after the last cycle, new = new-stream loss after its cycle,\n"
          "   ret = routing retention: share of router weight on the stream's held-out text still on the experts it was trained with)", file=out)
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)), file=out)
    for row in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)), file=out)
    best, targets = summary.get("best_growth_arm"), summary.get("targets")
    if best is None or targets is None:
        print("\ntargets: not checked (needs the dense arm and an arm without replay)", file=out)
        return
    a, b = targets["a_forgetting"], targets["b_plasticity"]
    print(f"\nbest arm without replay (lowest final mean held-out loss): {best}", file=out)
    if a["dense"] <= 0:
        print(f"(a) forgetting: dense forgets {a['dense']:+.3f} nats (nothing to forget): the target is moot -> NOT MET", file=out)
    else:
        verdict = "MET" if a["met"] else f"MISSED by {a['miss_nats']:.3f} nats"
        print(f"(a) forgetting <= {FORGET_TARGET:.0%} of dense: {best} {a['best']:+.3f} vs dense {a['dense']:+.3f} nats "
              f"= {a['ratio']:.0%} (limit {a['limit']:.3f}) -> {verdict}", file=out)
    if b["ratio"] is not None:
        verdict = "MET" if b["met"] else f"MISSED by {b['miss_nats']:.3f} nats ({b['ratio'] - 1 - PLASTICITY_TARGET:+.1%} past the limit)"
        print(f"(b) new-stream loss within 5% of dense: {best} {b['best']:.3f} vs dense {b['dense']:.3f} "
              f"= {b['ratio'] - 1:+.1%} -> {verdict}", file=out)
    print(f"recommended (memory first: of the arms without replay meeting (a), the lowest new-stream loss; if none "
          f"meets it, the lowest forgetting): {summary['recommended_arm']}", file=out)
    both = summary.get("arms_meeting_both") or []
    print(f"arms without replay meeting both targets: {', '.join(both) if both else 'none'}", file=out)
    b_r = results[best]
    for control in ("dense-replay", "full-replay"):  # is it the growth, or the replay?
        if control in results:
            c = results[control]
            print(f"{best} vs the control {control}: mean forgetting {b_r['mean_forgetting']:+.3f} vs {c['mean_forgetting']:+.3f}, "
                  f"new-stream loss {fmt(b_r['mean_new_stream_loss'])} vs {fmt(c['mean_new_stream_loss'])}, "
                  f"final mean {b_r['final_mean_loss']:.3f} vs {c['final_mean_loss']:.3f}", file=out)


def write_arms_figure(results: dict[str, dict[str, Any]], path: str | Path, size: tuple[int, int] = (1500, 500)) -> Path:
    """One PNG comparing the arms (:func:`lifelong.plots.arms_figure`: mean forgetting,
    new-stream and final loss, routing per stream when the arms have it); returns the path."""
    # lifelong and matplotlib only when a figure is asked for
    from lifelong.plots import arms_figure, save_png

    title = f"continual benchmark ({len(results)} arms; held-out nats/byte)"
    return save_png(arms_figure(results, size=size, title=title), path, size=size)
