from __future__ import annotations

import duckdb
import pytest

from autolabel.errors import AutolabelError
from autolabel.store import SCHEMA, SCHEMA_VERSION, Store


def doc_rows(corpus_id: str, ids: list[str]) -> dict[str, list[dict]]:
    return {
        "documents": [{"corpus_id": corpus_id, "doc_id": i, "kind": "text", "source": "s", "category": "news",
                       "n_tokens": 2, "n_turns": 1, "text": "hello", "messages_json": None} for i in ids],
        "doc_tokens": [{"corpus_id": corpus_id, "doc_id": i, "token_ids": [5, 6], "roles": ["text", "text"],
                        "turns": [0, 0]} for i in ids],
    }


def counts(store: Store) -> dict[str, int]:
    return {t: store.one(f"SELECT count(*) FROM {t}")[0] for t in SCHEMA}


def test_schema_is_created_once_and_versioned(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        first = counts(store)
    with Store(path) as store:
        assert counts(store) == first
        assert store.query("SELECT version FROM schema_version")[1] == [(SCHEMA_VERSION,)]
        tables = {r[0] for r in store.query("SELECT table_name FROM information_schema.tables")[1]}
    assert set(SCHEMA) <= tables and "tokens" in tables


def test_write_shard_round_trip_and_no_doubling(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        assert store.write_shard("c1", "corpus", "docs-0", doc_rows("c1", ["a", "b"]))
        assert not store.write_shard("c1", "corpus", "docs-0", doc_rows("c1", ["a", "b"]))
        assert store.committed_shards("c1", "corpus") == {"docs-0"}
        assert store.one("SELECT count(*) FROM documents")[0] == 2
        assert store.one("SELECT n_rows FROM shards")[0] == 4
        # Replacing a shard upserts by primary key: still two rows, new values.
        rows = doc_rows("c1", ["a", "b"])
        rows["documents"][0]["category"] = "changed"
        assert store.write_shard("c1", "corpus", "docs-0", rows, replace=True)
        assert store.query("SELECT doc_id, category FROM documents ORDER BY 1")[1] == [("a", "changed"), ("b", "news")]
        assert store.query("SELECT role::VARCHAR, count(*) FROM tokens GROUP BY ALL")[1] == [("text", 4)]


def test_failed_shard_writes_nothing(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        store.write_shard("c1", "corpus", "docs-0", doc_rows("c1", ["a"]))
        before = counts(store)
        bad = doc_rows("c1", ["b"])
        bad["doc_tokens"][0]["roles"] = ["text", "narrator"]  # not a token role
        with pytest.raises(duckdb.Error):
            store.write_shard("c1", "corpus", "docs-1", bad)
        assert counts(store) == before
        assert store.committed_shards("c1", "corpus") == {"docs-0"}


def test_runs_lifecycle(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        run_id = store.start_run('{"a": 1}', "m")
        assert store.one("SELECT status FROM runs WHERE run_id = ?", [run_id])[0] == "running"
        store.update_run(run_id, corpus_id="c9")
        store.finish_run(run_id, "complete")
        status, corpus_id, finished = store.one("SELECT status, corpus_id, finished_at FROM runs")
        assert (status, corpus_id) == ("complete", "c9") and finished is not None


def test_newer_schema_and_missing_store_are_clear_errors(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        store.con.execute("INSERT INTO schema_version VALUES (?, now())", [SCHEMA_VERSION + 1])
    with pytest.raises(AutolabelError, match="newer than this autolabel"):
        Store(path)
    with pytest.raises(AutolabelError, match="does not exist"):
        Store(tmp_path / "missing.duckdb", read_only=True)
    plain = tmp_path / "plain.duckdb"
    duckdb.connect(str(plain)).close()
    with pytest.raises(AutolabelError, match="not an autolabel store"):
        Store(plain, read_only=True)


def test_read_only_store_refuses_writes(tmp_path):
    path = tmp_path / "s.duckdb"
    Store(path).close()
    with Store(path, read_only=True) as store:
        with pytest.raises(AutolabelError, match="query failed"):
            store.query("DELETE FROM runs")
