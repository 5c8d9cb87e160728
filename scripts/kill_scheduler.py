"""SIGKILL a running ``lifelong schedule run`` at random moments of its cycles, restart it, check.

A tiny store, one stream over a drop folder of numbered one-line documents, one job
``schedule add cycle docs --every 2 --budget B`` (each cycle consumes the next ~B tokens). A
first scheduler runs two cycles (then SIGTERM) to measure each phase. Each trial starts the
real CLI (``CHILD``: it marks each phase in a file), waits for the next phase in turn
(startup, ingest, prepare, train, evaluate, commit, committed, idle) plus a random part of
its typical length, sends SIGKILL and checks: ``verify()`` is clean, HEAD checks out; one
chain of versions, one per cycle; each version consumed exactly the budget's slice after its
parent's cursor and trained on that slice's documents (a prefix of the stream, none twice,
none skipped); the registry's pending count matches HEAD's cursor; cycle rows match versions,
and the rows a kill left 'running' are closed by the next scheduler; that scheduler takes the
dead holder's leases at once, skips no cycle for a held lease, and no job fails (no traceback
in its log). ``committed`` (the
transaction done, the row not yet) is microseconds wide: there the child waits to be killed.
At the end a clean scheduler runs one more cycle and stops on SIGTERM; totals checked again.

    python scripts/kill_scheduler.py --trials 50
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: prefer the repo's packages

from sqlalchemy import select  # noqa: E402

from expert_store import ExpertStore  # noqa: E402
from lifelong.checkpoint import checkout_model  # noqa: E402
from lifelong.cli.main import main as cli  # noqa: E402
from lifelong.records import CycleRow, LeaseRow, create_tables  # noqa: E402
from lifelong.workspace import open_registry  # noqa: E402
from streams.split import is_heldout  # noqa: E402

STREAM = "docs"
HOLDOUT = 0.05  # the stream's default held-out fraction
TINY_INIT = ["--rows", "8", "--cols", "8", "--d-model", "32", "--layers", "2", "--heads", "2", "--top-k", "4", "--d-key", "16",
             "--peer-layers", "middle"]  # the tests' tiny_init_flags
CYCLE_FLAGS = ["--batch-size", "4", "--eval-tokens", "512", "--grow-rows", "2", "--no-tensorboard", "--device", "cpu"]
PHASES = ["startup", "ingest", "prepare", "train", "evaluate", "commit", "committed", "idle"]
PAUSED = {"committed"}  # too short to hit by timing: the child waits there to be killed
LEASE_WAIT_MAX_S = 5.0  # a restarted scheduler waiting longer for a dead holder's lease: stuck
WORDS = ["river", "bridge", "market", "winter", "signal", "orchard", "harbor", "lantern", "meadow", "copper", "thunder", "violet"]

CHILD = textwrap.dedent(
    """
    import os, sys, time
    phases, pause = os.environ["LL_PHASES"], os.environ.get("LL_PAUSE", "")

    def mark(phase, extra=""):
        with open(phases, "a") as f:
            f.write(f"{time.time():.3f} {phase} {extra}\\n")
        if phase == pause:
            time.sleep(3600)  # the parent kills us here

    mark("start")
    import lifelong.cycle as cyc, lifelong.records as rec, lifelong.scheduler as sch

    def around(mod, name, before=None, after=None):
        real = getattr(mod, name)  # AttributeError: the module changed, update this wrapper

        def wrapped(*a, **kw):
            mark(before) if before else None
            out = real(*a, **kw)
            mark(*after(a, out)) if after else None
            return out
        setattr(mod, name, wrapped)

    around(cyc, "_prepare", before="ingest")
    around(cyc, "start_cycle", after=lambda a, out: ("prepare", out))
    around(cyc, "train", before="train")
    around(cyc, "_evaluate", before="evaluate")
    around(cyc, "commit_model", before="commit", after=lambda a, out: ("committed", out.version.id))
    around(cyc, "finish_cycle", after=lambda a, out: ("idle", f"{a[1]} {a[2]}"))
    around(sch, "_recover", after=lambda a, out: ("recovered", ""))
    real_acquire = rec.Lease.acquire

    def acquire(self):
        t0 = time.monotonic()
        real_acquire(self)
        mark("lease", f"{self.name} {time.monotonic() - t0:.3f}")
    rec.Lease.acquire = acquire
    from lifelong.cli.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


# ------------------------------------------------------------------------------ the store
def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i:05d}: " + " ".join(rng.choice(WORDS) for _ in range(6)) for i in range(n)]


