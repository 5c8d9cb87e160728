"""lifelong: continual training of PEER language models with a versioned expert store."""

from .config import ModelConfig, PEERConfig, TrainConfig, load_config
from .errors import ConfigError, LifelongError
from .model import PEERLM
from .optim import RowAdam
from .peer import PEERLayer, product_key_topk
from .train import TrainResult, evaluate_loss, random_batches, train

__all__ = [
    "ConfigError",
    "LifelongError",
    "ModelConfig",
    "PEERConfig",
    "PEERLM",
    "PEERLayer",
    "RowAdam",
    "TrainConfig",
    "TrainResult",
    "evaluate_loss",
    "load_config",
    "product_key_topk",
    "random_batches",
    "train",
]
