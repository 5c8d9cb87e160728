"""``diff_versions`` on hand-made records: identity by shard id, layers, metrics, dense."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from expert_store import ShardInfo, VersionInfo
from expert_store.diff import diff_versions

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def shard(id: int, layer: str, start: int, rows: int = 4, hash: str | None = None) -> ShardInfo:
    return ShardInfo(id, hash or f"h{id}", layer, start, start + rows, rows * 8, "float32", 0, False, None, T0)


def version(id: int, shards: list[ShardInfo], metrics: dict, dense: str = "d") -> VersionInfo:
    return VersionInfo(id, None, "", T0, metrics, {}, {}, dense, None, shards)


def test_layers_metrics_and_dense() -> None:
    kept = shard(1, "b.0", 0)
    a = version(1, [kept, shard(2, "b.1", 0)], {"loss": 3.0, "gone": 1, "same": 7})
    b = version(2, [kept, shard(3, "b.1", 0, rows=2), shard(4, "b.0", 4)], {"loss": 2.5, "new": 0, "same": 7})
    d = diff_versions(a, b)
    assert (d.a, d.b, d.shared_shards) == (1, 2, [1])
    assert list(d.layers) == ["b.0", "b.1"]  # sorted by layer name
    assert [s.id for s in d.layers["b.0"].added] == [4] and d.layers["b.0"].removed == []
    b1 = d.layers["b.1"]
    assert ([s.id for s in b1.added], [s.id for s in b1.removed]) == ([3], [2])
    assert (b1.experts_added, b1.experts_removed, b1.rows_added) == (16, 32, 2)
    assert d.metrics == {"gone": (1, None), "loss": (3.0, 2.5), "new": (None, 0)}
    assert not d.dense_changed and not d.empty
    lines = d.summary().splitlines()
    assert lines == ["v1 -> v2: 1 shard(s) shared",
                     "  b.0: +1 shard(s) (+32 experts), -0 shard(s) (-0 experts)",
                     "  b.1: +1 shard(s) (+16 experts), -1 shard(s) (-32 experts)",
                     "  gone: 1 -> None", "  loss: 3.0 -> 2.5", "  new: None -> 0"]


def test_identity_is_the_shard_id_not_the_bytes() -> None:
    a = version(1, [shard(1, "b.0", 0, hash="x")], {})
    b = version(2, [shard(2, "b.0", 0, hash="x")], {}, dense="other")
    d = diff_versions(a, b)
    layer = d.layers["b.0"]  # same rows, another shard: changed, not added and removed
    assert layer.added == [] and layer.removed == [] and [(x.id, y.id) for x, y in layer.changed] == [(1, 2)]
    assert layer.experts_added == 0 and layer.experts_changed == 32
    assert d.dense_changed and d.summary().endswith("  dense weights changed")
    same = diff_versions(a, version(3, list(a.shards), {}))
    assert same.empty and same.layers == {} and same.summary() == "v1 -> v3: 1 shard(s) shared"


def test_a_delta_shard_is_a_changed_shard() -> None:
    base, other = shard(1, "b.0", 0), shard(2, "b.0", 4)
    delta = replace(shard(3, "b.0", 0), base_id=1, depth=1, object_bytes=10)
    grown = shard(4, "b.0", 8)
    d = diff_versions(version(1, [base, other], {}), version(2, [delta, other, grown], {}))
    layer = d.layers["b.0"]
    assert [(x.id, y.id) for x, y in layer.changed] == [(1, 3)]
    assert [s.id for s in layer.added] == [4] and layer.removed == [] and d.shared_shards == [2]
    assert "~1 changed (1 as deltas)" in d.summary()
