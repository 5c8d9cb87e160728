"""Benchmark of streams ingest: read (datasets, streaming) + validate + split + tokenize +
pack, on generated text and JSONL streams; peak RSS for two input sizes in subprocesses.

    python scripts/bench_ingest.py            # 10 MB text + 10 MB JSONL, RSS 10 vs 40 MB
    python scripts/bench_ingest.py --json     # the same figures as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the of and to in is that for it as with was on be by this are from at or an model "
         "expert stream retrieval product key layer memory token version shard cycle").split()


def make_data(dirpath: Path, fmt: str, mb: float, seed: int = 0) -> Path:
    """Generate ~``mb`` MB of English-like lines (text) or JSON records (jsonl)."""
    rng = random.Random(seed)
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / ("data.txt" if fmt == "text" else "data.jsonl")
    target, size = int(mb * 1e6), 0
    with open(path, "w") as f:
        while size < target:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 40)))
            line = json.dumps({"text": line, "id": size}) if fmt == "jsonl" else line
            f.write(line + "\n")
            size += len(line) + 1
    return path


def run_one(fmt: str, mb: float, block_len: int = 512) -> dict:
    """Ingest one generated stream chunk by chunk (bounded memory) and pack it."""
    from sqlalchemy import create_engine

    from streams import BlockPacker, StreamRegistry

    with tempfile.TemporaryDirectory() as tmp:
        src = make_data(Path(tmp) / "src", fmt, mb)
        engine = create_engine(f"sqlite:///{tmp}/store.db")
        reg = StreamRegistry(engine, work_dir=tmp)
        reg.add("bench", str(src.parent), "jsonl" if fmt == "jsonl" else "text")
        warm = make_data(Path(tmp) / "warm", fmt, 0.01)
        reg.add("warm", str(warm.parent), "jsonl" if fmt == "jsonl" else "text")
        t0 = time.perf_counter()  # one-time cost: importing datasets, resolving the builder
        list(reg.iter_ingest("warm", None))
        warmup = time.perf_counter() - t0
        packer = BlockPacker(block_len)
        t0 = time.perf_counter()
        tokens = blocks = docs = 0
        for chunk in reg.iter_ingest("bench", None, chunk_tokens=1 << 20):
            blocks += packer.add(chunk.train_tokens).shape[0]
            tokens += chunk.train_token_count + chunk.heldout_token_count
            docs += chunk.train_docs + chunk.heldout_docs
        blocks += packer.flush().shape[0]
        dt = time.perf_counter() - t0
        nbytes = src.stat().st_size
    return {"format": fmt, "mb": round(nbytes / 1e6, 2), "warmup_s": round(warmup, 2),
            "seconds": round(dt, 2),
            "mb_per_s": round(nbytes / 1e6 / dt, 2), "tokens_per_s": int(tokens / dt),
            "docs": docs, "tokens": tokens, "blocks": blocks,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def in_subprocess(fmt: str, mb: float) -> dict:
    """``run_one`` in a fresh interpreter, so its peak RSS is its own."""
    out = subprocess.run([sys.executable, __file__, "--one", fmt, str(mb)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--mb", type=float, default=10.0, help="size of each stream")
    ap.add_argument("--big-mb", type=float, default=40.0, help="size for the RSS comparison")
    ap.add_argument("--one", nargs=2, metavar=("FORMAT", "MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], float(args.one[1]))))
        return
    runs = [in_subprocess("text", args.mb), in_subprocess("jsonl", args.mb),
            in_subprocess("text", args.big_mb)]
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    print(f"{'format':7} {'MB':>6} {'warmup s':>8} {'s':>6} {'MB/s':>6} {'tokens/s':>10} {'docs':>8} {'blocks':>7} {'peak RSS MB':>11}")
    for r in runs:
        print(f"{r['format']:7} {r['mb']:6.1f} {r['warmup_s']:8.2f} {r['seconds']:6.2f} {r['mb_per_s']:6.2f} "
              f"{r['tokens_per_s']:10d} {r['docs']:8d} {r['blocks']:7d} {r['peak_rss_mb']:11.1f}")


if __name__ == "__main__":
    main()
