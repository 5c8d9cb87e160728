"""Where things live inside a store directory, and the stream registry on the store's database."""

from __future__ import annotations

import sys
from pathlib import Path

from expert_store import ExpertStore
from streams import StreamRegistry

__all__ = ["open_registry", "tensorboard_dir", "defaults_cache_dir"]


def open_registry(store: ExpertStore, *, progress: bool | None = None, cls: type[StreamRegistry] = StreamRegistry, **kw) -> StreamRegistry:
    """The stream registry of ``store`` (its tables live in the store's database)."""
    work_dir = Path(store.path).resolve() / "streams"
    work_dir.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()
    return cls(store.engine, work_dir=str(work_dir), progress=progress, **kw)


def tensorboard_dir(store: ExpertStore) -> Path:
    """TensorBoard event files: ``tensorboard --logdir STORE/tensorboard``."""
    return Path(store.path).resolve() / "tensorboard"


def defaults_cache_dir(store: ExpertStore) -> Path:
    """Materialised embedded default streams (pydoc topics, licence texts)."""
    return Path(store.path).resolve() / "cache" / "defaults"
