"""The store on a database shared by hosts: races between real processes, schema upgrades,
an unreachable server, a store directory that is not shared. Both backends unless named.

(Every test using the ``store`` fixture runs on SQLite and PostgreSQL too; see
tests/backends.py. The scheduler and lease across processes: tests/lifelong/test_shared_store.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import inspect, update
from sqlalchemy.orm import Session

from expert_store import (
    DatabaseUnreachableError,
    DeltaShard,
    ExpertStore,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaVersionError,
    StoreExistsError,
    StoreNotSharedError,
    check_share_marker,
    write_share_marker,
)
from expert_store.schema import SCHEMA_VERSION, Meta

from backends import Backend
from store_testlib import dense, new_shard

WORKER = Path(__file__).resolve().parents[1] / "backend_worker.py"
REFUSED = "postgresql+psycopg://postgres@127.0.0.1:1/test"  # nothing listens on port 1


def worker(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(WORKER), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None and proc.returncode != 0:
                raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read()}")
        assert time.monotonic() < end, f"timed out waiting for {[p.name for p in paths if not p.exists()]}"
        time.sleep(0.01)


def database_url(store: ExpertStore) -> str:
    """The URL another process opens ``store``'s database with (SQLite: its file)."""
    return store.url or f"sqlite:///{store.path / 'store.db'}"


# ----------------------------------------------------------------------- races between processes
def test_two_processes_in_their_own_directories_race_commits_on_one_parent(store: ExpertStore, tmp_path: Path) -> None:
    """Exactly one commit per round wins; the other is a clear conflict; the store verifies."""
    sync, rounds = tmp_path / "sync", 3
    sync.mkdir()
    procs = [worker("race", str(store.path), store.url or "-", str(seed), str(rounds), str(sync), cwd=tmp_path / f"host-{seed}")
             for seed in (1, 2)]
    try:
        wait_for([sync / "ready-1", sync / "ready-2"], procs)
        parent = None
        for r in range(rounds):
            go = sync / f"go-{r}"  # whole or absent: a worker polls for it
            go.with_suffix(".tmp").write_text("none" if parent is None else str(parent))
            os.replace(go.with_suffix(".tmp"), go)
            outs = [sync / f"out-{r}-{seed}.json" for seed in (1, 2)]
            wait_for(outs, procs)
            results = [json.loads(p.read_text()) for p in outs]
            assert sorted(x["outcome"] for x in results) == ["conflict", "ok"], results
            winner = next(x["version"] for x in results if x["outcome"] == "ok")
            loser = next(x["message"] for x in results if x["outcome"] == "conflict")
            assert "HEAD" in loser and ("expected" in loser or "concurrently" in loser), loser
            assert store.head() == winner and store.version(winner).parent == parent
            assert store.verify() == []
            parent = winner
        for proc in procs:
            assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(store.versions()) == rounds  # one winner per round, no half version
    assert store.reflog("HEAD")[0].who.startswith("racer-")
    removed = store.gc(grace_s=0)  # the losers' objects are merely unreachable
    assert len(removed.objects) == rounds * 2 and store.verify() == []


def test_concurrent_ref_moves_in_threads_lose_cleanly(store: ExpertStore) -> None:
    """Compare-and-swap of one ref from many connections at once: one move wins."""
    base = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="base", parent=None).id
    targets = [store.commit(shards=[], dense=dense(i), message=f"t{i}", parent=base, ref=None).id for i in range(1, 5)]
    outcomes: list[str] = []

    def move(target: int) -> None:
        try:
            store.set_ref("HEAD", target, base)
            outcomes.append("ok")
        except Exception as exc:  # noqa: BLE001
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=move, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ConflictError"] * 3 + ["ok"]
    assert store.head() in targets and len(store.reflog("HEAD")) == 2


# ----------------------------------------------------------------------- one database, many stores
def test_a_database_holds_one_store(store: ExpertStore, tmp_path: Path) -> None:
    url = database_url(store)
    with pytest.raises(StoreExistsError, match="already holds an expert store"):
        ExpertStore.init(tmp_path / "second", {}, url=url)
    other = ExpertStore.init(tmp_path / "other", {}, url=None)  # another store, its own database
    (other.path / "store.json").write_text((store.path / "store.json").read_text().replace(store.store_id, other.store_id))
    other.close()
    with pytest.raises(NotAStoreError, match="belongs to another store"):
        ExpertStore.open(tmp_path / "other", url=url)


