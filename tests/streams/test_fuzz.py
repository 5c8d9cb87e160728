"""Property tests of every stream format with hostile bytes (see ``fuzz_testlib``): each
ingest is clean and consistent, or exactly one ``StreamError`` naming the file (and line),
with the cursor and staged data unchanged. Deterministic (``derandomize``); a few hundred
cases here, 10,000 in ``scripts/fuzz_streams.py --long``."""

from __future__ import annotations

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import create_engine

from fuzz_testlib import KINDS, cases, fuzz_one
from streams import StreamRegistry

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs each unreadable file
    engine = create_engine(f"sqlite:///{root / 'store.db'}")
    yield StreamRegistry(engine, work_dir=str(root)), str(root)
    engine.dispose()
    datasets.logging.set_verbosity(level)


def _kinds(*fmts):
    return tuple(k for k in KINDS if k[0] in fmts)


@pytest.mark.parametrize("fmts,examples", [(("text",), 75), (("jsonl",), 40), (("json",), 50),
                                           (("csv",), 45), (("parquet",), 40)],
                         ids=["text", "jsonl", "json", "csv", "parquet"])
def test_hostile_bytes_ingest_cleanly_or_fail_with_one_stream_error(fuzz_registry, fmts, examples):
    reg, root = fuzz_registry

    @settings(FUZZ, max_examples=examples)
    @given(cases(kinds=_kinds(*fmts)))
    def check(case):
        fuzz_one(reg, root, case)

    check()
