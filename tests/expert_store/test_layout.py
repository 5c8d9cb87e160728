"""``ExpertStore.url``: what another process passes to ``open`` to reach the same database."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import make_url

from expert_store import ExpertStore, NotAStoreError

from store_testlib import dense, new_shard


@pytest.mark.sqlite_only  # the default database is SQLite
def test_default_store_has_no_url_however_it_is_opened(store: ExpertStore) -> None:
    store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="one", parent=None)
    assert store.url is None
    with ExpertStore.open(store.path, read_only=True) as ro:
        assert "mode=ro" in str(ro.engine.url) and ro.url is None
    with ExpertStore.open(store.path, url=f"sqlite:///{store.path / 'store.db'}") as explicit:
        assert explicit.url is None and explicit.head() == 1


def test_store_with_its_database_elsewhere_reopens_from_its_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with ExpertStore.init(tmp_path / "s", {"d_model": 16}, url=url) as created:
        created.commit(shards=[new_shard(0, 0)], dense=dense(0), message="one", parent=None)
        assert created.url == url and not (tmp_path / "s" / "store.db").exists()
    with ExpertStore.open(tmp_path / "s", url=url) as reopened:
        assert reopened.url == url
        with ExpertStore.open(reopened.path, url=reopened.url, read_only=True) as again:
            assert again.head() == 1 and again.url == url
    with pytest.raises(NotAStoreError, match="pass its url"):
        ExpertStore.open(tmp_path / "s")


def test_url_keeps_the_password(tmp_path: Path) -> None:
    url = "postgresql://user:s3cret@db.example/lifelong"
    engine = SimpleNamespace(url=make_url(url), execution_options=lambda **_: None)
    store = ExpertStore(tmp_path, engine, {}, "id", database="url")  # type: ignore[arg-type]
    assert store.url == url
