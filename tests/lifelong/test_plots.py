"""Pictures: `lifelong eval --plot`, the cycle's TensorBoard image and the benchmark's arms
figure are written, and are valid PNGs of the requested size."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import struct
import zlib
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lifelong.cli.main import main
from lifelong.config import config_to_dict
from lifelong.evaluate import LossMatrix
from lifelong.monitor import Monitor
from lifelong.plots import arms_figure, figure_to_image, loss_matrix_figure, save_png

FAST = ["--grow-rows", "2", "--budget", "20000", "--eval-tokens", "2048", "--batch-size", "8", "--device", "cpu", "--no-progress"]
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
# v2 trained a; v3 trained b (a not evaluated); v4 trained c: None cells and forgetting on b
MATRIX = LossMatrix(versions=[2, 3, 4], streams=["a", "b", "c"], trained=["a", "b", "c"],
                    values=[[2.0, None, None], [None, 1.5, None], [2.4, 1.7, math.nan]])


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG, checking the signature, the IHDR CRC and the end."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(data[12:29])
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_config):
    """A tiny store with two committed cycles (streams a, then b)."""
    tmp = tmp_path_factory.mktemp("plots")
    rng = random.Random(0)
    for name, alphabet in (("a", "abcdefgh "), ("b", "0123456789+= ")):
        (tmp / f"{name}.txt").write_text("\n".join("".join(rng.choice(alphabet) for _ in range(60)) for _ in range(80)))
    (tmp / "model.json").write_text(json.dumps(config_to_dict(tiny_config())))
    path = tmp / "store"
    assert main(["--store", str(path), "init", "--config", str(tmp / "model.json")]) == 0
    for name in "ab":
        assert main(["--store", str(path), "stream", "add", name, str(tmp / f"{name}.txt")]) == 0
        assert main(["--store", str(path), "cycle", "--stream", name, *FAST, "--json"]) == 0
    return path


def run(store_dir, *args, capsys):
    code = main(["--store", str(store_dir), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_plot_writes_a_png_of_the_requested_size(store_dir, tmp_path, capsys):
    capsys.readouterr()
    target = tmp_path / "matrix.png"
    code, out, err = run(store_dir, "eval", "--plot", str(target), "--plot-size", "640x360", capsys=capsys)
    assert code == 0, err
    assert f"plot: {target}" in out and "nan" not in out
    assert png_size(target) == (640, 360)
    assert not [p for p in tmp_path.iterdir() if p.name != "matrix.png"]  # no temp file left

    code, out, err = run(store_dir, "eval", "--json", "--plot", str(tmp_path / "j.png"), capsys=capsys)
    ev = json.loads(out)
    assert code == 0 and ev["plot"] == str(tmp_path / "j.png") and ev["matrix"]["versions"] == [2, 3]
    assert png_size(tmp_path / "j.png") == (1200, 500)  # the default size


def test_eval_plot_usage_and_write_errors(store_dir, tmp_path, capsys):
    for bad in ("1200", "12x500", "axb", "1200x500x3"):
        with pytest.raises(SystemExit) as exc:
            main(["--store", str(store_dir), "eval", "--plot", str(tmp_path / "x.png"), "--plot-size", bad])
        assert exc.value.code == 2 and "WIDTHxHEIGHT" in capsys.readouterr().err
    code, _, err = run(store_dir, "eval", "--plot", str(tmp_path / "missing" / "x.png"), capsys=capsys)
    assert code == 1 and err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "missing").exists()


def test_eval_plot_without_rows_writes_nothing(tmp_path, tiny_config, capsys):
    (tmp_path / "model.json").write_text(json.dumps(config_to_dict(tiny_config())))
    store = tmp_path / "store"
    assert main(["--store", str(store), "init", "--config", str(tmp_path / "model.json")]) == 0
    capsys.readouterr()
    code, out, _ = run(store, "eval", "--plot", str(tmp_path / "m.png"), capsys=capsys)
    assert code == 0 and "no plot written" in out and len(out.strip().splitlines()) == 1
    code, out, err = run(store, "eval", "--json", "--plot", str(tmp_path / "m.png"), capsys=capsys)
    assert code == 0 and json.loads(out)["plot"] is None and "no plot written" in err
    assert not (tmp_path / "m.png").exists()


def test_monitor_logs_the_loss_matrix_image(tmp_path):
    monitor = Monitor(tmp_path / "tb")
    metrics = {"losses": {"a": 2.4, "b": 1.7, "c": math.nan}, "forgetting": MATRIX.forgetting(), "mean_heldout_loss": math.nan}
    monitor.cycle(7, metrics, matrix=MATRIX)
    monitor.cycle(8, {"losses": {}}, matrix=LossMatrix([], [], [], []))  # no rows: no image
    monitor.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "cycle/loss_matrix" in acc.Tags()["images"]
    images = acc.Images("cycle/loss_matrix")
    assert [(e.step, e.width, e.height) for e in images] == [(7, 1200, 500)]
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = acc.Tags()["scalars"]
    assert "heldout_loss/a" in scalars and "heldout_loss/c" not in scalars and "cycle/mean_heldout_loss" not in scalars


def test_a_plotting_failure_does_not_fail_the_monitor(tmp_path, monkeypatch):
    import lifelong.plots

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(lifelong.plots, "loss_matrix_figure", broken)
    monitor = Monitor(tmp_path / "tb")
    with pytest.warns(RuntimeWarning, match="no fonts"):
        monitor.cycle(1, {"losses": {"a": 2.0}}, matrix=MATRIX)
    monitor.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "heldout_loss/a" in acc.Tags()["scalars"] and not acc.Tags()["images"]


def test_matrices_with_none_cells_and_no_rows_draw(tmp_path):
    path = save_png(loss_matrix_figure(MATRIX, {"b": 0.2, "a": math.nan}, title="t"), tmp_path / "m.png", size=(333, 222))
    assert path == tmp_path / "m.png" and png_size(path) == (333, 222)
    assert figure_to_image(loss_matrix_figure(MATRIX)).shape == (500, 1200, 3)
    all_none = LossMatrix([2], ["a"], ["a"], [[None]])
    for m in (all_none, LossMatrix([], [], [], [])):
        img = figure_to_image(loss_matrix_figure(m, {}))
        assert img.dtype.name == "uint8" and img.shape == (500, 1200, 3)


def test_arms_figure_png(tmp_path):
    spec = importlib.util.spec_from_file_location("continual_report", SCRIPTS / "continual_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def arm(name, fgt, new, routing=None, **extra):
        return {"arm": name, "model": "peer", "policy": "freeze-experts", "mean_forgetting": fgt, "mean_new_stream_loss": new,
                "final_mean_loss": 2.5, "forgetting": {"stdlib": fgt}, "routing_to_grown": routing or {}, **extra}

    results = {"dense": arm("dense", 0.4, 2.0), "freeze-experts": arm("freeze-experts", -0.01, None, {"stdlib": 0.3, "pydoc": 0.1})}
    assert png_size(report.write_arms_figure(results, tmp_path / "arms.png")) == (1500, 500)
    results["freeze-experts"]["routing_retention"] = {"stdlib": 0.8}  # the lead's key, when present, is drawn
    assert png_size(report.write_arms_figure(results, tmp_path / "r.png", size=(900, 400))) == (900, 400)
    no_routing = {k: {**r, "routing_to_grown": {}} for k, r in results.items() if k == "dense"}
    assert len(arms_figure(no_routing).axes) == 2 and len(arms_figure(results).axes) == 3
    assert png_size(save_png(arms_figure({}), tmp_path / "empty.png")) == (1500, 500)
