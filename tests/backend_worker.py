"""A process of its own for the backend tests, as a process on another host would be.

Run as ``python tests/backend_worker.py VERB ...`` with a working directory of its own;
it reaches the store only through its path and its database URL (``-``: the store's
default SQLite file). The test and the worker talk through files in a SYNC directory.

    race STORE URL SEED ROUNDS SYNC   per round r: wait for SYNC/go-r (the parent id, or
                                      ``none``), commit once on it, write SYNC/out-r-SEED.json
    share-marker STORE URL            write a share marker object; print its token
    hold-lease URL NAME TTL SYNC      take the lease NAME, write SYNC/held (the holder), keep it
                                      until SYNC/stop appears (or until killed)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

POLL_S = 0.005
TIMEOUT_S = 120.0


def _url(arg: str) -> str | None:
    return None if arg == "-" else arg


def _wait_for(path: Path) -> str:
    end = time.monotonic() + TIMEOUT_S
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"worker {os.getpid()}: timed out waiting for {path}")
        time.sleep(POLL_S)
    return path.read_text()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def race(store_path: str, url: str, seed: int, rounds: int, sync: Path) -> None:
    import torch

    from expert_store import ConflictError, ExpertStore, NewShard

    store = ExpertStore.open(store_path, url=_url(url))
    gen = torch.Generator().manual_seed(seed)
    _write(sync / f"ready-{seed}", str(os.getpid()))
    for r in range(rounds):
        text = _wait_for(sync / f"go-{r}")
        parent = None if text == "none" else int(text)
        tensors = {"u": torch.randn(64, 16, generator=gen), "v": torch.randn(64, 16, generator=gen)}  # (n_experts, d)
        try:
            v = store.commit(shards=[NewShard("blocks.0.peer", 100 * r + seed, 100 * r + seed + 1, 64, tensors)],
                             dense={"w": torch.randn(16, generator=gen)}, parent=parent,
                             message=f"round {r} by racer {seed}", who=f"racer-{seed}@{os.getcwd()}")
            out = {"outcome": "ok", "version": v.id}
        except ConflictError as exc:
            out = {"outcome": "conflict", "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the test reports anything else as a failure
            out = {"outcome": "error", "message": f"{type(exc).__name__}: {exc}"}
        _write(sync / f"out-{r}-{seed}.json", json.dumps(out))
    store.close()


def share_marker(store_path: str, url: str) -> None:
    from expert_store import ExpertStore, write_share_marker

    with ExpertStore.open(store_path, url=_url(url)) as store:
        print(write_share_marker(store))


def hold_lease(url: str, name: str, ttl_s: float, sync: Path) -> None:
    from sqlalchemy import create_engine

    from lifelong.records import Lease, holder_name

    lease = Lease(create_engine(url), name, holder=holder_name("cycle"), ttl_s=ttl_s)
    lease.acquire()
    _write(sync / "held", lease.holder)
    _wait_for(sync / "stop")
    lease.release()


def main(argv: list[str]) -> None:
    verb, *args = argv
    if verb == "race":
        race(args[0], args[1], int(args[2]), int(args[3]), Path(args[4]))
    elif verb == "share-marker":
        share_marker(args[0], args[1])
    elif verb == "hold-lease":
        hold_lease(args[0], args[1], float(args[2]), Path(args[3]))
    else:
        raise SystemExit(f"unknown verb {verb!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
