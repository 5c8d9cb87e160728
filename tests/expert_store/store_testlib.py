"""Small deterministic tensors and shards for the expert store tests."""

from __future__ import annotations

import torch

from expert_store import ExpertStore, NewShard

LAYER = "blocks.0.peer"


def tensors(seed: int, rows: int = 4, n2: int = 8, d: int = 16) -> dict[str, torch.Tensor]:
    """Row keys and expert weights of ``rows`` rows: (rows, 4), (rows*n2, d) x2."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "row_keys": torch.randn(rows, 4, generator=gen),
        "u": torch.randn(rows * n2, d, generator=gen),
        "v": torch.randn(rows * n2, d, generator=gen),
    }


def new_shard(seed: int, start: int, rows: int = 4, layer: str = LAYER, frozen: bool = False) -> NewShard:
    return NewShard(layer, start, start + rows, rows * 8, tensors(seed, rows), frozen=frozen)


def dense(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return {"embed.weight": torch.randn(32, 16, generator=gen), "norm.weight": torch.ones(16)}


def object_files(store: ExpertStore) -> set[str]:
    return set(store.objects.hashes())