def test_newer_schema_is_refused(store: ExpertStore) -> None:
    with Session(store.engine) as session, session.begin():
        session.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    with pytest.raises(SchemaVersionError, match="newer than this code"):
        ExpertStore.open(store.path, url=store.url)


def test_read_only_open_refuses_writes(store: ExpertStore) -> None:
    store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="one", parent=None)
    with ExpertStore.open(store.path, url=store.url, read_only=True) as ro:
        assert ro.head() == store.head() and ro.verify() == []
        with pytest.raises(ReadOnlyStoreError, match="read-only"):
            ro.rollback(1)


def test_unmeasured_metrics_commit_on_every_backend(store: ExpertStore, backend: Backend) -> None:
    """NaN/inf (a metric not measured) is not JSON: PostgreSQL's json refuses it, so the
    store writes null there; SQLite keeps NaN. Both read as missing."""
    v = store.commit(shards=[], dense=dense(0), message="no held-out text", parent=None,
                     metrics={"loss": float("nan"), "per_stream": {"a": 1.5, "b": float("inf")}, "curve": [1.0, float("nan")]})
    got = store.version(v.id).metrics
    assert got["per_stream"]["a"] == 1.5 and got["curve"][0] == 1.0
    missing = [got["loss"], got["per_stream"]["b"], got["curve"][1]]
    if backend.name == "postgresql":
        assert missing == [None, None, None]
    else:
        assert all(x != x or x in (float("inf"),) for x in missing)  # NaN, inf


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_schema_1_database_on_postgresql_is_upgraded_once(store: ExpertStore, backend: Backend) -> None:
    """A schema-1 store (no delta columns) on PostgreSQL: two processes opening it at once
    upgrade it once (the meta row is locked FOR UPDATE); a read-only open is refused until then."""
    v1 = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None)
    with store.engine.begin() as conn:  # back to schema 1
        conn.exec_driver_sql("DROP INDEX ix_shards_base_id")
        for column in ("base_id", "depth", "object_bytes"):
            conn.exec_driver_sql(f"ALTER TABLE shards DROP COLUMN {column}")
        conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="1"))
    store.close()
    with pytest.raises(SchemaVersionError, match="open it once for writing"):
        ExpertStore.open(store.path, url=backend.url, read_only=True)

    opened: list[ExpertStore] = []
    threads = [threading.Thread(target=lambda: opened.append(ExpertStore.open(store.path, url=backend.url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 3
    s = opened[0]
    columns = {c["name"] for c in inspect(s.engine).get_columns("shards")}
    assert {"base_id", "depth", "object_bytes"} <= columns
    assert s.shard(v1.shards[0].id).object_bytes == v1.shards[0].bytes
    ids = torch.tensor([1, 3])
    v2 = s.commit(shards=[DeltaShard(v1.shards[0].id, {"u": (ids, torch.ones(2, 16))})], dense=dense(0),
                  message="delta", parent=v1.id)
    assert v2.shards[0].base_id == v1.shards[0].id and s.verify() == []
    assert torch.equal(s.load_shard(v2.shards[0])["u"][ids], torch.ones(2, 16))
    for o in opened:
        o.close()


# ----------------------------------------------------------------------- bad input
def test_unreachable_database_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "store"
    for attempt in range(2):  # nothing is left behind: the retry meets the same error, not another
        with pytest.raises(DatabaseUnreachableError) as info:
            ExpertStore.init(target, {}, url=REFUSED)
        assert str(info.value) == "cannot reach database postgresql+psycopg://postgres@127.0.0.1:1/test: connection refused"
        assert not target.exists() or not any(target.iterdir())


def test_unreachable_database_when_opening_hides_the_password(store: ExpertStore) -> None:
    (store.path / "store.json").write_text(
        (store.path / "store.json").read_text().replace('"database": "default"', '"database": "url"'))
    bad = "postgresql+psycopg://alice:s3cret@127.0.0.1:1/test?options=-csearch_path%3Dx"
    with pytest.raises(DatabaseUnreachableError, match=r"^cannot reach database postgresql\+psycopg://alice:\*\*\*@127.0.0.1:1/test: connection refused$"):
        ExpertStore.open(store.path, url=bad)


def test_bad_urls_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnreachableError, match="invalid database URL"):
        ExpertStore.init(tmp_path / "a", {}, url="not a url")
    with pytest.raises(DatabaseUnreachableError, match="cannot use database URL nosuchdb://h/db"):
        ExpertStore.init(tmp_path / "b", {}, url="nosuchdb://h/db")


def test_the_cli_says_one_line_for_an_unreachable_database(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lifelong.cli.main import main

    for args in (["init", "--rows", "4", "--cols", "4", "--top-k", "2", "--d-model", "8", "--layers", "1"], ["versions"], ["schedule", "run", "--once"]):
        store = tmp_path / "s"
        if args[0] != "init":
            ExpertStore.init(store, {}, url=None).close()  # a store that keeps its database elsewhere
            (store / "store.json").write_text((store / "store.json").read_text().replace('"default"', '"url"'))
        assert main(["--store", str(store), "--url", REFUSED, *args]) == 1
        err = capsys.readouterr().err
        assert err == f"error: cannot reach database {REFUSED}: connection refused\n", (args, err)
        shutil.rmtree(store, ignore_errors=True)


def test_share_marker_written_by_one_process_is_read_by_another(store: ExpertStore, tmp_path: Path) -> None:
    store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="one", parent=None)
    # A host whose store path holds a copy, not the shared directory: same database (on
    # PostgreSQL), same store id, so opening it works; only the marker tells.
    copy = tmp_path / "copy"
    store.engine.dispose()  # SQLite: the last connection folds the WAL into the file copied
    shutil.copytree(store.path, copy)
    rank0 = worker("share-marker", str(store.path), store.url or "-", cwd=tmp_path / "rank0")
    stdout, stderr = rank0.communicate(timeout=120)
    assert rank0.returncode == 0, stderr
    token = stdout.strip()
    check_share_marker(store, token)  # the same directory: readable
    assert token not in {s.object_hash for v in store.versions() for s in v.shards}
    with ExpertStore.open(copy, url=store.url) as elsewhere:
        t0 = time.monotonic()
        with pytest.raises(StoreNotSharedError, match="not shared between hosts: the marker object .* written by rank 0 is not readable at") as info:
            check_share_marker(elsewhere, token, timeout_s=0.3)
        assert time.monotonic() - t0 >= 0.3 and "\n" not in str(info.value)
        (elsewhere.objects.path(token)).parent.mkdir(parents=True, exist_ok=True)
        elsewhere.objects.path(token).write_bytes(b"not the marker")
        with pytest.raises(StoreNotSharedError, match="does not read back intact"):
            check_share_marker(elsewhere, token, timeout_s=0)
    # Unreferenced: gc removes markers once their grace period has passed.
    assert token in store.gc(grace_s=0).objects


# ----------------------------------------------------------------------- no server: skip, or fail under CI
@pytest.mark.parametrize("ci", ["", "true"])
def test_without_a_server_postgresql_tests_skip_saying_how_or_fail_under_ci(tmp_path: Path, ci: str) -> None:
    tests = Path(__file__).resolve().parents[1]
    (tmp_path / "test_probe.py").write_text("def test_probe(backend):\n    assert backend.name\n")
    env = {**os.environ, "PYTHONPATH": str(tests), "LIFELONG_TEST_PG_URL": REFUSED, "CI": ci}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA", "-v",
                          str(tmp_path / "test_probe.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = run.stdout
    assert "test_probe[sqlite]" in out and "test_probe[postgresql]" in out, out
    assert "PostgreSQL tests need a server at postgresql+psycopg://postgres@127.0.0.1:1/test (connection refused)" in out
    assert "start one" in out and "LIFELONG_TEST_PG_URL=" in out
    if ci:
        assert run.returncode == 1 and "1 passed, 1 error" in out and "CI=true and PostgreSQL tests need" in out, out
    else:
        assert run.returncode == 0 and "1 passed, 1 skipped" in out, out
