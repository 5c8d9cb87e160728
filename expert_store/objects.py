"""Content-addressed safetensors objects and the one atomic file-write helper.

An object is a safetensors file named by the sha256 of its bytes and stored at
``objects/ab/cdef...`` (first two hex digits as a fan-out directory). Objects are
write-once: they are written through :func:`atomic_write` (temp file in the same
directory, fsync, ``os.replace``, fsync of the directory) and made read-only; writing an
object that already exists is skipped. Only safetensors bytes are ever read back — no
pickle.

Tensors are serialised here (not with ``safetensors.torch.save``) so that the bytes can be
hashed and written straight from the tensors' memory, without a second in-memory copy of a
multi-gigabyte shard; the layout is the one ``safetensors`` itself writes, so any
safetensors reader loads the files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import CorruptObjectError, MissingObjectError, ReadOnlyStoreError

__all__ = [
    "atomic_write",
    "fsync_dir",
    "is_read_only_error",
    "ObjectInfo",
    "ObjectStore",
    "serialize_tensors",
    "run_writes",
    "TensorSpec",
    "TEMP_MARKER",
]

#: Substring that marks temp files of :func:`atomic_write`; ``gc`` removes stale ones.
TEMP_MARKER = ".tmp-"

WriteData = Union[bytes, bytearray, memoryview, Callable[[BinaryIO], None]]

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}

_BY_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in _DTYPES.items()}

#: A tensor's dtype and shape, as an object's header describes it.
TensorSpec = tuple[torch.dtype, tuple[int, ...]]

#: Object writes a commit runs at once: the hashing, page-cache copy and fsync of one
#: overlap another's (hashlib, file writes and fsync release the GIL).
WRITERS = 2

K = TypeVar("K")
T = TypeVar("T")

_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def is_read_only_error(exc: OSError) -> bool:
    """Whether an OS error means "this place cannot be written" (permissions, read-only fs)."""
    return exc.errno in _READ_ONLY_ERRNOS


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (new or renamed files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: WriteData, *, mode: int | None = None) -> None:
    """Write ``path`` atomically: readers see the old file or the whole new one, never part.

    ``data`` is the file's bytes, or a callable that writes them to the binary file object
    it is given. The bytes go to a temp file in the same directory, which is flushed and
    fsynced, optionally ``chmod``-ed to ``mode``, moved over ``path`` with ``os.replace``,
    and the directory is fsynced so the rename survives a crash. On any error the temp
    file is removed and the error propagates; ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU-contiguous tensor, without copying."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def serialize_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[memoryview]]:
    """Safetensors layout of ``tensors`` as (header bytes, list of data chunks).

    Deterministic: identical tensors give identical bytes (hence the same object name).
    Tensors are ordered by element size (largest first, keeps data aligned) then name, as
    ``safetensors`` does.
    """
    prepared: list[tuple[str, torch.Tensor]] = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        prepared.append((name, tensor.detach().to("cpu").contiguous()))
    prepared.sort(key=lambda item: (-item[1].element_size(), item[0]))

    header: dict[str, object] = {}
    chunks: list[memoryview] = []
    offset = 0
    for name, tensor in prepared:
        view = _byte_view(tensor)
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        offset += view.nbytes
        chunks.append(view)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, chunks


def run_writes(jobs: Mapping[K, Callable[[], T]]) -> dict[K, T]:
    """Run object writes, :data:`WRITERS` at a time; all end before an error propagates."""
    if len(jobs) <= 1:
        return {key: job() for key, job in jobs.items()}
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="expert-store-write") as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@dataclass(frozen=True)
class ObjectInfo:
    """Result of :meth:`ObjectStore.put`."""

    hash: str
    size: int  # bytes of the file
    payload_bytes: int  # bytes of tensor data (what it occupies once loaded)
    written: bool  # False when an identical object already existed


