"""The package's one atomic write helper, with bytes or with a stream of chunks."""
from __future__ import annotations

import pytest

from streams.fsutil import atomic_write_bytes, write_if_changed


def test_chunks_are_written_in_order_and_a_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_bytes(path, (part for part in (b"ab", b"", b"cd")))
    assert path.read_bytes() == b"abcd"

    def broken():
        yield b"half"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(path, broken())
    assert path.read_bytes() == b"abcd" and sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_write_if_changed_skips_identical_bytes(tmp_path):
    path = tmp_path / "f.bin"
    assert write_if_changed(path, b"x") and not write_if_changed(path, b"x")
    assert write_if_changed(path, b"y") and path.read_bytes() == b"y"
