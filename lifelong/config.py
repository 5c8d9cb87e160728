"""Configuration dataclasses: defaults < config file (JSON) < CLI flags.

Every config validates itself in ``__post_init__`` and raises :class:`ConfigError` (a
``ValueError``) naming the offending field, so that a bad value never turns into a shape
error deep inside torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["PEERConfig", "ModelConfig", "TrainConfig", "load_config", "config_to_dict", "config_from_dict", "require"]

T = TypeVar("T")


def require(ok: bool, name: str, message: str) -> None:
    """Raise a ConfigError naming config field ``name`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid config field '{name}': {message}")


@dataclass
class PEERConfig:
    """One PEER layer (paper defaults in comments; CPU-sized defaults here)."""

    d_model: int = 256
    heads: int = 8  # paper: 8
    top_k: int = 16  # experts retrieved per head; paper: 16
    d_key: int = 128  # full product-key size; each sub-key has d_key // 2
    n_rows: int = 128  # n1: rows of the row codebook C1 (grows)
    n_cols: int = 128  # n2: columns, the column codebook C2 (fixed)
    query_batchnorm: bool = True  # paper Table 2: more even expert usage
    score: str = "softmax"  # "softmax" (paper) or "sigmoid"
    activation: str = "gelu"  # "gelu" or "relu"
    candidates: int | None = None  # per-side candidates; None = top_k (exact); fewer = approximate

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "top_k", "d_key", "n_rows", "n_cols"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        require(self.d_key % 2 == 0, "d_key", f"must be even (split into two sub-keys), got {self.d_key}")
        require(self.top_k <= self.n_rows, "top_k", f"top_k={self.top_k} exceeds the row codebook size n_rows={self.n_rows}")
        require(self.top_k <= self.n_cols, "top_k", f"top_k={self.top_k} exceeds the column codebook size n_cols={self.n_cols}")
        require(self.score in ("softmax", "sigmoid"), "score", f"must be 'softmax' or 'sigmoid', got {self.score!r}")
        require(self.activation in ("gelu", "relu"), "activation", f"must be 'gelu' or 'relu', got {self.activation!r}")
        if self.candidates is not None:
            require(
                isinstance(self.candidates, int) and 1 <= self.candidates <= self.top_k,
                "candidates",
                f"must be between 1 and top_k={self.top_k} (or null for exact), got {self.candidates!r}",
            )
            require(
                self.candidates**2 >= self.top_k,
                "candidates",
                f"candidates={self.candidates} gives {self.candidates ** 2} candidate pairs, fewer than top_k={self.top_k}",
            )

    @property
    def num_experts(self) -> int:
        return self.n_rows * self.n_cols


@dataclass
class ModelConfig:
    """A byte-level decoder-only transformer with PEER in place of some FFNs."""

    vocab_size: int = 260  # 256 bytes + EOS, PAD, BOS, reserved (streams.ByteTokenizer)
    pad_id: int = 257  # targets equal to it are ignored by the loss
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4  # attention heads
    block_size: int = 256  # context length
    ffn_mult: int = 4  # dense FFN hidden = ffn_mult * d_model
    peer_layers: list[int] | None = None  # None = the middle block (paper); [] = dense model
    dropout: float = 0.0
    peer: PEERConfig = field(default_factory=PEERConfig)

    def __post_init__(self) -> None:
        if isinstance(self.peer, dict):
            self.peer = PEERConfig(**self.peer)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "block_size", "ffn_mult"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        require(self.d_model % self.n_heads == 0, "n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(
            self.peer.d_model == self.d_model,
            "peer.d_model",
            f"PEER d_model={self.peer.d_model} does not match the model's d_model={self.d_model}",
        )
        if self.peer_layers is None:
            self.peer_layers = [self.n_layers // 2]
        self.peer_layers = sorted(set(int(i) for i in self.peer_layers))
        for i in self.peer_layers:
            require(0 <= i < self.n_layers, "peer_layers", f"block {i} does not exist (n_layers={self.n_layers})")


@dataclass
class TrainConfig:
    """The training loop's knobs."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3  # AdamW: dense, query and key parameters
    expert_lr: float = 1e-2  # row-wise sparse optimizer: expert tables
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay floor
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        for name in ("lr", "expert_lr"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, rejecting unknown fields by name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) for {cls.__name__}: {', '.join(unknown)}")
    return cls(**data)


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Defaults < JSON file at ``path`` < ``overrides`` (``None`` values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(cls, data)
