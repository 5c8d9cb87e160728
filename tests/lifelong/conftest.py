"""Fixtures of the lifelong tests: one tiny model shape for every test that needs a model.

``tiny_config(**overrides)`` builds the ``ModelConfig`` (PEER fields may be overridden by
name too: ``tiny_config(n_rows=6, peer_layers=[0, 1])``); ``tiny_config_file(**overrides)``
writes it as an ``init --config`` JSON file; ``tiny_init_flags`` are the ``lifelong init``
flags of the same shape. Test modules get these through the fixtures (conftest is not
importable as a module: every test directory has one). Tiny: d_model 32, 2 blocks, an 8 x 8 grid, 2 heads, top-4.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lifelong.config import ModelConfig, PEERConfig, config_to_dict
from lifelong.model import PEERLM

TINY_PEER = dict(d_model=32, heads=2, top_k=4, d_key=16, n_rows=8, n_cols=8)
TINY_MODEL = dict(d_model=32, n_layers=2, n_heads=2, block_size=64)
_PEER_FIELDS = {f.name for f in dataclasses.fields(PEERConfig)}


def make_tiny_config(**overrides: Any) -> ModelConfig:
    peer = {**TINY_PEER, **{k: v for k, v in overrides.items() if k in _PEER_FIELDS and k != "d_model"}}
    model = {**TINY_MODEL, **{k: v for k, v in overrides.items() if k not in _PEER_FIELDS or k == "d_model"}}
    peer["d_model"] = model["d_model"]
    return ModelConfig(**model, peer=PEERConfig(**peer))


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., ModelConfig]:
    """A factory: ``tiny_config(**overrides) -> ModelConfig`` (model or PEER fields by name).

    Session-scoped (it holds no state), so module-scoped fixtures can build stores with it."""
    return make_tiny_config


@pytest.fixture
def tiny_model() -> Callable[..., PEERLM]:
    """A factory: ``tiny_model(seed=0, **overrides) -> PEERLM`` of ``tiny_config(**overrides)``."""

    def build(seed: int = 0, **overrides: Any) -> PEERLM:
        torch.manual_seed(seed)
        return PEERLM(make_tiny_config(**overrides))

    return build


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Callable[..., Path]:
    """A factory writing ``tiny_config(**overrides)`` as an ``init --config`` JSON file."""

    def write(**overrides: Any) -> Path:
        path = tmp_path / "tiny_model.json"
        path.write_text(json.dumps(config_to_dict(make_tiny_config(**overrides))))
        return path

    return write


@pytest.fixture
def tiny_init_flags() -> list[str]:
    """``lifelong init`` flags for the tiny shape (block_size stays init's default)."""
    p, m = TINY_PEER, TINY_MODEL
    return ["--rows", str(p["n_rows"]), "--cols", str(p["n_cols"]), "--d-model", str(m["d_model"]), "--layers", str(m["n_layers"]),
            "--heads", str(p["heads"]), "--top-k", str(p["top_k"]), "--d-key", str(p["d_key"]), "--peer-layers", "middle"]
