"""The training loop and its batches: schedule, batch makers, counters, stopping, NaN guard,
distillation and the optimizer state (tiny model, block_size 16, CPU)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lifelong.config import TrainConfig
from lifelong.errors import DataError
from lifelong.model import PEERLM
from lifelong.train import lr_factor, mixed_batches, random_batches, replay_rows, train

L = 16  # block_size of every model here
B = 4


def blocks(n: int, lo: int = 0, hi: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (n, L + 1)).astype(np.int64)


@pytest.fixture
def make_model(tiny_model):
    def make(seed: int = 0, **overrides) -> PEERLM:
        return tiny_model(seed, block_size=L, **overrides)

    return make


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": B, "warmup_steps": 1, **kw})


# --------------------------------------------------------------------------- schedule
def test_lr_factor_warmup_then_cosine_to_the_floor():
    c = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(s, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, c) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_factor(60, c) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down
    assert lr_factor(110, c) == pytest.approx(0.1)
    assert lr_factor(10_000, c) == pytest.approx(0.1)  # never below the floor
    after = [lr_factor(s, c) for s in range(10, 120)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr_factor(0, TrainConfig(steps=5, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(1.0)
    assert lr_factor(5, TrainConfig(steps=5, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- batches
def test_random_batches_shapes_epochs_and_seeding():
    data = blocks(10)
    gen = random_batches(data, B, seed=3)
    first = [next(gen) for _ in range(6)]
    assert all(b.shape == (B, L + 1) and b.dtype == torch.long for b in first)
    rows = {tuple(r.tolist()) for b in first[:2] for r in b}
    assert len(rows) == 2 * B  # one epoch (10 blocks, 2 full batches) repeats no block
    again = random_batches(data, B, seed=3)
    assert all(torch.equal(b, next(again)) for b in first)
    other = random_batches(data, B, seed=4)
    assert not all(torch.equal(b, next(other)) for b in first)


def test_random_batches_with_fewer_blocks_than_a_batch():
    data = blocks(2)
    gen = random_batches(data, 5, seed=0)
    for _ in range(3):
        batch = next(gen)
        assert batch.shape == (5, L + 1)
        known = {tuple(r) for r in data.tolist()}
        assert all(tuple(r) in known for r in batch.tolist())
    with pytest.raises(DataError, match="no training blocks"):
        next(random_batches(blocks(0), B, seed=0))


@pytest.mark.parametrize("ratio,n_replay", [(0.25, 2), (0.5, 4), (0.3, 2), (0.05, 0)])
def test_mixed_batches_exact_replay_share_and_mask(ratio, n_replay):
    new, replay = blocks(12, 0, 100, seed=1), blocks(5, 200, 256, seed=2)
    gen = mixed_batches(new, replay, 8, ratio, seed=0)
    for _ in range(5):
        batch, mask = next(gen)
        assert batch.shape == (8, L + 1) and mask.shape == (8,) and mask.dtype == torch.bool
        assert int(mask.sum()) == n_replay
        assert bool((batch[mask] >= 200).all()) and bool((batch[~mask] < 100).all())  # mask = replayed rows
    # the new rows of one epoch (12 blocks, 8 - n_replay per batch) repeat no block
    gen = mixed_batches(new, replay, 8, ratio, seed=0)
    per_epoch = len(new) // (8 - n_replay)
    seen = [tuple(r) for _ in range(per_epoch) for b, m in [next(gen)] for r in b[~m].tolist()]
    assert len(seen) == len(set(seen)) == per_epoch * (8 - n_replay)


def test_mixed_batches_keep_a_new_row_and_need_new_data():
    new, replay = blocks(12, 0, 100, seed=1), blocks(5, 200, 256, seed=2)
    assert replay_rows(8, 0.95, replay) == 7 and replay_rows(8, 0.95, None) == 0  # round(7.6) = 8 would leave no new row
    batch, mask = next(mixed_batches(new, replay, 8, 0.95, seed=0))
    assert int(mask.sum()) == 7 and bool((batch[~mask] < 100).all())
    with pytest.raises(DataError, match="no training blocks"):
        next(mixed_batches(blocks(0), replay, 8, 0.25, seed=0))


@pytest.mark.parametrize("replay", [None, blocks(0)])
def test_mixed_batches_without_replay_data(replay):
    new = blocks(16)
    gen = mixed_batches(new, replay, 8, 0.5, seed=0)
    for _ in range(3):
        batch, mask = next(gen)
        assert batch.shape == (8, L + 1) and not bool(mask.any())


def test_mixed_batches_are_seeded():
    new, replay = blocks(12, 0, 100), blocks(5, 200, 256)
    a, b, c = (mixed_batches(new, replay, 8, 0.5, seed=s) for s in (1, 1, 2))
    pairs = [(next(a), next(b), next(c)) for _ in range(3)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y, _ in pairs)
    assert not all(torch.equal(x[0], z[0]) for x, _, z in pairs)


# ---------------------------------------------------------------------------- train()
def test_train_counts_steps_tokens_and_reports_each_step(make_model):
    model = make_model()
    seen = []
    c = cfg(steps=5, warmup_steps=2, lr=2e-3)
    result = train(model, random_batches(blocks(16), B, 0), c, progress=False, on_step=lambda *a: seen.append(a))
    assert result.steps == 5 and len(result.losses) == 5
    assert result.tokens == 5 * B * L
    assert result.final_loss == pytest.approx(float(np.mean(result.losses)))
    assert (result.replayed_rows, result.distilled_rows) == (0, 0)
    assert [s for s, _, _ in seen] == list(range(5))
    assert [loss for _, loss, _ in seen] == result.losses
    assert [lr for _, _, lr in seen] == pytest.approx([c.lr * lr_factor(s, c) for s in range(5)])
    assert result.seconds > 0 and result.tokens_per_s > 0
    assert model.training
    offset = []
    train(model, random_batches(blocks(16), B, 0), cfg(steps=2), progress=False, step_offset=100,
          on_step=lambda *a: offset.append(a[0]))
    assert offset == [100, 101]  # e.g. the version's global step


def test_train_periodic_and_final_evaluation(make_model):
    result = train(make_model(), random_batches(blocks(16), B, 0), cfg(steps=4, eval_every=2, eval_batches=1),
                   eval_blocks=blocks(4, seed=9), progress=False)
    assert [step for step, _ in result.eval_losses] == [2, 4]  # the last step is evaluated once
    assert all(math.isfinite(v) for _, v in result.eval_losses)
    plain = train(make_model(), random_batches(blocks(16), B, 0), cfg(steps=4), progress=False)
    assert plain.eval_losses == []  # no eval blocks: no evaluation


def test_should_stop_stops_before_the_next_step(make_model):
    answers = iter([False, False, True])
    result = train(make_model(), random_batches(blocks(16), B, 0), cfg(steps=10), progress=False,
                   should_stop=lambda: next(answers), eval_blocks=blocks(4, seed=9))
    assert result.steps == 2 and len(result.losses) == 2 and result.tokens == 2 * B * L
    assert result.eval_losses[-1][0] == 2
    assert any(k.startswith("adamw.") for k in result.optimizer_state)  # still saved
    never = train(make_model(), random_batches(blocks(16), B, 0), cfg(steps=3), progress=False, should_stop=lambda: True)
    assert never.steps == 0 and math.isnan(never.final_loss)


def test_non_finite_loss_raises(make_model):
    model = make_model()
    with torch.no_grad():
        model.embed.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 0"):
        train(model, random_batches(blocks(16), B, 0), cfg(), progress=False)


def test_replay_and_distillation_counters(make_model):
    new, replay = blocks(16, 0, 100), blocks(8, 200, 256)
    model = make_model()
    teacher = make_model(seed=1).eval()

    def run(**kw):
        return train(copy.deepcopy(model), mixed_batches(new, replay, B, 0.5, seed=0), cfg(steps=3), progress=False, **kw)

    plain = run()
    assert (plain.replayed_rows, plain.distilled_rows) == (3 * 2, 0)
    assert run(teacher=teacher, distill_weight=0.0).distilled_rows == 0
    distilled = run(teacher=teacher, distill_weight=1.0)
    assert (distilled.replayed_rows, distilled.distilled_rows) == (6, 6)
    assert distilled.losses[0] > plain.losses[0] + 1e-3  # a different teacher: KL > 0 is paid
    no_replay = train(copy.deepcopy(model), mixed_batches(new, None, B, 0.5, seed=0), cfg(steps=3), progress=False,
                      teacher=teacher, distill_weight=1.0)
    assert (no_replay.replayed_rows, no_replay.distilled_rows) == (0, 0)


def test_distilling_from_an_identical_teacher_costs_nothing_at_first(make_model):
    # no query BatchNorm: train and eval mode compute the same function
    model = make_model(query_batchnorm=False)
    teacher = copy.deepcopy(model).eval()
    new, replay = blocks(16, 0, 100), blocks(8, 200, 256)
    plain = train(copy.deepcopy(model), mixed_batches(new, replay, B, 0.5, 0), cfg(steps=1), progress=False)
    same = train(copy.deepcopy(model), mixed_batches(new, replay, B, 0.5, 0), cfg(steps=1), progress=False,
                 teacher=teacher, distill_weight=5.0, distill_temperature=2.0)
    assert same.distilled_rows == 2
    assert same.losses[0] == pytest.approx(plain.losses[0], abs=1e-5)


def test_optimizer_state_survives_safetensors_and_changes_the_next_steps(make_model, tmp_path):
    model = make_model()
    first = train(model, random_batches(blocks(16), B, 0), cfg(steps=3), progress=False)
    assert {k.split(".")[0] for k in first.optimizer_state} == {"adamw", "rows"}
    save_file({k: v.contiguous() for k, v in first.optimizer_state.items()}, str(tmp_path / "opt.safetensors"))
    loaded = load_file(str(tmp_path / "opt.safetensors"))

    def resume(state):
        m = copy.deepcopy(model)
        r = train(m, random_batches(blocks(16), B, 1), cfg(steps=2), progress=False, optimizer_state=state)
        return m, r

    a, ra = resume(first.optimizer_state)
    b, rb = resume(loaded)
    c, rc = resume(None)
    assert ra.resumed_optimizer and rb.resumed_optimizer and not rc.resumed_optimizer
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the file holds the whole state
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # and the state matters


def test_adamw_state_of_another_shape_is_not_resumed(make_model):
    other = train(make_model(d_model=64, n_heads=2), random_batches(blocks(16), B, 0), cfg(steps=1), progress=False)
    result = train(make_model(), random_batches(blocks(16), B, 0), cfg(steps=1), progress=False,
                   optimizer_state=other.optimizer_state)
    assert not result.resumed_optimizer and result.steps == 1
    partial = {k: v for k, v in other.optimizer_state.items() if not k.startswith("adamw.0.")}
    assert not train(make_model(), random_batches(blocks(16), B, 0), cfg(steps=1), progress=False,
                     optimizer_state=partial).resumed_optimizer
    assert not train(make_model(), random_batches(blocks(16), B, 0), cfg(steps=1), progress=False,
                     optimizer_state={}).resumed_optimizer
