"""Content-addressed safetensors objects and the one atomic file-write helper.

An object is a safetensors file named by the sha256 of its bytes and stored at
``objects/ab/cdef...`` (first two hex digits as a fan-out directory). Objects are
write-once: they are written through :func:`atomic_write` (temp file in the same
directory, fsync, ``os.replace``, fsync of the directory) and made read-only; writing an
object that already exists is skipped. Only safetensors bytes are ever read back — no
pickle.

Reading is defensive: an object name must be a sha256 hex digest (a row cannot point
outside ``objects/``), an object or its fan-out directory that is a symbolic link or not a
regular file (a FIFO) is refused, and a header is checked in full before any tensor is
made — its length against the file, every tensor's dtype, shape and byte range, ranges that
overlap, leave gaps or run past the end — so a hostile file cannot cause a huge
allocation. A failed write becomes :class:`~expert_store.errors.StoreWriteError` ("disk
full while writing object …") or :class:`~expert_store.errors.ReadOnlyStoreError`.

Tensors are serialised here (not with ``safetensors.torch.save``) so that the bytes can be
hashed and written straight from the tensors' memory, without a second in-memory copy of a
multi-gigabyte shard; the layout is the one ``safetensors`` itself writes, so any
safetensors reader loads the files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import time
from contextlib import suppress
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import CorruptObjectError, MissingObjectError
from .ioerrors import is_read_only_error, os_error

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
    "MAX_HEADER_BYTES",
    "is_object_name",
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

#: Longest safetensors header read (safetensors' own limit): a longer one is refused unread.
MAX_HEADER_BYTES = 100 * 2**20

_NAME = re.compile(r"[0-9a-f]{64}")


def is_object_name(name: str) -> bool:
    """Whether ``name`` can name an object: 64 lowercase hex digits (a sha256)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


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
    file is removed (as far as the disk lets it: ``gc`` removes what is left) and the
    error propagates; ``path`` is untouched.
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
        with suppress(OSError):  # the write's own error is the one to report
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
        """Where the object named ``hash`` lives; :class:`CorruptObjectError` for a name that
        is not a sha256 hex digest (a damaged row must not lead outside ``objects/``)."""
        if not is_object_name(hash):
            raise CorruptObjectError(
                f"object name {str(hash)[:80]!r} is not a sha256 hex digest; refusing to look for it "
                f"outside {self.root}", hash=str(hash),
            )
        return self.root / hash[:2] / hash[2:]

    def exists(self, hash: str) -> bool:
        """Whether the object is present as a regular file (a symlink or FIFO is not an object)."""
        if not is_object_name(hash):
            return False
        try:
            return stat.S_ISREG(os.lstat(self.path(hash)).st_mode)
        except OSError:
            return False

    def put(self, tensors: Mapping[str, torch.Tensor]) -> ObjectInfo:
        """Store ``tensors`` as one object; skip the write when it already exists.

        A failed write raises :class:`StoreWriteError` ("disk full while writing object …")
        or :class:`ReadOnlyStoreError`; the object is then absent or complete, never partial.
        """
        header, chunks = serialize_tensors(tensors)
        digest = hashlib.sha256(header)
        for chunk in chunks:
            digest.update(chunk)
        name = digest.hexdigest()
        payload = sum(chunk.nbytes for chunk in chunks)
        size = len(header) + payload
        target = self.path(name)
        try:
            if self.exists(name):
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

            atomic_write(target, write, mode=0o444)  # replaces a symlink or FIFO squatting the name
        except OSError as exc:
            raise os_error(exc, f"writing object {name[:12]}… into {self.root}") from exc
        return ObjectInfo(name, size, payload, written=True)

    def _open(self, hash: str) -> BinaryIO:
        """The object's file opened for reading, refusing a symbolic link (of the file or its
        fan-out directory) and anything that is not a regular file."""
        path = self.path(hash)
        try:
            if stat.S_ISLNK(os.lstat(path.parent).st_mode):
                raise CorruptObjectError(
                    f"object {hash}: directory {path.parent} is a symbolic link; refusing to follow it out of the store",
                    hash=hash)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise MissingObjectError(f"object {hash} is missing ({path})", hash=hash) from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptObjectError(
                    f"object {hash} is a symbolic link ({path} -> {os.readlink(path)}); refusing to follow it out "
                    "of the store", hash=hash) from exc
            raise CorruptObjectError(f"object {hash} cannot be opened ({path}): {exc.strerror}", hash=hash) from exc
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "FIFO" if stat.S_ISFIFO(mode) else "directory" if stat.S_ISDIR(mode) else "special file"
            raise CorruptObjectError(f"object {hash} is a {kind}, not a regular file ({path}); refusing to read it",
                                     hash=hash)
        return os.fdopen(fd, "rb")

    def rehash(self, hash: str) -> str:
        """sha256 of the object's file as it is on disk now."""
        with self._open(hash) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

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
        first when ``verify``. The header is checked in full first (see :meth:`header`)."""
        if verify:
            self.check(hash)
        try:
            specs = self.header(hash)
        except CorruptObjectError as exc:
            if isinstance(exc, MissingObjectError) or "invalid header" not in str(exc):
                raise
            raise CorruptObjectError(str(exc).replace("has an invalid header", "cannot be parsed: invalid header", 1),
                                     hash=hash) from exc
        if names is not None and not set(names) <= specs.keys():
            unknown = ", ".join(repr(n) for n in sorted(set(names) - specs.keys()))
            raise CorruptObjectError(f"object {hash} has no tensor {unknown}", hash=hash)
        path = self.path(hash)
        try:
            if names is None:
                return load_file(path, device=str(device))
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {name: f.get_tensor(name) for name in names}
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CorruptObjectError(f"object {hash} cannot be parsed: {exc}", hash=hash) from exc

    def header(self, hash: str) -> dict[str, TensorSpec]:
        """Dtype and shape of each tensor of an object, from its header alone (not re-hashed).

        The whole header is checked against the file (see :func:`parse_header`); a header
        that claims more than the file holds, overlapping tensors or an unknown dtype raise
        :class:`CorruptObjectError`.
        """
        with self._open(hash) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                return {name: (dtype, shape) for name, (dtype, shape, _) in parse_header(f, size).items()}
            except ValueError as exc:
                raise CorruptObjectError(f"object {hash} has an invalid header: {exc}", hash=hash) from exc

    def hashes(self) -> Iterator[str]:
        """Names of all objects present on disk (entries named like objects only)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in sorted(sub.iterdir()):
                if is_object_name(sub.name + entry.name) and (entry.is_file() or entry.is_symlink()):
                    yield sub.name + entry.name

    def temp_files(self) -> Iterator[Path]:
        """Leftover temp files of interrupted writes."""
        if self.root.is_dir():
            yield from sorted(p for p in self.root.glob(f"*/*{TEMP_MARKER}*") if p.is_file())

    def age(self, path: Path) -> float:
        """Seconds since ``path`` was last modified."""
        return time.time() - path.lstat().st_mtime

    def delete(self, hash: str) -> None:
        """Remove an object (``gc`` only)."""
        self.path(hash).unlink(missing_ok=True)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def parse_header(f: BinaryIO, size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]]:
    """Name -> (dtype, shape, (start, end) in the data) of a safetensors file of ``size``
    bytes open at its start; ``ValueError`` saying what is wrong unless the header is sound.

    Sound: the 8-byte length fits the file and :data:`MAX_HEADER_BYTES`; the JSON is an
    object of tensors, each with a known dtype, a shape of non-negative ints and a byte range
    whose length is exactly the shape's; the ranges, in order, tile the data from its first
    byte to the end of the file (no overlap, no gap, nothing past the end). Nothing is
    allocated beyond the header itself.
    """
    if size < 8:
        raise ValueError(f"the file holds {size} bytes, too few for a header length")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"it claims a {_bytes(length)} header in a file of {_bytes(size)}")
    try:
        raw = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"the header is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError("the header is not a JSON object")
    data = size - 8 - length
    out: dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]] = {}
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _BY_NAME:
            dtype = entry.get("dtype") if isinstance(entry, dict) else entry
            raise ValueError(f"tensor {name!r} has an unknown dtype {str(dtype)[:40]!r}")
        dtype = _BY_NAME[entry["dtype"]]
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r} has invalid data offsets {str(offsets)[:80]}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes != offsets[1] - offsets[0]:
            raise ValueError(f"tensor {name!r} claims shape {shape} ({_bytes(nbytes)} of {entry['dtype']}) "
                             f"but a byte range of {_bytes(offsets[1] - offsets[0])}")
        if offsets[1] > data:
            raise ValueError(f"tensor {name!r} claims bytes {offsets[0]}..{offsets[1]} of data, but the file "
                             f"holds {_bytes(data)} of data")
        out[name] = (dtype, tuple(shape), (offsets[0], offsets[1]))
    end = 0
    for name, (_, _, (start, stop)) in sorted(out.items(), key=lambda item: item[1][2]):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves a gap of {start - end} bytes"
            raise ValueError(f"tensor {name!r} (bytes {start}..{stop}) {what}")
        end = stop
    if end != data:
        raise ValueError(f"the tensors cover {_bytes(end)} but the file holds {_bytes(data)} of data")
    return out
