"""Hostile paths: a FIFO or a device as a stream's source or inside a drop folder, symbolic
link loops, a link to a parent under a ``**`` glob, a file name that is not UTF-8. Each is
refused with a clear ``StreamError`` naming it (or skipped and counted), never a hang or
an endless walk: every test runs under a SIGALRM deadline, so a regression fails."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import pytest

from stream_testlib import docs_of
from streams import SourceError, UnreadableFileError


@contextmanager
def deadline(seconds: int = 30):
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: blocked on a hostile path?")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture()
def drop(tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    (d / "a.txt").write_text("alpha\nbeta\n")
    return d


def test_fifo_inside_a_drop_folder_is_refused_or_skipped(registry, drop):
    os.mkfifo(drop / "pipe.txt")  # nobody ever writes to it: opening it to read would block
    registry.add("p", str(drop), "text", holdout=0.0)
    registry.add("p2", str(drop), "text", holdout=0.0, on_bad_rows="skip")
    with deadline():
        with pytest.raises(UnreadableFileError, match=r"pipe\.txt: is a FIFO"):
            registry.ingest("p")
        res = registry.ingest("p2")
        assert docs_of(res.train_tokens) == ["alpha", "beta"] and res.bad_rows == {"unreadable": 1}
        assert "FIFO" in res.bad_examples[0]
        assert registry.pending("p").files == 1  # the estimate skips it too
        assert registry.info("p").pending is not None


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_fifo_or_device_as_the_source_is_refused_at_registration(registry, tmp_path, device):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with deadline():
        with pytest.raises(SourceError, match=r"pipe\.jsonl is a FIFO"):
            registry.add("f", str(fifo), "jsonl")
        with pytest.raises(SourceError, match=f"{device} is a character device"):
            registry.add("d", device, "text")
    assert registry.list() == []


def test_link_to_a_device_inside_a_drop_folder(registry, drop):
    os.symlink("/dev/zero", drop / "zero.txt")  # reading it would never end
    registry.add("z", str(drop), "text", holdout=0.0)
    with deadline():
        with pytest.raises(UnreadableFileError, match=r"zero\.txt: is a character device"):
            registry.ingest("z")


def test_symlink_loops_in_a_drop_folder(registry, drop, tmp_path):
    os.symlink(drop / "b.txt", drop / "c.txt")
    os.symlink(drop / "c.txt", drop / "b.txt")  # b -> c -> b
    registry.add("loop", str(drop), "text", holdout=0.0)
    registry.add("loop2", str(drop), "text", holdout=0.0, on_bad_rows="skip")
    with deadline():
        with pytest.raises(UnreadableFileError, match=r"b\.txt: symbolic link loop"):
            registry.ingest("loop")
        res = registry.ingest("loop2")
        assert docs_of(res.train_tokens) == ["alpha", "beta"] and res.bad_rows == {"unreadable": 2}
        with pytest.raises(SourceError, match="symbolic link loop"):
            registry.add("direct", str(drop / "b.txt"), "text")


def test_link_to_a_parent_directory_is_refused_not_walked(registry, drop):
    sub = drop / "sub"
    sub.mkdir()
    (sub / "s.txt").write_text("gamma\n")
    os.symlink("..", sub / "up")   # sub/up -> drop: a loop
    os.symlink(".", sub / "here")  # sub/here -> sub: another
    registry.add("up", str(drop), "text", holdout=0.0)
    registry.add("up2", str(drop), "text", holdout=0.0, on_bad_rows="skip")
    with deadline():
        with pytest.raises(UnreadableFileError, match="symbolic link loop: it points to"):
            registry.ingest("up")
        res = registry.ingest("up2")
        assert sorted(docs_of(res.train_tokens)) == ["alpha", "beta", "gamma"]
        assert res.bad_rows == {"unreadable": 2}


def test_recursive_glob_does_not_follow_links_to_parents(registry, drop):
    sub = drop / "sub"
    sub.mkdir()
    (sub / "s.txt").write_text("gamma\n")
    for name in ("l1", "l2", "l3"):  # glob.glob would walk 3**40 paths
        os.symlink("..", sub / name)
    registry.add("g", str(drop / "**" / "*.txt"), "text", holdout=0.0)
    with deadline():
        res = registry.ingest("g")
    assert sorted(docs_of(res.train_tokens)) == ["alpha", "beta", "gamma"]  # each file once
    assert sorted(res.new_cursor["files"]) == [str(drop / "a.txt"), str(sub / "s.txt")]


def test_file_names_that_are_not_utf8_or_hold_newlines(registry, drop):
    os.close(os.open(os.path.join(os.fsencode(drop), b"bad\xff.txt"), os.O_CREAT | os.O_WRONLY))
    (drop / "two\nlines.txt").write_bytes(b"\x00" * 10)
    registry.add("n", str(drop), "text", holdout=0.0, on_bad_rows="skip")
    registry.add("n2", str(drop), "text", holdout=0.0)
    with deadline():
        res = registry.ingest("n")
        assert docs_of(res.train_tokens) == ["alpha", "beta"]
        assert res.bad_rows == {"unreadable": 1, "binary_file": 1}
        assert all("\n" not in e for e in res.bad_examples)
        assert any("not valid UTF-8; rename" in e for e in res.bad_examples)
        with pytest.raises(UnreadableFileError) as info:
            registry.ingest("n2")
    assert "\n" not in str(info.value)
