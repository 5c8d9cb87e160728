"""Which shards' tensors are resident on a device; checkout with reuse and a byte budget.

A :class:`Residency` keeps the tensors of the shards of the last checked-out version on
one device. Checking out another version reuses the tensors of shards the two versions
share (same tensor objects, nothing read from disk), loads only the others and evicts
shards the new version no longer has. A checkout that would exceed the budget is refused
before anything is loaded or evicted.

A delta shard whose base (or any shard of its chain) is resident can start from a copy of
that and read only the later deltas (``reuse_bases``). That is the default off the CPU,
where copying on the device beats reading, re-hashing and transferring the base. On the
CPU it is off by default: a loaded object is a copy-on-write memory map of its file, so
loading the base costs its re-hash and the pages the deltas touch, while a copy costs
writing every byte again.

Tensors handed out are the stored contents; callers that train a shard in place must
clone it first, or the resident copy no longer matches its object.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch

from .errors import BudgetExceededError
from .records import ShardInfo, VersionInfo

if TYPE_CHECKING:
    from .store import ExpertStore

__all__ = ["Residency", "Checkout", "format_bytes"]

Tensors = dict[str, torch.Tensor]


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Checkout:
    """Result of :meth:`Residency.checkout`: the version's shards on the device, and what moved."""

    version: VersionInfo
    layers: dict[str, list[tuple[ShardInfo, Tensors]]]
    loaded: list[int] = field(default_factory=list)  # shard ids read from the store
    reused: list[int] = field(default_factory=list)  # shard ids already resident
    evicted: list[int] = field(default_factory=list)  # shard ids dropped
    bytes_loaded: int = 0
    seconds: float = 0.0


class Residency:
    """Resident shard tensors of one store on one device, within an optional byte budget."""

    def __init__(
        self,
        store: ExpertStore,
        device: Union[str, torch.device] = "cpu",
        budget_bytes: int | None = None,
        verify: bool = True,
        reuse_bases: bool | None = None,
    ) -> None:
        self.store = store
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.verify = verify
        self.reuse_bases = self.device.type != "cpu" if reuse_bases is None else reuse_bases
        self.version: VersionInfo | None = None
        self._resident: dict[int, tuple[ShardInfo, Tensors]] = {}

    # ------------------------------------------------------------ accounting

    def resident_shards(self) -> list[ShardInfo]:
        return [info for info, _ in self._resident.values()]

    def resident_bytes(self) -> int:
        """Bytes of shard tensors held on this residency's device."""
        return sum(_nbytes(tensors) for _, tensors in self._resident.values())

    def bytes_by_device(self) -> dict[str, int]:
        """Resident bytes per device (tensors could be moved by a caller; count where they are)."""
        out: dict[str, int] = {}
        for _, tensors in self._resident.values():
            for t in tensors.values():
                out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
        return out

    def bytes_by_layer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for info, tensors in self._resident.values():
            out[info.layer] = out.get(info.layer, 0) + _nbytes(tensors)
        return out

    # ------------------------------------------------------------ checkout / evict

    def checkout(self, version: Union[int, str, VersionInfo]) -> Checkout:
        """Make exactly the shards of ``version`` resident; reuse what is already there."""
        start = time.perf_counter()
        info = version if isinstance(version, VersionInfo) else self.store.version(version)
        wanted = {s.id: s for s in info.shards}
        missing = [s for s in info.shards if s.id not in self._resident]
        reused = [sid for sid in wanted if sid in self._resident]
        resident = self.resident_bytes()
        needed = info.shard_bytes
        if self.budget_bytes is not None and needed > self.budget_bytes:
            raise BudgetExceededError(
                f"checkout of version {info.id} needs {needed} bytes ({format_bytes(needed)}) of shards "
                f"on {self.device}, but the budget is {self.budget_bytes} bytes "
                f"({format_bytes(self.budget_bytes)}); {resident} bytes ({format_bytes(resident)}) "
                f"are resident now, of which {needed - sum(s.bytes for s in missing)} would be reused; "
                "nothing was loaded or evicted",
                needed=needed,
                resident=resident,
                budget=self.budget_bytes,
            )
        unneeded = [sid for sid in self._resident if sid not in wanted]
        evicted: list[int] = []
        to_load = sum(s.bytes for s in missing)
        if self.budget_bytes is not None and resident + to_load > self.budget_bytes:
            evicted += self.evict(unneeded)  # make room first; peak stays within budget
        loaded_bytes = 0
        for shard in missing:
            if shard.base_id is None or not self.reuse_bases:
                tensors = self.store.load_shard(shard, self.device, verify=self.verify)
            else:  # a delta shard: start from a resident shard of its chain when there is one
                held = {sid: t for sid, (_, t) in self._resident.items()}
                tensors = self.store.load_shard(shard, self.device, verify=self.verify, resident=held)
            self._resident[shard.id] = (shard, tensors)
            loaded_bytes += _nbytes(tensors)
        evicted += self.evict([sid for sid in unneeded if sid in self._resident])
        self.version = info
        layers: dict[str, list[tuple[ShardInfo, Tensors]]] = {}
        for shard in info.shards:
            layers.setdefault(shard.layer, []).append((shard, self._resident[shard.id][1]))
        return Checkout(
            version=info,
            layers=layers,
            loaded=[s.id for s in missing],
            reused=reused,
            evicted=evicted,
            bytes_loaded=loaded_bytes,
            seconds=time.perf_counter() - start,
        )

    def evict(self, shard_ids: Iterable[int] | None = None) -> list[int]:
        """Drop resident shards (all when ``shard_ids`` is None); returns the ids dropped."""
        ids = list(self._resident) if shard_ids is None else [i for i in shard_ids if i in self._resident]
        for sid in ids:
            del self._resident[sid]
        if ids and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return ids

    def adopt(self, shard_id: int, tensors: Tensors) -> None:
        """Hold ``tensors`` (e.g. views into a caller's table) as the resident copy of a shard.

        The caller promises they equal the stored shard and will not be written (frozen);
        this lets one copy in memory serve both the caller and later checkouts.
        """
        info = self._resident[shard_id][0] if shard_id in self._resident else self.store.shard(shard_id)
        self._resident[shard_id] = (info, tensors)

    def tensors(self, shard_id: int) -> Tensors:
        """The resident tensors of one shard."""
        return self._resident[shard_id][1]
