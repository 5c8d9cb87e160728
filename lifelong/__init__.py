"""lifelong: continual training of PEER language models with a versioned expert store.

The audit (FAISS: :mod:`lifelong.audit_exact`, :mod:`lifelong.audit_version`) and the
scheduler (:mod:`lifelong.scheduler`, :mod:`lifelong.jobstore`) are not imported here to keep
``import lifelong`` light.
"""

from .checkpoint import ShardMap, checkout_model, commit_model, init_store
from .config import CycleConfig, ModelConfig, PEERConfig, TrainConfig, cycle_config, load_config
from .cycle import CycleResult, run_cycle
from .errors import ConfigError, LifelongError
from .evaluate import LossMatrix, evaluate_loss, loss_matrix
from .growth import apply_policy
from .model import PEERLM
from .optim import RowAdam
from .peer import PEERLayer, product_key_topk
from .train import TrainResult, random_batches, train

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
    "ShardMap",
    "TrainConfig",
    "TrainResult",
    "apply_policy",
    "checkout_model",
    "commit_model",
    "cycle_config",
    "evaluate_loss",
    "init_store",
    "load_config",
    "loss_matrix",
    "product_key_topk",
    "random_batches",
    "run_cycle",
    "train",
]
