"""The TensorBoard event files a cycle writes, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import random

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lifelong.checkpoint import init_store
from lifelong.config import CycleConfig, TrainConfig
from lifelong.cycle import run_cycle
from lifelong.monitor import Monitor
from streams import StreamRegistry


def test_cycle_writes_scalars_histogram_and_sample(tmp_path, tiny_config):
    rng = random.Random(0)
    for name, alphabet in (("a", "abcdefgh "), ("b", "0123456789+= ")):
        (tmp_path / f"{name}.txt").write_text("\n".join("".join(rng.choice(alphabet) for _ in range(60)) for _ in range(120)))
    store, _ = init_store(str(tmp_path / "store"), tiny_config())
    (tmp_path / "work").mkdir()
    reg = StreamRegistry(store.engine, work_dir=str(tmp_path / "work"))
    log_dir = tmp_path / "store" / "tensorboard"
    monitor = Monitor(log_dir)
    cfg = CycleConfig(grow_rows=2, token_budget=20_000, eval_tokens=2048, epochs=0.5, train=TrainConfig(batch_size=8))
    results = []
    for name in "ab":
        reg.add(name, str(tmp_path / f"{name}.txt"))
        results.append(run_cycle(store, reg, name, cfg, device="cpu", monitor=monitor, progress=False, log=lambda s: None))
    monitor.close()

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    for tag in ("train/loss", "train/lr", "heldout_loss/a", "heldout_loss/b", "forgetting/a", "cycle/mean_heldout_loss",
                "cycle/mean_forgetting", "cycle/experts", "cycle/model_bytes"):
        assert tag in scalars, tag
    layers = list(results[-1].metrics["usage"])
    assert layers and all(f"usage/{l}/used_percent" in scalars and f"usage/{l}/kl_uniform" in scalars for l in layers)
    assert all(f"usage_hist/{l}" in tags["histograms"] for l in layers)

    steps = [e.step for e in acc.Scalars("train/loss")]  # one point per step, continuing across cycles
    total = sum(r.metrics["steps"] for r in results)
    assert steps == list(range(total))
    loss_b = acc.Scalars("heldout_loss/b")
    assert [e.step for e in loss_b] == [results[1].cycle_id]
    assert abs(loss_b[0].value - results[1].metrics["losses"]["b"]) < 1e-4
    assert [e.step for e in acc.Scalars("heldout_loss/a")] == [r.cycle_id for r in results]

    texts = acc.Tensors("sample/text_summary")  # add_text is stored as a string tensor
    assert [e.step for e in texts] == [r.cycle_id for r in results]
    assert all(e.tensor_proto.string_val[0] for e in texts)
