"""Fuzzed command lines and config files: ``lifelong`` answers with success, a usage error
(exit 2) or one ``error:`` line (exit 1, maybe a ``hint:`` after it) — never a traceback —
and config loading returns a config or raises ``ConfigError``, nothing else.

Commands are drawn from the cheap, local ones (stream verbs, ingest, version listing), with
arguments from a vocabulary of flags, odd values, hostile paths (a FIFO, ``/dev/zero``, a
file that is no store, bad data) and random text; relative paths resolve in a scratch
directory. Deterministic (``derandomize``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.cli.main import STORE_ENV, main
from lifelong.config import CycleConfig, ModelConfig, PEERConfig, TrainConfig, config_to_dict, cycle_config, load_config
from lifelong.errors import ConfigError

# LIFELONG_FUZZ_SCALE=N multiplies the cases (the long run: N=40 gives 10,800; docs/streams.md)
SCALE = int(os.environ.get("LIFELONG_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
TINY = ["--rows", "8", "--cols", "8", "--d-model", "32", "--layers", "2", "--heads", "2", "--top-k", "4",
        "--d-key", "16", "--peer-layers", "middle"]

ADD_FLAGS = ["--format", "--text-mode", "--text-field", "--on-bad-rows", "--on-changed", "--holdout",
             "--heldout-split", "--pattern", "--exclude", "--hub-config", "--split"]
GRAMMAR = {("stream", "add"): (2, ADD_FLAGS), ("stream", "list"): (0, []), ("stream", "show"): (1, []),
           ("stream", "remove"): (1, []), ("ingest",): (1, ["--budget", "--on-bad-rows"]),
           ("versions",): (0, []), ("log",): (1, []), ("show",): (1, []), ("status",): (0, []),
           ("diff",): (2, []), ("tag",): (2, [])}  # no cycle: a lucky line would train
NAMES = ["news", "s1", "h0-0", "h2-0", "h3-2", "x.y_z", "-a", "A" * 64, "A" * 65, "HEAD", "1"]
SWITCHES = {"--json", "--help", "-h", "--", "-"}
OTHER_FLAGS = ["--help", "-h", "--", "-", "--store", "--no-such-flag", "--seed", "--budget", "--config"]
VALUES = ["jsonl", "json", "csv", "parquet", "text", "hub", "xml", "line", "paragraph", "file", "skip",
          "error", "reread", "document", "chunk", "0", "1", "-1", "0.5", "1.5", "nan", "inf", "1e999",
          "99999999999999999999999", "HEAD", "HEAD~1", "HEAD~99999999999999999999", "v1", "main", "*",
          "**/*", "*.jsonl", "[", "..x", "../x", "x/../../y", "news", "a" * 80, "é", "\x00", "\n",
          "\udcff", "owner/dataset", "'", '"', "%s", "{}", "news", "s1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny store, data files good and bad, config files, and a scratch working dir."""
    root = tmp_path_factory.mktemp("fuzzcli")
    store = root / "store"
    old_env = os.environ.pop(STORE_ENV, None)
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    assert main(["--store", str(store), "init", *TINY]) == 0
    data = root / "data"
    (data / "drop").mkdir(parents=True)
    (data / "notes.txt").write_text("one line\ntwo lines\n")
    (data / "a.jsonl").write_text('{"text": "fine"}\n{"text": "broken"\n')
    (data / "drop" / "d.jsonl").write_text('{"text": "in the drop"}\n')
    (data / "c.csv").write_text("text,n\nx,1\ny,2,3\n")
    (data / "p.parquet").write_bytes(b"PAR1 not really")
    (data / "bin.txt").write_bytes(bytes(range(256)))
    (data / "mixed").mkdir()
    (data / "mixed" / "a.csv").write_text("text\nz\n")
    (data / "mixed" / "b.json").write_text('[{"text": "w"}]')
    os.mkfifo(data / "pipe.txt")
    configs = {"empty": b"", "array": b"[1, 2]", "notutf8": b'{"lr": "\xff"}', "deep": b"[" * 50_000,
               "unknown": b'{"zzz": 1}', "badtype": b'{"policy": 5}', "train": b'{"train": "x"}',
               "huge": b'{"steps": 1' + b"0" * 5000 + b"}", "nan": b'{"train": {"lr": NaN}}'}
    for name, raw in configs.items():
        (data / f"{name}.json").write_bytes(raw)
    scratch = root / "cwd"
    scratch.mkdir()
    (scratch / "here.txt").write_text("a local file\n")
    paths = [str(store), str(data / "notes.txt"), str(data / "a.jsonl"), str(data / "drop"),
             str(data / "c.csv"), str(data / "p.parquet"), str(data / "bin.txt"), str(data / "mixed"),
             str(data / "pipe.txt"), "/dev/zero", "/dev/null", str(data / "missing.txt"),
             str(data / "drop" / "*.jsonl"), "here.txt", "nothing-here"]
    paths += [str(data / f"{name}.json") for name in configs]
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        yield {"store": str(store), "paths": paths, "data": data, "configs": sorted(configs)}
    finally:
        os.chdir(cwd)
        datasets.logging.set_verbosity(level)
        if old_env is not None:
            os.environ[STORE_ENV] = old_env


