"""Configuration dataclasses: defaults < config file (JSON) < CLI flags.

Every config validates itself in ``__post_init__`` and raises :class:`ConfigError` (a
``ValueError``) naming the offending field, so that a bad value never turns into a shape
error deep inside torch.

The cycle settings are listed once, here: each :class:`CycleConfig` field (and the
:class:`TrainConfig` knobs a cycle exposes) carries its command-line flag and help text in
its metadata. :func:`add_cycle_flags` puts them on a parser (``cycle``, ``train``,
``schedule add``); :func:`cycle_config` builds the config from those flags, a JSON file or
a scheduled job's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = [
    "PEERConfig", "ModelConfig", "TrainConfig", "CycleConfig", "POLICIES", "KEY_INITS", "load_config", "config_to_dict",
    "config_from_dict", "require", "add_cycle_flags", "cycle_settings", "cycle_config", "positive_int",
]

POLICIES = ("full", "freeze-experts", "freeze-all", "sparse", "branch")
KEY_INITS = ("queries", "random")

T = TypeVar("T")


def require(ok: bool, name: str, message: str) -> None:
    """Raise a ConfigError naming config field ``name`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid config field '{name}': {message}")


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_types(config: Any) -> None:
    """Every scalar field of a config dataclass holds a value of its annotated type (``float``
    takes ints, ``None`` only where the annotation allows it, never a bool for a number):
    a string from a JSON file fails here, naming the field, not later as a TypeError."""
    for f in dataclasses.fields(config):
        kinds = [k.strip() for k in str(f.type).split("|")]
        value = getattr(config, f.name)
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in _SCALARS.get(k, ()))
        nested = [k for k in kinds if k not in _SCALARS and k != "None" and not k.startswith(("list", "dict"))]
        if nested:  # a nested config: built from a dict by config_from_dict or __post_init__
            require(dataclasses.is_dataclass(value) and type(value).__name__ == nested[0], f.name,
                    f"must be a {nested[0]} (a JSON object), got {value!r}")
        elif allowed:
            ok = isinstance(value, bool) if bool in allowed else isinstance(value, allowed) and not isinstance(value, bool)
            require(ok, f.name, f"must be {' or '.join(kinds)}, got {value!r}")


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
        check_types(self)
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
        if isinstance(self.peer, Mapping):
            self.peer = config_from_dict(PEERConfig, self.peer)
        check_types(self)
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
        require(isinstance(self.peer_layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in self.peer_layers),
                "peer_layers", f"must be a list of block indices, got {self.peer_layers!r}")
        self.peer_layers = sorted(set(self.peer_layers))
        for i in self.peer_layers:
            require(0 <= i < self.n_layers, "peer_layers", f"block {i} does not exist (n_layers={self.n_layers})")


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0 (underscores allowed: 100_000)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _flag(default: Any, help: str, flag: str | None = None, **argparse_kw: Any) -> Any:
    """A dataclass field that is also a cycle setting: ``flag`` (default ``--field-name``),
    ``help`` and any other ``add_argument`` keywords (type, metavar, choices) in its metadata."""
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_kw})


@dataclass
class TrainConfig:
    """The training loop's knobs."""

    steps: int = 200
    batch_size: int = _flag(8, "sequences per batch", type=positive_int, metavar="N")
    lr: float = _flag(1e-3, "AdamW learning rate (dense, query and key parameters)", type=float)
    expert_lr: float = _flag(1e-2, "RowAdam learning rate (expert tables)", type=float)
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay floor
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        for name in ("lr", "expert_lr"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")


@dataclass
class CycleConfig:
    """One growth cycle: what grows, what trains, on how much data, and the guard."""

    policy: str = _flag("branch", "branch: grow; the parent's dense weights stay as a frozen branch that sees only the old "
                        "experts, the dense parts and new rows train, and prediction mixes the branches by their posterior "
                        "on the context (old text keeps its outputs; docs/continual.md); freeze-all: grow, only the new rows "
                        "train (with routing isolation); freeze-experts: grow, old experts and keys frozen, dense parts "
                        "train; full: fine-tune all, no growth; sparse: no growth, only the top-t experts per batch by "
                        "TF-IDF train", choices=POLICIES)
    grow_rows: int = _flag(8, "rows added to every PEER layer (ignored by `full`, and by `sparse` without --sparse-growth)", type=positive_int, metavar="N")
    token_budget: int | None = _flag(1_000_000, "new tokens taken from the stream per cycle", "--budget", type=positive_int, metavar="TOKENS")
    epochs: float = _flag(1.0, "passes over the new data (sets the number of steps)", type=float)
    replay_ratio: float = _flag(0.0, "share of each batch replayed from earlier streams' committed data", "--replay",
                                type=float, metavar="RATIO")
    distill_weight: float = _flag(0.0, "KL-to-previous-version weight on replayed rows (needs --replay)", "--distill",
                                  type=float, metavar="WEIGHT")
    distill_temperature: float = _flag(1.0, "softmax temperature of the distillation", type=float, metavar="T")
    key_init: str = _flag("queries", "new row keys from k-means of the new data's queries, or random", choices=KEY_INITS)
    routing_isolation: bool = _flag(True, "keep new row keys out of the top-k of earlier streams' query anchors, so old "
                                    "text keeps its experts (freeze-all, freeze-experts, sparse with growth; branch needs none: its old "
                                    "branches never see new rows)", action=argparse.BooleanOptionalAction)
    top_t: int = _flag(256, "policy sparse: expert rows trained per batch and layer (top-t by TF-IDF against the "
                       "background usage of earlier streams)", type=positive_int, metavar="N")
    sparse_growth: bool = _flag(False, "policy sparse: also grow --grow-rows rows per layer, trained in full (isolated "
                                "from old queries); old rows' experts train only where TF-IDF picks them",
                                action=argparse.BooleanOptionalAction)
    max_branches: int = _flag(8, "policy branch: at most this many frozen branches (each costs one forward of the dense "
                              "parts at prediction); beyond, a cycle runs freeze-all instead", type=positive_int, metavar="N")
    isolation_margin: float = _flag(0.1, "relative margin below an anchor's k-th old score that new rows must stay", type=float,
                                    metavar="FRACTION")
    eval_tokens: int = _flag(32_768, "held-out tokens per stream (a stable prefix)", type=positive_int, metavar="TOKENS")
    max_forgetting: float | None = _flag(None, "guard: above this forgetting (nats) the version is kept as candidate/<cycle> "
                                         "and HEAD does not move", type=float, metavar="NATS")
    seed: int = _flag(0, "seed of batching, growth and training", type=int)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train, Mapping):
            self.train = config_from_dict(TrainConfig, dict(self.train))
        check_types(self)
        require(self.policy in POLICIES, "policy", f"must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        require(isinstance(self.grow_rows, int) and self.grow_rows > 0, "grow_rows", f"must be a positive integer, got {self.grow_rows!r}")
        require(self.token_budget is None or self.token_budget > 0, "token_budget", f"must be positive, got {self.token_budget}")
        require(0.0 <= self.replay_ratio < 1.0, "replay_ratio", f"must be in [0, 1), got {self.replay_ratio}")
        require(self.distill_weight >= 0, "distill_weight", "must be >= 0")
        require(self.distill_temperature > 0, "distill_temperature", "must be positive")
        require(self.key_init in KEY_INITS, "key_init", f"must be one of {', '.join(KEY_INITS)}, got {self.key_init!r}")
        require(self.epochs > 0, "epochs", "must be positive")
        require(self.eval_tokens > 0, "eval_tokens", "must be positive")
        require(self.top_t > 0, "top_t", f"must be a positive integer, got {self.top_t}")
        require(self.max_branches > 0, "max_branches", f"must be a positive integer, got {self.max_branches}")
        require(self.isolation_margin >= 0, "isolation_margin", f"must be >= 0, got {self.isolation_margin}")


def _settings_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every cycle setting by name: CycleConfig's fields and the TrainConfig knobs with a flag."""
    out: dict[str, tuple[type, dataclasses.Field]] = {}
    for cls in (CycleConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                out[f.name] = (cls, f)
    return out


def add_cycle_flags(parser: argparse.ArgumentParser, title: str = "cycle settings") -> None:
    """Add one flag per cycle setting; each defaults to None (CycleConfig's default or a file's value)."""
    group = parser.add_argument_group(title, "defaults < --config FILE < these flags")
    for name, (_, f) in _settings_fields().items():
        flag = f.metadata["flag"] or "--" + name.replace("_", "-")
        default = "none" if f.default is None else f.default
        group.add_argument(flag, dest=name, default=None, help=f"{f.metadata['help']} (default: {default})", **f.metadata["argparse"])


def cycle_settings(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The cycle settings given (not None) in parsed flags or a mapping, flat by field name."""
    data = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {name: data[name] for name in _settings_fields() if data.get(name) is not None}


def cycle_config(settings: argparse.Namespace | Mapping[str, Any] | None = None, file: str | Path | None = None) -> CycleConfig:
    """Defaults < JSON ``file`` (CycleConfig fields, nested ``train``) < ``settings``.

    ``settings`` are parsed flags of :func:`add_cycle_flags` or a flat mapping of setting
    names (a scheduled job's); an unknown name raises :class:`ConfigError`.
    """
    if isinstance(settings, Mapping):
        unknown = sorted(set(settings) - set(_settings_fields()))
        if unknown:
            raise ConfigError(f"unknown cycle setting(s): {_names(unknown)}")
    given = cycle_settings(settings or {})
    data = _read_json(file) if file is not None else {}
    train = data.pop("train", None) or {}
    if not isinstance(train, Mapping):
        raise ConfigError(f"config file {file}: 'train' must be a JSON object, got {type(train).__name__}")
    train = dict(train)
    for name, value in given.items():
        (train if _settings_fields()[name][0] is TrainConfig else data)[name] = value
    return config_from_dict(CycleConfig, {**data, "train": train})


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def _names(names: list[str]) -> str:
    """Field names for a one-line message: as they are, or quoted when not printable."""
    return ", ".join(n if str(n).isprintable() else repr(n) for n in names)


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build ``cls`` from a dict (nested configs as dicts), rejecting unknown fields by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__} must be given as a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) for {cls.__name__}: {_names(unknown)}")
    kwargs = dict(data)
    for name, value in data.items():
        nested = fields[name].default_factory
        if isinstance(value, Mapping) and dataclasses.is_dataclass(nested):
            kwargs[name] = config_from_dict(nested, value)  # type: ignore[arg-type]
    return cls(**kwargs)


MAX_CONFIG_BYTES = 1 << 24  # a config file is a few hundred bytes; /dev/zero never ends


def _read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in the file at ``path``; any problem (unreadable, too large, not
    UTF-8, not JSON, nested too deeply, an integer of thousands of digits, not an object)
    is a :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise ConfigError(f"cannot read config file {path}: JSON nested too deeply") from exc
    except ValueError as exc:  # malformed JSON, or an integer of more than 4300 digits
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Defaults < JSON file at ``path`` < ``overrides`` (``None`` values are ignored)."""
    data = _read_json(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(cls, data)