class ObjectStore:
    """The ``objects/`` directory of a store: put, locate, re-hash, load, delete."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, hash: str) -> Path:
        """Where the object named ``hash`` lives."""
        return self.root / hash[:2] / hash[2:]

    def exists(self, hash: str) -> bool:
        return self.path(hash).is_file()

    def put(self, tensors: Mapping[str, torch.Tensor]) -> ObjectInfo:
        """Store ``tensors`` as one object; skip the write when it already exists."""
        header, chunks = serialize_tensors(tensors)
        digest = hashlib.sha256(header)
        for chunk in chunks:
            digest.update(chunk)
        name = digest.hexdigest()
        payload = sum(chunk.nbytes for chunk in chunks)
        size = len(header) + payload
        target = self.path(name)
        try:
            if target.is_file():
                # Refresh mtime: a concurrent gc spares recently touched unreachable objects.
                os.utime(target)
                return ObjectInfo(name, size, payload, written=False)
            if not target.parent.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.root)

            def write(f: BinaryIO) -> None:
                f.write(header)
                for chunk in chunks:
                    f.write(chunk)

            atomic_write(target, write, mode=0o444)
        except OSError as exc:
            if is_read_only_error(exc):
                raise ReadOnlyStoreError(
                    f"cannot write object into {self.root}: {exc.strerror}; the store is unchanged"
                ) from exc
            raise
        return ObjectInfo(name, size, payload, written=True)

    def rehash(self, hash: str) -> str:
        """sha256 of the object's file as it is on disk now."""
        path = self.path(hash)
        try:
            with open(path, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError as exc:
            raise MissingObjectError(f"object {hash} is missing ({path})", hash=hash) from exc

    def check(self, hash: str) -> None:
        """Raise :class:`CorruptObjectError` unless the object's bytes hash to its name."""
        actual = self.rehash(hash)
        if actual != hash:
            raise CorruptObjectError(
                f"object {hash} is corrupt: its bytes hash to {actual}", hash=hash
            )

    def load(self, hash: str, device: str | torch.device = "cpu", verify: bool = True,
             names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of an object (only ``names`` when given) on ``device``; re-hash
        first when ``verify``."""
        if verify:
            self.check(hash)
        path = self.path(hash)
        if not path.is_file():
            raise MissingObjectError(f"object {hash} is missing ({path})", hash=hash)
        try:
            if names is None:
                return load_file(path, device=str(device))
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {name: f.get_tensor(name) for name in names}
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CorruptObjectError(f"object {hash} cannot be parsed: {exc}", hash=hash) from exc

    def header(self, hash: str) -> dict[str, TensorSpec]:
        """Dtype and shape of each tensor of an object, from its header alone (not verified)."""
        path = self.path(hash)
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 100 * 2**20:
                    raise ValueError(f"header length {length} is implausible")
                raw = json.loads(f.read(length))
            return {
                name: (_BY_NAME[entry["dtype"]], tuple(int(n) for n in entry["shape"]))
                for name, entry in raw.items()
                if name != "__metadata__"
            }
        except FileNotFoundError as exc:
            raise MissingObjectError(f"object {hash} is missing ({path})", hash=hash) from exc
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptObjectError(f"object {hash} has an unreadable header: {exc!r}", hash=hash) from exc

    def hashes(self) -> Iterator[str]:
        """Names of all objects present on disk."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in sorted(sub.iterdir()):
                if TEMP_MARKER not in entry.name and entry.is_file():
                    yield sub.name + entry.name

    def temp_files(self) -> Iterator[Path]:
        """Leftover temp files of interrupted writes."""
        if self.root.is_dir():
            yield from sorted(p for p in self.root.glob(f"*/*{TEMP_MARKER}*") if p.is_file())

    def age(self, path: Path) -> float:
        """Seconds since ``path`` was last modified."""
        return time.time() - path.stat().st_mtime

    def delete(self, hash: str) -> None:
        """Remove an object (``gc`` only)."""
        self.path(hash).unlink(missing_ok=True)
