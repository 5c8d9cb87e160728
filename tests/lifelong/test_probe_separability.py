"""scripts/probe_separability.py: linear separability of two streams at every PEER layer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cycle_testlib import base, chain  # noqa: F401 (fixtures, requested by name)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import probe_separability  # noqa: E402


def test_separability_is_one_for_apart_and_a_half_for_alike():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g)
    assert probe_separability.separability(a, a + torch.tensor([6.0] + [0.0] * 7), n=2000) > 0.99
    assert abs(probe_separability.separability(a, torch.randn(2000, 8, generator=g), n=2000) - 0.5) < 0.05


def test_two_unlike_streams_are_told_apart_at_every_layer(chain, capsys):
    store, _, _, _ = chain  # fruit words (a) and arithmetic (b), both held out at ingest
    assert probe_separability.main(["--store", str(store.path), "--old", "a", "--new", "b", "--tokens", "4000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("linear separability of a vs b")
    rows = [line for line in lines[1:] if line.startswith("blocks.")]
    assert rows and len(rows) == len(lines) - 1
    for line in rows:
        x = float(line.split("input x (")[1].split(")")[1].split(";")[0])
        assert x > 0.95, line


def test_a_stream_without_held_out_text_is_a_usage_error(chain, tmp_path):
    store, _, _, _ = chain
    with pytest.raises(SystemExit) as exc:
        probe_separability.main(["--store", str(store.path), "--old", "a", "--new", "nope"])
    assert exc.value.code == 2
