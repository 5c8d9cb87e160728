"""A distributed cycle refuses a store directory that is not shared between its ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from expert_store import StoreNotSharedError, write_share_marker
from lifelong.checkpoint import init_store
from lifelong.distributed import Dist

CPU = torch.device("cpu")


@dataclass
class OneRankOfTwo(Dist):
    """One rank of a two-rank run, without processes: ``token`` is what rank 0 shares,
    ``others`` the flags the other rank contributes to :meth:`any`."""

    token: str = ""
    others: list[bool] = field(default_factory=list)

    def on_main(self, fn):
        return fn() if self.is_main else self.token

    def any(self, flag):
        return flag or any(self.others)


def test_a_rank_that_cannot_read_rank_zeros_marker_fails_before_training(tmp_path, tiny_config):
    shared, _ = init_store(str(tmp_path / "shared"), tiny_config())
    local, _ = init_store(str(tmp_path / "local-copy"), tiny_config())  # a host whose store path is not the mount
    try:
        token = write_share_marker(shared)  # what rank 0 wrote
        OneRankOfTwo(1, 2, CPU, token=token).check_shared_store(shared, timeout_s=0.2)  # the same directory: passes
        with pytest.raises(StoreNotSharedError, match="not shared between hosts.*not readable"):
            OneRankOfTwo(1, 2, CPU, token=token).check_shared_store(local, timeout_s=0.2)
        with pytest.raises(StoreNotSharedError, match="another rank cannot read"):  # rank 0 stops too, and says why
            OneRankOfTwo(0, 2, CPU, others=[True]).check_shared_store(shared)
        OneRankOfTwo(0, 2, CPU).check_shared_store(shared)  # nobody failed: rank 0 goes on
    finally:
        shared.close()
        local.close()