def _safe(token: str) -> bool:
    """Random text that cannot name a place outside the scratch dir (``/``, ``~``, ``..``)."""
    return not token.startswith(("/", "~")) and ".." not in token and "add-defaults" not in token


def run_cli(argv: list[str], capsys) -> int:
    """Run ``lifelong`` in-process; assert the error contract; return the exit code."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code in (0, 1, 2), (code, err)
    if code == 1:
        lines = err.splitlines()
        errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert len(errors) == 1, f"not one error line: {err!r}"
        after = lines[errors[0] + 1:]
        assert len(after) <= 1 and all(line.startswith("hint: ") for line in after), err
    return code


@st.composite
def command_lines(draw, world):
    """``--store S COMMAND positionals [--flag value ...]`` following each command's
    grammar most of the time, so that most lines get past argparse to the code behind it;
    sometimes a positional too many or few, a flag of another command, or junk."""
    store = draw(st.sampled_from([world["store"]] * 8 + world["paths"][1:4] + ["/dev/null", "nowhere"]))
    words, (count, flags) = draw(st.sampled_from(sorted(GRAMMAR.items())))
    junk = st.text(max_size=10).filter(_safe)
    value = st.one_of(st.sampled_from(VALUES), st.sampled_from(world["paths"]), junk)
    positional = st.one_of(st.sampled_from(NAMES), st.sampled_from(world["paths"]), value)
    wrong = draw(st.integers(0, 9)) == 0
    line = [*words, *draw(st.lists(positional, min_size=count, max_size=count + wrong))]
    for flag in draw(st.lists(st.sampled_from(flags + ["--json"] + (OTHER_FLAGS if wrong else [])), max_size=3)):
        line += [flag] if flag in SWITCHES else [flag, draw(value)]
    if wrong:
        line.insert(draw(st.integers(0, len(line))), draw(value))
    return ["--store", store, *line]


def test_random_command_lines_never_raise_a_traceback(world, capsys):
    @settings(FUZZ, max_examples=120 * SCALE)
    @given(command_lines(world))
    def check(argv):
        run_cli(argv, capsys)

    check()


def test_stream_add_of_hostile_sources(world, capsys):
    """Every vocabulary path as a stream source, with and without --format: a stream, or
    one error line (FIFO, device, no store, several formats, missing)."""
    for i, path in enumerate(world["paths"]):
        for extra in ([], ["--format", "jsonl", "--on-bad-rows", "skip"]):
            code = run_cli(["--store", world["store"], "stream", "add", f"h{i}-{len(extra)}", path, *extra], capsys)
            if code == 0:
                assert run_cli(["--store", world["store"], "ingest", f"h{i}-{len(extra)}"], capsys) in (0, 1)
    assert run_cli(["--store", world["store"], "stream", "add", "pipe", world["paths"][8]], capsys) == 1
    assert run_cli(["--store", world["store"], "stream", "add", "mixed", world["paths"][7]], capsys) == 1


def _model_json() -> dict:
    return config_to_dict(ModelConfig(d_model=32, n_layers=2, peer=PEERConfig(d_model=32, n_rows=8, n_cols=8, top_k=4, heads=2, d_key=16)))


ODD = st.sampled_from([None, "x", "", [], {}, [1, "a"], [[1]], -1, 0, 1, 2.5, 1e308, True, False,
                       {"a": 1}, "nan", 10**30, -(10**30)])


def _json_with_nan(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


@st.composite
def config_files(draw):
    kind = draw(st.sampled_from(["random", "mutated", "truncated", "structure"]))
    base = draw(st.sampled_from([_model_json(), config_to_dict(CycleConfig()), config_to_dict(TrainConfig()), {}]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "structure":
        tree = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                            max_leaves=10)
        return _json_with_nan(draw(st.dictionaries(st.sampled_from(sorted(base) + ["peer", "train", "zz"]) if base
                                                   else st.text(max_size=5), tree, max_size=4)))
    data = json.loads(json.dumps(base))
    for key in draw(st.lists(st.sampled_from(sorted(data) or ["x"]), max_size=3)):
        data[key] = draw(ODD)
    raw = _json_with_nan(data)
    if kind == "truncated":
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


def test_config_files_load_or_raise_config_error(tmp_path):
    path = tmp_path / "config.json"

    @settings(FUZZ, max_examples=150 * SCALE)
    @given(config_files())
    def check(raw):
        path.write_bytes(raw)
        for load in (lambda: load_config(ModelConfig, path), lambda: load_config(PEERConfig, path),
                     lambda: load_config(TrainConfig, path), lambda: cycle_config(file=path)):
            try:
                load()
            except ConfigError as exc:
                assert "\n" not in str(exc)

    check()


def test_bad_config_files_on_the_command_line(world, capsys, tmp_path):
    for name in world["configs"]:
        path = str(world["data"] / f"{name}.json")
        assert run_cli(["--store", str(tmp_path / "new"), "init", "--config", path], capsys) == 1
        assert run_cli(["--store", str(tmp_path / "nowhere"), "cycle", "--stream", "s", "--config", path], capsys) == 1
    for path in (str(world["data"]), "/dev/zero", str(world["data"] / "missing.json")):
        assert run_cli(["--store", str(tmp_path / "new"), "init", "--config", path], capsys) == 1
    assert not Path(tmp_path / "new").exists()