def quiet_cli(*args: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli(list(args))
    if code != 0:
        raise RuntimeError(f"lifelong {' '.join(args)} failed ({code}):\n{out.getvalue()}")


def make_store(root: Path, docs: list[str], files: int, budget: int, every_s: float, init_flags: list[str] = TINY_INIT) -> Path:
    """A tiny store, stream ``docs`` over a drop folder of ``files`` files, one cycle job."""
    drop = root / "drop"
    drop.mkdir(parents=True)
    per = -(-len(docs) // files)
    for k in range(files):
        (drop / f"part-{k:03d}.txt").write_text("".join(d + "\n" for d in docs[k * per:(k + 1) * per]))
    store = root / "store"
    quiet_cli("--store", str(store), "init", *init_flags)
    quiet_cli("--store", str(store), "stream", "add", STREAM, str(drop))
    quiet_cli("--store", str(store), "schedule", "add", "cycle", STREAM, "--every", str(every_s), "--misfire-grace", "86400",
              "--budget", str(budget), *CYCLE_FLAGS)
    return store


class Stream:
    """The documents in reading order, the files' line counts, and the expected slices."""

    def __init__(self, store: Path, budget: int) -> None:
        self.files = sorted(str(p.resolve()) for p in (store.parent / "drop").iterdir())
        self.lines = [Path(f).read_text().splitlines() for f in self.files]
        self.docs = [d for lines in self.lines for d in lines]
        self.budget = budget

    def position(self, cursor: dict[str, Any] | None) -> int:
        """Documents before ``cursor``; raises unless it is a prefix (done files, then one partial)."""
        files = (cursor or {}).get("files", {})
        assert set(files) <= set(self.files), f"cursor names unknown files {set(files) - set(self.files)}"
        pos, open_file = 0, False
        for path, lines in zip(self.files, self.lines):
            fc = files.get(path)
            rows = 0 if fc is None else int(fc["rows"]) if not fc["done"] else len(lines)
            assert not (open_file and rows), f"cursor skips documents: {path} read after a partly read file"
            assert rows <= len(lines), f"cursor past the end of {path}"
            open_file = open_file or rows < len(lines)
            pos += rows
        return pos

    def slice_end(self, start: int) -> int:
        """Where one ingest with the budget stops from ``start`` (est. tokens: bytes + 1 a document)."""
        tokens, i = 0, start
        while i < len(self.docs) and tokens < self.budget:
            tokens += len(self.docs[i].encode()) + 1
            i += 1
        return i

    def train_docs(self, start: int, end: int) -> int:
        return sum(not is_heldout(d, HOLDOUT) for d in self.docs[start:end])


# ------------------------------------------------------------------------------ the child
@dataclass
class Child:
    proc: subprocess.Popen
    marks: Path
    started: float
    run: int  # its section of scheduler.log starts "=== run N"

    def read(self) -> list[tuple[float, str, str]]:
        if not self.marks.exists():
            return []
        out = []
        for line in self.marks.read_text().splitlines():
            t, phase, *extra = line.split(" ", 2)
            out.append((float(t), phase, extra[0] if extra else ""))
        return out

    def wait_for(self, phase: str, timeout: float) -> float | None:
        """Time of the first mark ``phase``, or None at the timeout; raises if the child exits."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hit = [t for t, p, _ in self.read() if p == phase]
            if hit:
                return hit[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"the scheduler exited ({self.proc.returncode}) before phase '{phase}'")
            time.sleep(0.02)
        return None


def start_child(store: Path, work: Path, n: int, pause: str = "") -> Child:
    marks = work / f"marks-{n:03d}.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LL_PHASES": str(marks), "LL_PAUSE": pause,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(work / "scheduler.log", "a") as log:
        log.write(f"=== run {n}\n" + (f"(paused at {pause})\n" if pause else ""))
        log.flush()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, "--store", str(store), "schedule", "run"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    return Child(proc, marks, time.time(), n)


def phase_at(marks: list[tuple[float, str, str]]) -> str:
    """The phase the child was in when it died: its last phase mark."""
    names = {"start": "startup", "recovered": "startup", "lease": None}
    last = "startup"
    for _, p, _ in marks:
        p = names.get(p, p)
        if p is not None:
            last = p
    return last


def durations(marks: list[tuple[float, str, str]], started: float) -> dict[str, list[float]]:
    """Seconds spent in each phase, from the phases the child completed."""
    out: dict[str, list[float]] = {}
    seq = [(t, p) for t, p, _ in marks if p in PHASES]
    first_ingest = next((t for t, p in seq if p == "ingest"), None)
    if first_ingest is not None:
        out["startup"] = [first_ingest - started]
    for (t0, p0), (t1, _) in zip(seq, seq[1:]):
        out.setdefault(p0, []).append(t1 - t0)
    return out


# ------------------------------------------------------------------------------ the checks
@dataclass
class State:
    """What the checks learn across trials."""

    killed: list[int] = field(default_factory=list)  # pids of killed schedulers
    running_rows: set[int] = field(default_factory=set)  # rows a kill left 'running', awaiting a restart


def cycle_rows(store: ExpertStore) -> list[Any]:
    create_tables(store.engine)
    with store.engine.connect() as conn:
        return conn.execute(select(CycleRow.__table__).order_by(CycleRow.id)).all()


def check_store(path: Path, stream: Stream, state: State, recovered: bool) -> dict[str, Any]:
    """Raise AssertionError unless every invariant holds; return counts. ``recovered``: the last
    scheduler got as far as closing the rows earlier kills left running."""
    with ExpertStore.open(path) as store:
        problems = store.verify()
        assert not problems, f"verify: {[str(p) for p in problems]}"
        head = store.head()
        assert head is not None, "no HEAD"
        checkout_model(store, head)  # HEAD is complete: every object loads
        chain = list(reversed(store.log(head)))
        ids = [v.id for v in store.versions()]
        assert sorted(ids) == sorted(v.id for v in chain), f"versions beside HEAD's chain: {sorted(set(ids) - {v.id for v in chain})}"
        assert len(ids) == len(set(ids))
        cycles = [v.metrics.get("cycle") for v in chain[1:]]
        assert None not in cycles and len(set(cycles)) == len(cycles), f"versions per cycle: {cycles}"
        pos = stream.position(chain[0].cursors.get(STREAM))
        assert pos == 0, "the initial version has consumed documents"
        for parent, v in zip(chain, chain[1:]):
            start, end = stream.position(parent.cursors.get(STREAM)), stream.position(v.cursors.get(STREAM))
            assert end > start, f"version {v.id}: cursor did not advance beyond its parent {parent.id} ({start} -> {end})"
            want, train = stream.slice_end(start), stream.train_docs(start, end)
            assert end == want, f"version {v.id}: consumed [{start}, {end}), expected [{start}, {want})"
            assert v.metrics["new_docs"] == train, f"version {v.id}: trained on {v.metrics['new_docs']} documents, [{start}, {end}) has {train}"
            pos = end
        head_cursor = store.version(head).cursors.get(STREAM)
        pending = open_registry(store, progress=False).pending(STREAM, head_cursor)
        rest = len(stream.docs) - pos
        assert pending.docs == rest, f"registry: {pending.docs} documents pending, HEAD's cursor says {rest}"

        rows = cycle_rows(store)
        by_cycle = {v.metrics["cycle"]: v.id for v in chain[1:]}
        running = {r.id for r in rows if r.status == "running"}
        if recovered:
            stale = running & state.running_rows
            assert not stale, f"rows {sorted(stale)} left running by a killed scheduler were not closed on restart"
        killed_pids = {f":{pid}" for pid in state.killed}
        for r in rows:
            if r.status == "running":
                assert any(r.holder.endswith(p) for p in killed_pids), f"row {r.id} is running under a live holder {r.holder}"
            elif r.id in by_cycle:
                assert r.status == "committed" and r.version == by_cycle[r.id], (
                    f"cycle {r.id} committed version {by_cycle[r.id]} but its row says {r.status} {r.version}")
            else:
                assert r.status in ("abandoned", "interrupted") and r.version is None, f"row {r.id}: {r.status} version {r.version}"
        missing = set(by_cycle) - {r.id for r in rows}
        assert not missing, f"versions of cycles without a row: {missing}"
        state.running_rows = running
        with store.engine.connect() as conn:
            leases = conn.execute(select(LeaseRow)).all()
        return {"head": head, "versions": len(chain) - 1, "consumed": pos, "running_rows": len(running),
                "leases_left": len(leases), "recovered_committed": sum(bool((r.detail or {}).get("recovered")) for r in rows)}


def lease_waits(marks: list[tuple[float, str, str]]) -> dict[str, float]:
    waits: dict[str, float] = {}
    for _, p, extra in marks:
        if p == "lease":
            name, secs = extra.split()
            waits[name] = max(waits.get(name, 0.0), float(secs))
    return waits


# ------------------------------------------------------------------------------ the run
@dataclass
class Summary:
    trials: int = 0
    kills_by_phase: dict[str, int] = field(default_factory=dict)
    versions_committed: int = 0
    documents_consumed: int = 0
    rows_abandoned: int = 0
    rows_recovered_committed: int = 0
    leases_left_by_kills: int = 0
    max_lease_wait_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class Harness:
    """One store and the schedulers started on it, one after the other."""

    store: Path
    work: Path
    stream: Stream
    rng: random.Random
    patience_s: float
    say: Any
    summary: Summary = field(default_factory=Summary)
    state: State = field(default_factory=State)
    typical: dict[str, list[float]] = field(default_factory=lambda: {p: [0.5] for p in PHASES})  # seconds per phase
    runs: int = 0

    def start(self, pause: str = "") -> Child:
        self.runs += 1
        return start_child(self.store, self.work, self.runs, pause)

    def after_restart(self, child: Child) -> None:
        """The scheduler took the leases at once, skipped no cycle for a held lease, and no job failed."""
        waits = lease_waits(child.read())
        self.summary.max_lease_wait_s = max([self.summary.max_lease_wait_s, *waits.values()])
        slow = {n: s for n, s in waits.items() if s > LEASE_WAIT_MAX_S}
        assert not slow, f"the restarted scheduler waited for leases: {slow}"
        text = (self.work / "scheduler.log").read_text().split(f"=== run {child.run}\n", 1)[-1].split("\n=== run ", 1)[0]
        assert "skipped: another cycle is running" not in text, "a cycle was skipped for a held cycle lease (stuck lease)"
        assert "Traceback" not in text, "a job failed:\n" + text[text.index("Traceback"):][:3000]

    def run_cycles(self, cycles: int) -> dict[str, Any]:
        """A scheduler runs ``cycles`` more cycles and is stopped with SIGTERM: exit 0, all checks."""
        with ExpertStore.open(self.store) as st:
            last_row = max((r.id for r in cycle_rows(st)), default=0)
        child = self.start()
        try:
            end = time.monotonic() + self.patience_s
            while sum(p == "idle" and int(x.split()[0]) > last_row for _, p, x in child.read()) < cycles:
                assert child.proc.poll() is None, f"the scheduler exited ({child.proc.returncode})"
                assert time.monotonic() < end, f"the scheduler ran no {cycles} cycles in {self.patience_s:.0f} s"
                time.sleep(0.1)
            child.proc.send_signal(signal.SIGTERM)
            code = child.proc.wait(120)
            assert code == 0, f"the scheduler exited {code} on SIGTERM"
        finally:
            _kill(child)
        self.after_restart(child)
        counts = check_store(self.store, self.stream, self.state, recovered=True)
        assert counts["running_rows"] == 0 and counts["leases_left"] == 0, f"after a clean stop: {counts}"
        for p, secs in durations(child.read(), child.started).items():
            self.typical[p] = secs
        return counts

    def trial(self, target: str, paused: bool) -> str:
        """Start a scheduler, SIGKILL it in phase ``target`` (at its start if ``paused``, else
        at random in its typical length), check everything; one line."""
        child = self.start(pause=target if paused else "")
        delay = 0.0
        try:
            if target == "startup":
                delay = self.rng.uniform(0, statistics.median(self.typical["startup"]))
                time.sleep(delay)
            elif child.wait_for(target, self.patience_s) is None:
                raise RuntimeError(f"the scheduler never reached phase '{target}' in {self.patience_s:.0f} s")
            elif not paused:
                delay = self.rng.uniform(0, statistics.median(self.typical[target]))
                time.sleep(delay)
            exited = child.proc.poll()
        finally:
            _kill(child)
        if exited is not None:
            raise RuntimeError(f"the scheduler exited ({exited}) by itself")
        marks = child.read()
        killed_in = phase_at(marks)
        self.summary.trials += 1
        self.state.killed.append(child.proc.pid)
        self.summary.kills_by_phase[killed_in] = self.summary.kills_by_phase.get(killed_in, 0) + 1
        for p, secs in durations(marks, child.started).items():
            self.typical[p] = (self.typical[p] + secs)[-9:]
        self.after_restart(child)
        c = check_store(self.store, self.stream, self.state, recovered=any(p == "recovered" for _, p, _ in marks))
        self.summary.leases_left_by_kills += c["leases_left"] > 0
        return (f"target {target:9s} +{delay:5.2f} s, killed in {killed_in:9s} HEAD {c['head']:3d}, {c['versions']:3d} versions, "
                f"{c['consumed']:5d} docs consumed, {c['running_rows']} row running, {c['leases_left']} leases left: ok")


def _kill(child: Child) -> None:
    if child.proc.poll() is None:
        child.proc.kill()  # SIGKILL
    child.proc.wait(60)


def run(trials: int = 50, *, docs: int = 4000, files: int = 20, budget: int = 2400, every_s: float = 2.0, seed: int = 0,
        workdir: Path | None = None, phases: list[str] | None = None, pause: set[str] = PAUSED, measure: bool = True,
        patience_s: float = 600.0, init_flags: list[str] = TINY_INIT, say=print) -> Summary:
    """Measure two cycles, run ``trials`` kill-restart-check rounds (targets: ``phases`` in turn;
    killed at the start of those in ``pause``, else at random in them), then one clean cycle."""
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kill-scheduler-")))
        work.mkdir(parents=True, exist_ok=True)
        store = make_store(work, documents(docs, seed), files, budget, every_s, init_flags)
        h = Harness(store, work, Stream(store, budget), random.Random(seed), patience_s, say)
        if measure:  # two whole cycles (the first trains the untrained base in full)
            h.run_cycles(2)
            t = {p: statistics.median(h.typical[p]) for p in PHASES}
            say(f"measured: startup {t['startup']:.1f} s, cycle {sum(t[p] for p in PHASES[1:-1]):.1f} s ("
                + ", ".join(f"{p} {t[p]:.2f}" for p in PHASES[1:]) + ")")
        order = phases or PHASES
        for trial in range(trials):
            target = order[trial % len(order)]
            try:
                say(f"trial {trial + 1:3d}: " + h.trial(target, target in pause))
            except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
                h.summary.failures.append(f"trial {trial + 1} ({target}): {type(exc).__name__}: {exc}")
                say(f"trial {trial + 1:3d}: target {target:9s} FAILED: {type(exc).__name__}: {exc}")
        try:  # one clean scheduler: it closes what the last kill left, runs one more cycle, stops on SIGTERM
            c = h.run_cycles(1)
            with ExpertStore.open(store) as st:
                rows = cycle_rows(st)
            assert sum(r.status == "committed" for r in rows) == c["versions"]
            h.summary.versions_committed, h.summary.documents_consumed = c["versions"], c["consumed"]
            h.summary.rows_abandoned = sum(r.status == "abandoned" for r in rows)
            h.summary.rows_recovered_committed = c["recovered_committed"]
            say(f"clean run: HEAD {c['head']}, {c['versions']} versions, {c['consumed']} of {len(h.stream.docs)} documents consumed: ok")
        except Exception as exc:  # noqa: BLE001
            h.summary.failures.append(f"clean run: {type(exc).__name__}: {exc}")
            say(f"clean run FAILED: {type(exc).__name__}: {exc}")
        if h.summary.failures:
            log = work / "scheduler.log"
            say(f"scheduler log: {log}" if workdir else "scheduler log (tail):\n" + log.read_text()[-4000:])
    h.summary.seconds = time.perf_counter() - t_start
    return h.summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--docs", type=int, default=4000, help="documents in the stream")
    parser.add_argument("--files", type=int, default=20, help="files in the drop folder")
    parser.add_argument("--budget", type=int, default=2400, help="tokens a cycle consumes (about 40 documents)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between cycles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep the store, marks and scheduler.log here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    s = run(args.trials, docs=args.docs, files=args.files, budget=args.budget, every_s=args.every, seed=args.seed,
            workdir=args.workdir, say=(lambda *_: None) if args.json else print)
    if args.json:
        print(json.dumps(asdict(s) | {"ok": s.ok}, indent=2))
        return 0 if s.ok else 1
    print(f"trials:                        {s.trials}")
    print("kills by phase:                " + ", ".join(f"{p} {s.kills_by_phase.get(p, 0)}" for p in PHASES))
    print(f"versions committed:            {s.versions_committed}")
    print(f"documents consumed:            {s.documents_consumed}")
    print(f"rows abandoned (no version):   {s.rows_abandoned}")
    print(f"rows recovered as committed:   {s.rows_recovered_committed}")
    print(f"kills leaving leases:          {s.leases_left_by_kills}")
    print(f"longest lease wait on restart: {s.max_lease_wait_s:.3f} s")
    print(f"failures:                      {len(s.failures)}")
    for line in s.failures:
        print(f"  {line}")
    print(f"time:                          {s.seconds:.1f} s")
    return 0 if s.ok else 1


if __name__ == "__main__":
    sys.exit(main())
