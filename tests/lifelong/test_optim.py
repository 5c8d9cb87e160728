"""RowAdam: the exact row-wise update, only touched trainable rows, state across growth and
freezing, state_dict round trip, invalid settings."""

from __future__ import annotations

import copy

import pytest
import torch

from lifelong.config import PEERConfig
from lifelong.errors import ConfigError
from lifelong.optim import RowAdam
from lifelong.peer import PEERLayer

D = 16
N_COLS = 4


def make_layer(n_rows: int = 4, seed: int = 0) -> PEERLayer:
    torch.manual_seed(seed)
    return PEERLayer(PEERConfig(d_model=D, heads=2, top_k=4, d_key=8, n_rows=n_rows, n_cols=N_COLS))


def add_grads(layer: PEERLayer, rows: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gu, gv = torch.randn(len(rows), D, generator=g), torch.randn(len(rows), D, generator=g)
    layer.grads.add(torch.tensor(rows), gu, gv)
    return gu, gv


def test_one_step_is_the_row_wise_adam_update():
    layer = make_layer()
    u0, v0 = layer.expert_u.clone(), layer.expert_v.clone()
    opt = RowAdam([layer], lr=0.1, beta2=0.9, eps=1e-8)
    # two steps on row 5 (second moments accumulate), one on row 9 in the second step
    g1u, g1v = add_grads(layer, [5], seed=1)
    assert opt.step() == 1
    g2u, g2v = add_grads(layer, [5, 9], seed=2)
    assert opt.step() == 2

    def expected(row0, grads):
        m, out = 0.0, row0.clone()
        for t, g in enumerate(grads, start=1):
            m = 0.9 * m + 0.1 * float(g.pow(2).mean())
            out -= 0.1 * g / ((m / (1 - 0.9**t)) ** 0.5 + 1e-8)
        return out

    torch.testing.assert_close(layer.expert_u[5], expected(u0[5], [g1u[0], g2u[0]]))
    torch.testing.assert_close(layer.expert_v[5], expected(v0[5], [g1v[0], g2v[0]]))  # v has its own moment
    torch.testing.assert_close(layer.expert_u[9], expected(u0[9], [g2u[1]]))
    others = [i for i in range(layer.num_experts) if i not in (5, 9)]
    assert torch.equal(layer.expert_u[others], u0[others]) and torch.equal(layer.expert_v[others], v0[others])
    _, _, steps = opt.state[0]
    assert steps[5] == 2 and steps[9] == 1 and int(steps.sum()) == 3
    assert opt.step() == 0  # nothing collected: nothing done


def test_real_backward_updates_only_touched_trainable_rows():
    layer = make_layer()
    layer.freeze()
    layer.grow(2)
    start = layer.trainable_start
    assert start == 4 * N_COLS
    u0, v0, keys0 = layer.expert_u.clone(), layer.expert_v.clone(), layer.frozen_row_keys.clone()
    opt = RowAdam([layer], lr=0.05)
    torch.manual_seed(1)
    x = torch.randn(64, D)
    _, ids = layer.retrieve(layer.queries(x))
    touched = {i for i in ids.flatten().tolist() if i >= start}
    assert touched and min(ids.flatten().tolist()) < start  # frozen experts were retrieved too
    layer(x).pow(2).sum().backward()
    assert opt.step() == len(touched)
    changed = ((layer.expert_u != u0).any(1) | (layer.expert_v != v0).any(1)).nonzero().squeeze(1).tolist()
    assert set(changed) == touched
    assert torch.equal(layer.expert_u[:start], u0[:start]) and torch.equal(layer.expert_v[:start], v0[:start])
    assert torch.equal(layer.frozen_row_keys, keys0)
    _, second, steps = opt.state[0]
    assert second.shape == (layer.num_experts - start, 2)
    assert {i + start for i in steps.nonzero().squeeze(1).tolist()} == touched


def test_two_backward_passes_before_a_step_are_summed():
    a, b = make_layer(), make_layer()
    rows = [3, 7]
    gu1, gv1 = add_grads(a, rows, seed=1)
    gu2, gv2 = add_grads(a, rows, seed=2)
    b.grads.add(torch.tensor(rows), gu1 + gu2, gv1 + gv2)
    RowAdam([a], lr=0.1).step()
    RowAdam([b], lr=0.1).step()
    torch.testing.assert_close(a.expert_u, b.expert_u)
    torch.testing.assert_close(a.expert_v, b.expert_v)


def test_state_is_kept_across_growth_and_dropped_on_freeze():
    layer = make_layer()
    opt = RowAdam([layer], lr=0.1)
    add_grads(layer, [1, 6])
    opt.step()
    add_grads(layer, [6], seed=1)
    opt.step()
    _, second_before, _ = opt.state[0]
    second_before = second_before.clone()

    layer.grow(2)  # no freeze: the old rows stay trainable and keep their state
    new_id = 4 * N_COLS + 3
    add_grads(layer, [new_id], seed=2)
    opt.step()
    start, second, steps = opt.state[0]
    assert start == 0 and steps.shape == (6 * N_COLS,)
    assert (steps[1], steps[6], steps[new_id]) == (1, 2, 1)
    assert int(steps.sum()) == 4  # every other row, old or new, at 0
    assert torch.equal(second[: 4 * N_COLS], second_before)  # old rows' moments untouched by growth
    assert (second[4 * N_COLS :].count_nonzero(1) > 0).tolist() == [i == 3 for i in range(2 * N_COLS)]

    layer.freeze()
    layer.grow(1)  # the 6 old rows freeze: their state goes, the new row starts fresh
    add_grads(layer, [6 * N_COLS])
    opt.step()
    start, second, steps = opt.state[0]
    assert start == 6 * N_COLS and steps.tolist() == [1, 0, 0, 0] and second.shape == (N_COLS, 2)


def test_unfreezing_gives_formerly_frozen_rows_fresh_state():
    layer = make_layer()
    layer.freeze()
    layer.grow(1)
    opt = RowAdam([layer], lr=0.1)
    add_grads(layer, [4 * N_COLS + 1])
    opt.step()
    layer.unfreeze()  # the `full` policy: every row trainable again
    add_grads(layer, [0], seed=1)
    opt.step()
    start, _, steps = opt.state[0]
    assert start == 0 and steps.shape == (5 * N_COLS,)
    assert (steps[0], steps[4 * N_COLS + 1]) == (1, 1) and int(steps.sum()) == 2


def test_state_dict_round_trip_gives_the_same_next_step():
    layer = make_layer()
    opt = RowAdam([layer], lr=0.1, beta2=0.9)
    for s in range(3):
        add_grads(layer, [2, 5, 2 + s], seed=s)
        opt.step()
    state = opt.state_dict()
    assert set(state) == {"0.second", "0.steps", "0.start"}
    twin = copy.deepcopy(layer)
    fresh = copy.deepcopy(layer)
    resumed = RowAdam([twin], lr=0.1, beta2=0.9)
    resumed.load_state_dict({k: v.clone() for k, v in state.items()})
    restarted = RowAdam([fresh], lr=0.1, beta2=0.9)
    for lay, o in ((layer, opt), (twin, resumed), (fresh, restarted)):
        add_grads(lay, [2, 5], seed=9)
        o.step()
    assert torch.equal(layer.expert_u, twin.expert_u) and torch.equal(layer.expert_v, twin.expert_v)
    assert not torch.equal(layer.expert_u, fresh.expert_u)  # the state made a difference
    for k, v in opt.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k])


