from __future__ import annotations

import pytest

from streams import StreamNameError, is_heldout
from streams.spec import validate_name


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a\\b", ".hidden", "x" * 65, "a b",
                                 "a..b", "ü", None])
def test_bad_names(bad):
    with pytest.raises(StreamNameError):
        validate_name(bad)


@pytest.mark.parametrize("good", ["news", "code-2024", "a.b_c", "0x"])
def test_good_names(good):
    assert validate_name(good) == good


def test_heldout_membership_depends_only_on_content():
    docs = [f"doc {i}" for i in range(4000)]
    held = {d for d in docs if is_heldout(d, 0.05)}
    assert 0.03 < len(held) / len(docs) < 0.07
    # growing the stream or reordering never changes membership of a document
    more = docs[::-1] + [f"new {i}" for i in range(1000)]
    assert {d for d in more if is_heldout(d, 0.05)} >= held
    assert not any(is_heldout(d, 0.0) for d in docs)

