"""Configs: validation names the field, dicts and JSON files, and the cycle settings
(defaults < file < flags or a job's settings)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from lifelong.config import (
    CycleConfig,
    ModelConfig,
    PEERConfig,
    TrainConfig,
    add_cycle_flags,
    config_from_dict,
    config_to_dict,
    cycle_config,
    load_config,
    positive_int,
)
from lifelong.errors import ConfigError, LifelongError

TRAIN_KNOBS = {"batch_size", "lr", "expert_lr"}
CYCLE_SETTINGS = {f.name for f in dataclasses.fields(CycleConfig) if "help" in f.metadata}


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (PEERConfig, dict(n_cols=0), "n_cols"),
        (PEERConfig, dict(activation="tanh"), "activation"),
        (PEERConfig, dict(candidates=17, top_k=16), "candidates"),
        (ModelConfig, dict(vocab_size=0), "vocab_size"),
        (ModelConfig, dict(dropout=1.0), "dropout"),
        (ModelConfig, dict(block_size=-1), "block_size"),
        (TrainConfig, dict(steps=0), "steps"),
        (TrainConfig, dict(batch_size=1.5), "batch_size"),
        (TrainConfig, dict(lr=0.0), "lr"),
        (TrainConfig, dict(expert_lr=-1e-3), "expert_lr"),
        (TrainConfig, dict(warmup_steps=-1), "warmup_steps"),
        (TrainConfig, dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (CycleConfig, dict(policy="grow-all"), "policy"),
        (CycleConfig, dict(grow_rows=0), "grow_rows"),
        (CycleConfig, dict(token_budget=0), "token_budget"),
        (CycleConfig, dict(replay_ratio=1.0), "replay_ratio"),
        (CycleConfig, dict(distill_weight=-0.1), "distill_weight"),
        (CycleConfig, dict(distill_temperature=0.0), "distill_temperature"),
        (CycleConfig, dict(key_init="zeros"), "key_init"),
        (CycleConfig, dict(epochs=0.0), "epochs"),
        (CycleConfig, dict(eval_tokens=0), "eval_tokens"),
        # wrong types, as a JSON file easily gives them: a ConfigError, never a TypeError
        (TrainConfig, dict(lr="0.1"), "lr"),
        (CycleConfig, dict(replay_ratio="0.5"), "replay_ratio"),
        (CycleConfig, dict(grow_rows=True), "grow_rows"),
        (CycleConfig, dict(train=None), "train"),
        (CycleConfig, dict(train=[1]), "train"),
        (ModelConfig, dict(dropout="x"), "dropout"),
        (ModelConfig, dict(peer=5), "peer"),
        (ModelConfig, dict(peer_layers="x"), "peer_layers"),
        (PEERConfig, dict(query_batchnorm=1), "query_batchnorm"),
    ],
)
def test_validation_names_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=f"'{field}'") as info:
        cls(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LifelongError)


def test_valid_edges_are_accepted():
    assert CycleConfig(token_budget=None, replay_ratio=0.0, distill_weight=0.0).token_budget is None
    assert TrainConfig(warmup_steps=0, min_lr_ratio=1.0).min_lr_ratio == 1.0
    assert ModelConfig(peer_layers=[]).peer_layers == []


def test_nested_configs_validate_too():
    with pytest.raises(ConfigError, match="'steps'"):
        CycleConfig(train={"steps": 0})
    with pytest.raises(ConfigError, match="'d_key'"):
        ModelConfig(d_model=32, peer={"d_model": 32, "d_key": 7, "top_k": 4, "n_rows": 8, "n_cols": 8})


@pytest.mark.parametrize(
    "cls,data,name",
    [
        (ModelConfig, {"bogus": 1}, "bogus"),
        (ModelConfig, {"peer": {"bogus": 1}}, "bogus"),
        (CycleConfig, {"train": {"bogus": 1}}, "bogus"),
        (CycleConfig, {"lr": 0.1}, "lr"),  # a train knob belongs under "train" in a dict/file
    ],
)
def test_config_from_dict_rejects_unknown_fields_even_nested(cls, data, name):
    with pytest.raises(ConfigError, match=f"unknown config field.*{name}"):
        config_from_dict(cls, data)


def test_config_from_dict_rejects_a_non_object():
    with pytest.raises(ConfigError, match="JSON object"):
        config_from_dict(TrainConfig, [1, 2])  # type: ignore[arg-type]


def test_config_from_dict_builds_nested_dataclasses_and_round_trips(tiny_config):
    model = config_from_dict(ModelConfig, {"d_model": 32, "n_heads": 2, "peer": {"d_model": 32, "n_rows": 12, "n_cols": 8, "top_k": 4}})
    assert isinstance(model.peer, PEERConfig) and model.peer.n_rows == 12 and model.peer.top_k == 4
    cycle = config_from_dict(CycleConfig, {"grow_rows": 3, "train": {"lr": 0.5, "steps": 7}})
    assert isinstance(cycle.train, TrainConfig) and (cycle.train.lr, cycle.train.steps, cycle.grow_rows) == (0.5, 7, 3)
    tiny = tiny_config(n_rows=6, peer_layers=[0, 1])
    assert config_from_dict(ModelConfig, json.loads(json.dumps(config_to_dict(tiny)))) == tiny


def test_load_config_file_and_overrides(tiny_config_file):
    path = tiny_config_file(n_rows=6)
    cfg = load_config(ModelConfig, path, block_size=32, dropout=None)  # None: not given
    assert cfg.peer.n_rows == 6 and cfg.d_model == 32
    assert cfg.block_size == 32 and cfg.dropout == 0.0
    assert load_config(ModelConfig, path).block_size == 64
    assert load_config(TrainConfig, None, lr=None, steps=3) == TrainConfig(steps=3)
    with pytest.raises(ConfigError, match="'n_heads'"):
        load_config(ModelConfig, path, n_heads=3)  # 32 % 3 != 0


def test_load_config_unreadable_or_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(ModelConfig, tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(ModelConfig, tmp_path)  # a directory
    broken = tmp_path / "broken.json"
    broken.write_text('{"d_model": 32,')
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(ModelConfig, broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(ModelConfig, listed)


# ------------------------------------------------------------------- cycle settings
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cycle", exit_on_error=False)
    add_cycle_flags(parser)
    return parser


def test_add_cycle_flags_one_flag_per_setting_with_help():
    actions = {a.dest: a for a in _parser()._actions if a.dest != "help"}
    assert set(actions) == CYCLE_SETTINGS | TRAIN_KNOBS
    assert len(CYCLE_SETTINGS) == len(dataclasses.fields(CycleConfig)) - 1  # every field but the nested train
    for cls in (CycleConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:  # TrainConfig.seed has none: --seed is the cycle's
                action = actions[f.name]
                assert action.help.startswith(f.metadata["help"]), f.name
                assert action.default is None  # so that a file's value is not overridden
    assert actions["token_budget"].option_strings == ["--budget"]
    assert actions["replay_ratio"].option_strings == ["--replay"]
    assert actions["distill_weight"].option_strings == ["--distill"]
    assert actions["grow_rows"].option_strings == ["--grow-rows"]
    assert actions["expert_lr"].option_strings == ["--expert-lr"]
    assert list(actions["policy"].choices) == ["full", "freeze-experts", "freeze-all", "sparse", "branch"]


def test_cycle_config_defaults_then_flags():
    assert cycle_config() == CycleConfig()
    assert cycle_config(_parser().parse_args([])) == CycleConfig()
    args = _parser().parse_args(["--budget", "100_000", "--replay", "0.25", "--lr", "0.5", "--batch-size", "4", "--policy", "full"])
    cfg = cycle_config(args)
    assert (cfg.token_budget, cfg.replay_ratio, cfg.policy) == (100_000, 0.25, "full")
    assert (cfg.train.lr, cfg.train.batch_size) == (0.5, 4)
    assert cfg.grow_rows == CycleConfig().grow_rows


def test_cycle_config_defaults_lt_file_lt_flags(tmp_path):
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps({"grow_rows": 5, "epochs": 2.0, "train": {"lr": 0.25, "steps": 9, "expert_lr": 0.03}}))
    from_file = cycle_config(None, file=path)
    assert (from_file.grow_rows, from_file.epochs, from_file.train.lr, from_file.train.steps) == (5, 2.0, 0.25, 9)
    cfg = cycle_config(_parser().parse_args(["--lr", "0.125", "--grow-rows", "3"]), file=path)
    assert cfg.train.lr == 0.125 and cfg.grow_rows == 3  # flags win
    assert cfg.epochs == 2.0 and cfg.train.steps == 9 and cfg.train.expert_lr == 0.03  # file keeps the rest
    assert cfg.replay_ratio == CycleConfig().replay_ratio  # defaults fill the gaps
    (tmp_path / "bad.json").write_text(json.dumps({"train": {"bogus": 1}}))
    with pytest.raises(ConfigError, match="bogus"):
        cycle_config(None, file=tmp_path / "bad.json")


def test_cycle_config_from_job_settings():
    cfg = cycle_config({"grow_rows": 3, "expert_lr": 0.05, "max_forgetting": None})
    assert cfg.grow_rows == 3 and cfg.train.expert_lr == 0.05 and cfg.max_forgetting is None
    with pytest.raises(ConfigError, match="unknown cycle setting.*bogus"):
        cycle_config({"grow_rows": 3, "bogus": 1})
    with pytest.raises(ConfigError, match="unknown cycle setting.*steps"):
        cycle_config({"steps": 3})  # a TrainConfig field that is not a cycle setting
    with pytest.raises(ConfigError, match="'grow_rows'"):
        cycle_config({"grow_rows": 0})
    with pytest.raises(ConfigError, match="'lr'"):
        cycle_config({"lr": -1.0})


def test_invalid_flag_values_are_rejected_with_the_field_named():
    with pytest.raises(ConfigError, match="'replay_ratio'"):
        cycle_config(_parser().parse_args(["--replay", "1.5"]))
    with pytest.raises(ConfigError, match="'distill_temperature'"):
        cycle_config(_parser().parse_args(["--distill-temperature", "0"]))
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--grow-rows", "0"])  # positive_int at parse time
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--policy", "grow-all"])


@pytest.mark.parametrize("text,value", [("1", 1), ("100_000", 100_000), ("007", 7)])
def test_positive_int_accepts(text, value):
    assert positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "ten", ""])
def test_positive_int_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int(text)
