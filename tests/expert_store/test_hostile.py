"""A damaged or hostile store is refused, clearly: rows pointing outside ``objects/``, objects
replaced by symbolic links or FIFOs, safetensors headers claiming terabytes or overlapping
tensors, JSON values of hundreds of MB. Nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import threading
from pathlib import Path

import pytest
import torch
from sqlalchemy import update
from sqlalchemy.orm import Session

import expert_store.schema as schema
import expert_store.validation as validation
from expert_store import CorruptObjectError, ExpertStore, OversizedValueError, Residency, StoreError
from expert_store.objects import MAX_HEADER_BYTES, serialize_tensors
from expert_store.schema import Shard, Version
from lifelong.cli.main import main
from store_testlib import dense, new_shard


@pytest.fixture
def hostile(tmp_path: Path) -> ExpertStore:
    """A SQLite store with one version of two shards (its own, whatever backend the suite tests)."""
    store = ExpertStore.init(tmp_path / "store", {"d_model": 16})
    store.commit(shards=[new_shard(0, 0), new_shard(1, 4)], dense=dense(0), message="v1", parent=None)
    yield store
    store.close()


def _set_shard_object(store: ExpertStore, shard_id: int, object_hash: str) -> None:
    with Session(store.engine) as session, session.begin():
        session.execute(update(Shard).where(Shard.id == shard_id).values(object_hash=object_hash))


def _plant(store: ExpertStore, raw: bytes) -> str:
    """Put ``raw`` into ``objects/`` under its own sha256 (so re-hashing passes); its name."""
    name = hashlib.sha256(raw).hexdigest()
    path = store.objects.root / name[:2] / name[2:]
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(raw)
    return name


def _safetensors(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _cli(store: ExpertStore, *argv: str, capsys) -> tuple[int, str, str]:
    rc = main(["--store", str(store.path), *argv])
    captured = capsys.readouterr()
    return rc, captured.out.strip(), captured.err.strip()


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "ab/../../../store.db", "AB" * 32, ""])
def test_an_object_name_outside_objects_is_refused(hostile: ExpertStore, name: str, capsys) -> None:
    shard = hostile.version().shards[0]
    _set_shard_object(hostile, shard.id, name)
    with pytest.raises(CorruptObjectError, match="not a sha256 hex digest"):
        hostile.load_shard(shard.id)
    problems = hostile.verify()
    assert any("not a sha256 hex digest" in str(p) for p in problems), problems
    assert hostile.gc(grace_s=0).objects == [shard.object_hash]  # only the object the row no longer names
    rc, out, err = _cli(hostile, "verify", capsys=capsys)
    assert rc == 1 and err == "" and out.startswith("corrupt-object: ") and "not a sha256 hex digest" in out


def test_an_object_replaced_by_a_symlink_is_refused(hostile: ExpertStore, tmp_path: Path) -> None:
    shard = hostile.version().shards[0]
    path = hostile.objects.path(shard.object_hash)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(path.read_bytes())  # the very same bytes: the hash alone would not tell
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(CorruptObjectError, match="symbolic link"):
        hostile.load_shard(shard.id)
    assert any("symbolic link" in str(p) for p in hostile.verify())
    # A commit of the same tensors replaces the link by the real object.
    hostile.commit(shards=[new_shard(0, 0)], dense=dense(0), message="again", parent=1)
    assert not path.is_symlink() and hostile.verify() == []
    assert outside.read_bytes() == path.read_bytes()  # the file outside was never written


def test_a_symlinked_fanout_directory_is_refused(hostile: ExpertStore, tmp_path: Path) -> None:
    shard = hostile.version().shards[0]
    fanout = hostile.objects.path(shard.object_hash).parent
    elsewhere = tmp_path / "elsewhere"
    fanout.rename(elsewhere)
    fanout.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CorruptObjectError, match="symbolic link"):
        hostile.load_shard(shard.id)


def test_a_fifo_in_place_of_an_object_is_refused_without_blocking(hostile: ExpertStore) -> None:
    shard = hostile.version().shards[0]
    path = hostile.objects.path(shard.object_hash)
    path.unlink()
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            hostile.objects.check(shard.object_hash)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(10)
    assert outcome, "reading a FIFO object blocked"
    assert isinstance(outcome[0], CorruptObjectError) and "FIFO" in str(outcome[0])


def _header_cases() -> dict[str, tuple[bytes, str]]:
    floats = torch.arange(4, dtype=torch.float32).numpy().tobytes()  # 16 bytes
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    return {
        "terabyte header length": (_safetensors({"u": entry}, floats, length=2**40), "header in a file of"),
        "header over the limit": (_safetensors({"u": entry}, floats, length=MAX_HEADER_BYTES + 8), "header in a file of"),
        "terabyte tensor": (_safetensors({"u": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}, floats),
                            "claims shape"),
        "terabyte offsets": (_safetensors({"u": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}, floats),
                             "file holds"),
        "overlapping tensors": (_safetensors({"u": entry, "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                                             floats + floats[:8]), "overlaps"),
        "gap between tensors": (_safetensors({"u": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, floats),
                                "gap"),
        "unknown dtype": (_safetensors({"u": {**entry, "dtype": "F1024"}}, floats), "unknown dtype"),
        "negative shape": (_safetensors({"u": {**entry, "shape": [-4]}}, floats), "invalid shape"),
        "not json": (struct.pack("<Q", 8) + b"\xff" * 8 + floats, "not JSON"),
        "a pickle": (pickle.dumps({"u": torch.zeros(4)}), "header"),
    }


@pytest.mark.parametrize("case", list(_header_cases()))
def test_a_hostile_safetensors_header_is_refused(hostile: ExpertStore, case: str) -> None:
    raw, words = _header_cases()[case]
    name = _plant(hostile, raw)
    shard = hostile.version().shards[0]
    _set_shard_object(hostile, shard.id, name)
    for read in (lambda: hostile.objects.header(name), lambda: hostile.load_shard(shard.id),
                 lambda: hostile.objects.load(name, verify=False)):
        with pytest.raises(CorruptObjectError, match=words):  # "has an invalid header" or "cannot be parsed"
            read()
    assert any(name in str(p) for p in hostile.verify())


def test_a_huge_json_value_is_refused_unparsed(hostile: ExpertStore, monkeypatch, capsys) -> None:
    assert schema.MAX_JSON_BYTES <= 64 * 2**20  # "hundreds of MB" are refused
    monkeypatch.setattr(schema, "MAX_JSON_BYTES", 2**20)  # a 2 MiB blob stands for 300 MB here
    monkeypatch.setattr(validation, "MAX_JSON_BYTES", 2**20)
    blob = {"blob": "x" * (2 * 2**20)}
    with pytest.raises(OversizedValueError, match="nothing was written"):
        hostile.commit(shards=[], dense=dense(1), message="big", parent=1, metrics=blob)
    assert len(hostile.versions()) == 1
    with Session(hostile.engine) as session, session.begin():
        session.execute(update(Version).values(metrics=blob))
    calls = []
    real_loads = json.loads
    monkeypatch.setattr(schema.json, "loads", lambda text, *a, **k: calls.append(len(text)) or real_loads(text, *a, **k))
    with pytest.raises(OversizedValueError, match="refusing to load it"):
        hostile.version()
    assert all(n < 2**20 for n in calls)  # the blob itself was never parsed
    rc, _, err = _cli(hostile, "show", capsys=capsys)
    assert rc == 1 and err.startswith("error: ") and "\n" not in err and "MiB" in err


def test_nothing_is_ever_unpickled(hostile: ExpertStore, tmp_path: Path, monkeypatch) -> None:
    """Every read path of the store, with pickle and torch.load booby-trapped; and an object
    that is a pickle whose loading would run code is refused, the code never run."""
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    def trap(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, trap)
    version = hostile.version()
    name = _plant(hostile, pickle.dumps(Payload()))
    hostile.commit(shards=[new_shard(2, 8)], dense=dense(2), message="v2", parent=version.id,
                   optimizer={"step": torch.tensor(1)})
    Residency(hostile).checkout(hostile.version())
    hostile.load_dense()
    hostile.load_optimizer()
    assert hostile.verify() == []
    _set_shard_object(hostile, version.shards[0].id, name)
    with pytest.raises(StoreError):
        hostile.load_shard(version.shards[0].id)
    assert hostile.verify() and hostile.gc(grace_s=0) is not None
    assert not ran.exists()


def test_serialised_headers_pass_the_checks() -> None:
    """What the store writes (every dtype, scalars, empty tensors) passes the header checks."""
    import io

    from expert_store.objects import parse_header

    tensors = {"a": torch.zeros(0, 3), "b": torch.tensor(2.5), "c": torch.ones(3, dtype=torch.bfloat16),
               "d": torch.ones(2, 2, dtype=torch.int64), "e": torch.tensor([True, False])}
    header, chunks = serialize_tensors(tensors)
    raw = header + b"".join(bytes(c) for c in chunks)
    specs = parse_header(io.BytesIO(raw), len(raw))
    assert {n: (d, s) for n, (d, s, _) in specs.items()} == {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
