"""lifelong: continual training of PEER language models with a versioned expert store.

The audit (FAISS) lives in :mod:`lifelong.audit` / :mod:`lifelong.auditing` and the scheduler
in :mod:`lifelong.scheduler`; they are not imported here to keep ``import lifelong`` light.
"""

from .checkpoint import checkout_model, commit_model, init_store
from .config import ModelConfig, PEERConfig, TrainConfig, load_config
from .cycle import CycleConfig, CycleResult, run_cycle
from .errors import ConfigError, LifelongError
from .evaluate import LossMatrix, loss_matrix
from .model import PEERLM
from .optim import RowAdam
from .peer import PEERLayer, product_key_topk
from .train import TrainResult, evaluate_loss, random_batches, train

__all__ = [
    "ConfigError",
    "CycleConfig",
    "CycleResult",
    "LifelongError",
    "LossMatrix",
    "ModelConfig",
    "PEERConfig",
    "PEERLM",
    "PEERLayer",
    "RowAdam",
    "TrainConfig",
    "TrainResult",
    "checkout_model",
    "commit_model",
    "evaluate_loss",
    "init_store",
    "load_config",
    "loss_matrix",
    "product_key_topk",
    "random_batches",
    "run_cycle",
    "train",
]
