"""Objects: the atomic write helper and content-addressed safetensors files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from expert_store import atomic_write
from expert_store.objects import ObjectStore, serialize_tensors

from store_testlib import tensors


def test_atomic_write_bytes_and_callable(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"one")
    atomic_write(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"old")

    def explode(f) -> None:
        f.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_serialization_is_the_safetensors_format() -> None:
    t = tensors(0) | {"flag": torch.tensor([True, False]), "half": torch.randn(3).to(torch.bfloat16), "scalar": torch.tensor(2.5)}
    header, chunks = serialize_tensors(t)
    raw = header + b"".join(bytes(c) for c in chunks)
    assert raw == save(t)
    loaded = load(raw)
    assert all(torch.equal(loaded[k], t[k]) for k in t)


def test_put_is_content_addressed_read_only_and_deduplicated(tmp_path: Path) -> None:
    objects = ObjectStore(tmp_path / "objects")
    first = objects.put(tensors(1))
    again = objects.put({k: v.clone() for k, v in tensors(1).items()})
    other = objects.put(tensors(2))
    assert first.written and not again.written and other.written
    assert first.hash == again.hash != other.hash
    path = objects.path(first.hash)
    assert path.parent.name == first.hash[:2] and path.name == first.hash[2:]
    assert objects.rehash(first.hash) == first.hash
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    assert sorted(objects.hashes()) == sorted([first.hash, other.hash])
    assert first.payload_bytes == sum(t.nbytes for t in tensors(1).values())
    assert first.size == path.stat().st_size
