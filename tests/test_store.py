from __future__ import annotations

import duckdb
import pytest

from autolabel.errors import AutolabelError
from autolabel.schema import ADDED_COLUMNS
from autolabel.store import SCHEMA, SCHEMA_VERSION, Store


def doc_rows(corpus_id: str, ids: list[str]) -> dict[str, list[dict]]:
    return {
        "documents": [
            {
                "corpus_id": corpus_id,
                "doc_id": i,
                "kind": "text",
                "source": "s",
                "category": "news",
                "n_tokens": 2,
                "n_turns": 1,
                "text": "hello",
                "messages_json": None,
            }
            for i in ids
        ],
        "doc_tokens": [
            {"corpus_id": corpus_id, "doc_id": i, "token_ids": [5, 6], "roles": ["text", "text"], "turns": [0, 0]}
            for i in ids
        ],
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


def test_the_schema_is_migrated_once_per_process_unless_the_file_changed(tmp_path, monkeypatch):
    """A run opens the store at every step: the migration runs on the first open only, and again when the file
    lost part of the schema or another file took its path."""
    migrations = []
    migrate = Store._migrate
    monkeypatch.setattr(Store, "_migrate", lambda store: migrations.append(store.path) or migrate(store))
    path = tmp_path / "s.duckdb"
    for _ in range(3):
        Store(path).close()
    assert len(migrations) == 1
    table, column, _ = ADDED_COLUMNS[-1]
    with duckdb.connect(str(path)) as con:  # an older autolabel's store: a column added since is missing
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    with Store(path) as store:
        assert column in {r[0] for r in store.rows(f"DESCRIBE {table}")}
    path.unlink()
    with Store(path) as store:  # a new file at the same path gets every table
        assert set(SCHEMA) <= {r[0] for r in store.rows("SELECT table_name FROM information_schema.tables")}
    Store(path, read_only=True).close()
    assert len(migrations) == 3


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


def test_a_version_3_store_gets_scores_keyed_by_the_labeler_of_the_label_they_scored(tmp_path):
    """Schema 3 keyed scores by (run, layer, feature, scorer), so a second labeler's scores overwrote the
    first's. Opening such a store rekeys them; each old score goes to the feature's newest valid label."""
    path = tmp_path / "old.duckdb"
    with Store(path) as store:  # today's tables, then scores as version 3 had them
        store.con.execute("DROP TABLE scores")
        store.con.execute(
            "CREATE TABLE scores (run_id VARCHAR, layer INTEGER, feature INTEGER, scorer VARCHAR, "
            "value DOUBLE, n INTEGER, status VARCHAR, unreliable BOOLEAN, details_json JSON, "
            "PRIMARY KEY (run_id, layer, feature, scorer))"
        )
        store.con.execute("DELETE FROM schema_version")
        store.con.execute("INSERT INTO schema_version VALUES (3, now())")
        store.con.execute(
            "INSERT INTO labels (run_id, layer, feature, labeler, label, status, created_at) VALUES "
            "('r', 0, 1, 'old', 'cats', 'ok', now() - INTERVAL 1 DAY), "
            "('r', 0, 1, 'new', 'dogs', 'ok', now()), ('r', 0, 1, 'newest', NULL, 'invalid', now())"
        )
        store.con.execute(
            "INSERT INTO scores VALUES ('r', 0, 1, 'detection', 0.8, 30, 'ok', false, '{}'), "
            "('r', 0, 2, 'embedding', 0.4, 30, 'ok', true, '{}')"
        )
    with Store(path) as store:
        rows = store.query("SELECT feature, labeler, scorer, value FROM scores ORDER BY feature")[1]
        current = store.query("SELECT feature, labeler, scorer FROM current_scores")[1]
        store.upsert(
            "scores",
            [
                {
                    "run_id": "r",
                    "layer": 0,
                    "feature": 1,
                    "labeler": "old",
                    "scorer": "detection",
                    "value": 0.5,
                    "n": 30,
                    "status": "ok",
                    "unreliable": True,
                }
            ],
        )
        both = store.query("SELECT labeler, value FROM scores WHERE feature = 1 ORDER BY 1")[1]
        version = store.one("SELECT max(version) FROM schema_version")[0]
    assert rows == [(1, "new", "detection", 0.8), (2, "unknown", "embedding", 0.4)]
    assert current == [(1, "new", "detection")] and version == SCHEMA_VERSION
    assert both == [("new", 0.8), ("old", 0.5)]  # another labeler's score sits beside it
