"""Differences between two versions: shards and experts per layer, metrics, dense weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .records import ShardInfo, VersionInfo

__all__ = ["LayerDiff", "VersionDiff", "diff_versions"]


@dataclass(frozen=True)
class LayerDiff:
    """Shards of one layer: ``changed`` pairs (shard in ``a``, shard in ``b``) cover the same
    rows with different contents (a delta shard, or a shard written anew); ``added`` and
    ``removed`` are the other shards present only in ``b`` or only in ``a``."""

    layer: str
    added: list[ShardInfo] = field(default_factory=list)
    removed: list[ShardInfo] = field(default_factory=list)
    changed: list[tuple[ShardInfo, ShardInfo]] = field(default_factory=list)

    @property
    def experts_changed(self) -> int:
        return sum(new.n_experts for _, new in self.changed)

    @property
    def experts_added(self) -> int:
        return sum(s.n_experts for s in self.added)

    @property
    def experts_removed(self) -> int:
        return sum(s.n_experts for s in self.removed)

    @property
    def rows_added(self) -> int:
        return sum(s.rows for s in self.added)


@dataclass(frozen=True)
class VersionDiff:
    """From version ``a`` to version ``b``."""

    a: int
    b: int
    layers: dict[str, LayerDiff]
    metrics: dict[str, tuple[Any, Any]]  # name -> (value in a or None, value in b or None)
    dense_changed: bool
    shared_shards: list[int]

    @property
    def empty(self) -> bool:
        return not self.layers and not self.metrics and not self.dense_changed

    def summary(self) -> str:
        """Human-readable lines, one per changed layer and metric."""
        lines = [f"v{self.a} -> v{self.b}: {len(self.shared_shards)} shard(s) shared"]
        for layer in self.layers.values():
            line = (
                f"  {layer.layer}: +{len(layer.added)} shard(s) (+{layer.experts_added} experts), "
                f"-{len(layer.removed)} shard(s) (-{layer.experts_removed} experts)"
            )
            if layer.changed:
                deltas = sum(new.is_delta for _, new in layer.changed)
                sliced = sum(new.is_sliced for _, new in layer.changed)
                line += f", ~{len(layer.changed)} changed ({deltas} as deltas" + (f", {sliced} sliced)" if sliced else ")")
            lines.append(line)
        for name, (old, new) in sorted(self.metrics.items()):
            lines.append(f"  {name}: {old} -> {new}")
        if self.dense_changed:
            lines.append("  dense weights changed")
        return "\n".join(lines)


def diff_versions(a: VersionInfo, b: VersionInfo) -> VersionDiff:
    """Compare two versions by shard identity (shard id), row ranges and metric values."""
    ids_a = {s.id for s in a.shards}
    ids_b = {s.id for s in b.shards}
    only_a = {(s.layer, s.row_start, s.row_end): s for s in a.shards if s.id not in ids_b}
    layers: dict[str, LayerDiff] = {}
    for shard in b.shards:
        if shard.id in ids_a:
            continue
        diff = layers.setdefault(shard.layer, LayerDiff(shard.layer))
        old = only_a.pop((shard.layer, shard.row_start, shard.row_end), None)
        if old is not None:
            diff.changed.append((old, shard))
        else:
            diff.added.append(shard)
    for shard in a.shards:
        if shard.id not in ids_b and (shard.layer, shard.row_start, shard.row_end) in only_a:
            layers.setdefault(shard.layer, LayerDiff(shard.layer)).removed.append(shard)
    metrics = {
        name: (a.metrics.get(name), b.metrics.get(name))
        for name in sorted(set(a.metrics) | set(b.metrics))
        if a.metrics.get(name) != b.metrics.get(name)
    }
    return VersionDiff(
        a=a.id,
        b=b.id,
        layers=dict(sorted(layers.items())),
        metrics=metrics,
        dense_changed=a.dense_hash != b.dense_hash,
        shared_shards=sorted(ids_a & ids_b),
    )