def test_loaded_state_is_a_copy():
    layer = make_layer()
    opt = RowAdam([layer])
    add_grads(layer, [0])
    opt.step()
    state = opt.state_dict()
    other = RowAdam([copy.deepcopy(layer)])
    other.load_state_dict(state)
    state["0.steps"].fill_(99)
    assert int(other.state[0][2].max()) == 1


def test_several_layers_have_their_own_state():
    a, b = make_layer(seed=0), make_layer(seed=1)
    opt = RowAdam([a, b], lr=0.1)
    add_grads(b, [3])
    assert opt.step() == 1
    assert set(opt.state) == {1}
    add_grads(a, [1, 2])
    add_grads(b, [3])
    assert opt.step() == 3
    assert int(opt.state[0][2].sum()) == 2 and int(opt.state[1][2][3]) == 2


@pytest.mark.parametrize("kwargs,name", [(dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(beta2=1.0), "beta2"),
                                         (dict(beta2=-0.1), "beta2")])
def test_invalid_settings_raise_config_error(kwargs, name):
    with pytest.raises(ConfigError, match=f"'{name}'"):
        RowAdam([make_layer()], **kwargs)


def test_beta2_zero_is_allowed():
    assert RowAdam([make_layer()], beta2=0.0).beta2 == 0.0
