"""Ref names, version specs and ref moves (``expert_store.refs``), beyond test_store's tour."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from expert_store import ConflictError, ExpertStore, RefError, UnknownVersionError
from expert_store.refs import resolve, validate_ref_name

from store_testlib import dense


@pytest.fixture
def chain(store: ExpertStore) -> list[int]:
    """Three versions v1 <- v2 <- v3 with HEAD at v3 (no shards: quick)."""
    ids: list[int] = []
    for i in range(3):
        ids.append(store.commit(shards=[], dense=dense(i), message=f"m{i}",
                                parent=ids[-1] if ids else None, who="alice@box").id)
    return ids


@pytest.mark.parametrize("name", ["HEAD", "candidate", "_x", "team/exp-1.2", "a" * 255])
def test_valid_ref_names(name: str) -> None:
    assert validate_ref_name(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "-x", ".x", "a b", "a~1", "a^", "a" * 256, "v12", "12", None, 3])
def test_invalid_ref_names(name: object) -> None:
    with pytest.raises(RefError):
        validate_ref_name(name)  # type: ignore[arg-type]


def test_spec_suffixes(store: ExpertStore, chain: list[int]) -> None:
    v1, v2, v3 = chain
    assert store.resolve("HEAD~") == store.resolve("HEAD~1") == store.resolve("HEAD^") == v2
    assert store.resolve("HEAD~1^") == store.resolve("HEAD^~1") == store.resolve(f"v{v3}~2") == v1
    assert store.resolve("HEAD~0") == store.resolve(" HEAD ") == store.resolve(f"{v3}") == v3
    with pytest.raises(UnknownVersionError, match="cannot parse"):
        store.resolve("HEAD~1x")
    with pytest.raises(UnknownVersionError, match=rf"version {v1} \(2 back from HEAD\) has no parent"):
        store.resolve("HEAD~3")


@pytest.mark.parametrize("spec", [True, 1.0, None, [1]])
def test_spec_must_be_int_or_str(store: ExpertStore, chain: list[int], spec: object) -> None:
    with Session(store.engine) as session, pytest.raises(UnknownVersionError, match="int or a str"):
        resolve(session, spec)  # type: ignore[arg-type]


def test_cas_on_a_missing_ref_and_head_as_tag(store: ExpertStore, chain: list[int]) -> None:
    v1, _, v3 = chain
    with pytest.raises(ConflictError, match="points at nothing"):
        store.set_ref("candidate", v1, expected_old=v3)
    with pytest.raises(UnknownVersionError, match="ref 'candidate' does not exist"):
        store.rollback(v1, ref="candidate")
    with pytest.raises(RefError, match="HEAD cannot be a tag"):
        store.tag("HEAD", v1)
    assert {r.name for r in store.refs()} == {"HEAD"} and store.head() == v3


def test_reflog_records_every_move_and_nothing_for_a_failed_one(store: ExpertStore, chain: list[int]) -> None:
    v1, v2, v3 = chain
    log = store.reflog("HEAD")
    assert [(e.old, e.new, e.why, e.who) for e in log] == [
        (v2, v3, "commit: m2", "alice@box"), (v1, v2, "commit: m1", "alice@box"),
        (None, v1, "commit: m0", "alice@box")]
    with pytest.raises(ConflictError):
        store.set_ref("HEAD", v1, expected_old=v2)
    assert store.reflog("HEAD") == log
    store.tag("old", v1, who="bob@box", why="keep")
    store.set_ref("HEAD", "old", expected_old=v3, who="bob@box", why="reset")
    newest = store.reflog()[:2]
    assert [(e.ref, e.old, e.new, e.who, e.why) for e in newest] == [
        ("HEAD", v3, v1, "bob@box", "reset"), ("old", None, v1, "bob@box", "keep")]
    assert newest[0].id > newest[1].id and store.reflog("old") == newest[1:]
