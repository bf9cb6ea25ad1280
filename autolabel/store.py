"""DuckDB store: the only place that creates tables (from autolabel/schema.py), and the one write path.

Every stage writes through `write_shard`, one transaction per (run_id, stage,
shard): rows are upserted on their primary keys and the shard is recorded in
`shards` in the same transaction. A killed stage therefore leaves either a whole
shard or nothing, and a re-run skips the shards already recorded, so nothing is
lost or doubled. Corpus-scoped tables use the corpus_id in the run_id slot.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa

from autolabel.errors import AutolabelError
from autolabel.schema import ADDED_COLUMNS, ROLE_ENUM, SCHEMA, SCHEMA_VERSION, VIEWS, rekey_scores


def now() -> datetime:
    return datetime.now(timezone.utc)


def _as_arrow(rows: pa.Table | list[dict[str, Any]]) -> pa.Table:
    return rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)


def wait_for_lock_s() -> float:
    """How long an open waits for another process's lock on the store (AUTOLABEL_STORE_WAIT_S, default 300 s)."""
    value = os.environ.get("AUTOLABEL_STORE_WAIT_S", "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise AutolabelError(
            f"AUTOLABEL_STORE_WAIT_S={value!r} is not a number of seconds; set it to e.g. 300, or unset it"
        )
    return seconds


def _connect(path: Path, read_only: bool, config: dict[str, Any]) -> duckdb.DuckDBPyConnection:
    """Open the file, waiting while another process holds its lock.

    DuckDB lets one process write a file and no other process open it meanwhile, not even to read.
    A query, report or label command beside a running collection therefore waits (with a note) until
    the writer lets go between its stages, instead of failing at once.
    """
    deadline = time.monotonic() + wait_for_lock_s()
    noted = False
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as err:
            if "lock" not in str(err).lower() or time.monotonic() >= deadline:
                hint = (
                    (
                        f" (waited {wait_for_lock_s():.0f} s; another autolabel process holds it: let it finish, "
                        "or raise AUTOLABEL_STORE_WAIT_S)"
                    )
                    if "lock" in str(err).lower()
                    else ""
                )
                raise AutolabelError(f"cannot open store {path}: {err}{hint}") from err
            if not noted:
                logging.getLogger("autolabel").warning(f"store {path} is in use by another process; waiting for it")
                noted = True
            time.sleep(0.5)
        except duckdb.Error as err:
            raise AutolabelError(f"cannot open store {path}: {err}") from err


_MIGRATED: dict[Path, str] = {}  # store file -> its Store._signature right after this process migrated it


class Store:
    """A DuckDB file holding every table of every run.

    `create=False` is for commands that read or add to what a run made (audit, label, cluster,
    report, query): a mistyped --store must be an error, not a new empty store. `sandboxed` opens
    the file with DuckDB's external access off (no COPY TO files, no ATTACH, no reading other files),
    for SQL the user types.
    """

    def __init__(self, path: str | Path, read_only: bool = False, create: bool = True, sandboxed: bool = False):
        self.path = Path(path)
        if (read_only or not create) and not self.path.is_file():
            raise AutolabelError(
                f"store {self.path} does not exist; run `autolabel run` or `autolabel corpus build` first, "
                "or pass --store"
            )
        self.con = _connect(self.path, read_only, {"enable_external_access": False} if sandboxed else {})
        if not read_only and (self._signature() or "new") != _MIGRATED.get(self.path.resolve()):
            self._migrate()
            _MIGRATED[self.path.resolve()] = self._signature()
        self._check_version()

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _migrate(self) -> None:
        with self.transaction():
            has_enum = self.one("SELECT count(*) FROM duckdb_types() WHERE type_name = 'token_role'")[0]
            if not has_enum:
                self.con.execute(f"CREATE TYPE token_role AS ENUM ({ROLE_ENUM})")
            rekey_scores(self.con)
            for ddl in SCHEMA.values():
                self.con.execute(ddl)
            for table, column, sql_type in ADDED_COLUMNS:
                self.con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {sql_type}")
            for view in VIEWS:
                self.con.execute(view)
            self.con.execute(
                "INSERT INTO schema_version VALUES (?, ?) ON CONFLICT DO NOTHING",
                [SCHEMA_VERSION, now()],
            )

    def _signature(self) -> str | None:
        """Every column of every table and view with its type, and the schema version, as one hash. A run opens
        the store at each step; when the file still looks as it did after this process migrated it, the
        migration (some 60 statements) is skipped. Any change, or another file at the path, migrates again."""
        try:
            return self.one(
                "SELECT md5(string_agg(table_name || '.' || column_name || ' ' || data_type, ',' "
                "ORDER BY table_name, column_index)) || (SELECT max(version) FROM schema_version) "
                "FROM duckdb_columns() WHERE database_name = current_database() AND NOT internal"
            )[0]
        except duckdb.CatalogException:  # no schema_version table yet
            return None

    def _check_version(self) -> None:
        try:
            version = self.one("SELECT max(version) FROM schema_version")[0]
        except duckdb.CatalogException as err:
            raise AutolabelError(f"{self.path} is not an autolabel store (no schema_version table)") from err
        if version is not None and version > SCHEMA_VERSION:
            raise AutolabelError(
                f"store {self.path} has schema version {version}, newer than this autolabel "
                f"({SCHEMA_VERSION}); upgrade autolabel or use another --store"
            )

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # -- the write path -------------------------------------------------------

    def write_shard(
        self,
        run_id: str,
        stage: str,
        shard: str,
        tables: dict[str, pa.Table | list[dict[str, Any]]],
        replace: bool = False,
        fresh: bool = False,
        clear: dict[str, dict[str, Any]] | None = None,
    ) -> bool:
        """Upsert `tables` and record the shard, all or nothing.

        Returns False (and writes nothing) when the shard was already committed
        and `replace` is not set, which is what makes resuming safe. `fresh` promises
        that no row of these tables can exist yet (rows only a committed shard writes):
        a plain insert then takes a fraction of an upsert's memory on big tables. `clear` deletes the
        rows of a table whose columns equal the given values first, so a rewrite that keeps fewer rows
        (an audit re-run with stricter thresholds, a clustering with fewer clusters) leaves none of the
        old ones behind.
        """
        with self.transaction() as con:
            done = self.one(
                "SELECT count(*) FROM shards WHERE run_id = ? AND stage = ? AND shard = ?", [run_id, stage, shard]
            )[0]
            if done and not replace:
                return False
            for table, match in (clear or {}).items():
                if table not in SCHEMA:
                    raise ValueError(f"unknown table {table!r}")
                con.execute(
                    f"DELETE FROM {table} WHERE " + " AND ".join(f"{column} = ?" for column in match),
                    list(match.values()),
                )
            n_rows = sum(self._upsert(con, table, rows, fresh) for table, rows in tables.items())
            con.execute(
                "INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?)",
                [run_id, stage, shard, now(), n_rows],
            )
        return True

    def record_transcoder(self, row: dict[str, Any]) -> None:
        """One `transcoders` row; its *_by_layer values are {layer: value} dicts, stored as DuckDB MAPs."""
        maps = [column for column, value in row.items() if isinstance(value, dict)]
        columns = ", ".join(row)
        values = ", ".join("MAP(?, ?)" if column in maps else "?" for column in row)
        params = [
            x
            for column, value in row.items()
            for x in ((list(value), list(value.values())) if column in maps else (value,))
        ]
        with self.transaction() as con:
            con.execute(f"INSERT OR REPLACE INTO transcoders ({columns}) VALUES ({values})", params)

    def copy_collection(self, source_run: str, run_id: str, tables: tuple[str, ...], stage: str) -> None:
        """Give `run_id` the collected rows of `source_run` (an identical earlier collection), its final
        shard and its parent link, in one transaction."""
        with self.transaction() as con:
            for table in tables:
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
                con.execute(
                    f"INSERT INTO {table} BY NAME SELECT * REPLACE (? AS run_id) FROM {table} WHERE run_id = ?",
                    [run_id, source_run],
                )
            con.execute(
                "INSERT OR REPLACE INTO shards SELECT ?, stage, shard, committed_at, n_rows FROM shards "
                "WHERE run_id = ? AND stage = ? AND shard = 'final'",
                [run_id, source_run, stage],
            )
            con.execute("UPDATE runs SET parent_run_id = ? WHERE run_id = ?", [source_run, run_id])

    def upsert(self, table: str, rows: pa.Table | list[dict[str, Any]]) -> int:
        """Insert-or-replace rows by primary key, outside the shard ledger (for caches)."""
        with self.transaction() as con:
            return self._upsert(con, table, rows)

    @staticmethod
    def _upsert(
        con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table | list[dict[str, Any]], fresh: bool = False
    ) -> int:
        if table not in SCHEMA:
            raise ValueError(f"unknown table {table!r}")
        incoming = _as_arrow(rows)
        if incoming.num_rows == 0:
            return 0
        con.register("_incoming", incoming)
        try:
            con.execute(f"INSERT {'' if fresh else 'OR REPLACE '}INTO {table} BY NAME SELECT * FROM _incoming")
        finally:
            con.unregister("_incoming")
        return incoming.num_rows

    def one(self, sql: str, params: list[Any] | None = None) -> tuple | None:
        """The first row of a query (DuckDB wants every result drained before the next call)."""
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0] if rows else None

    def committed_shards(self, run_id: str, stage: str) -> set[str]:
        rows = self.con.execute("SELECT shard FROM shards WHERE run_id = ? AND stage = ?", [run_id, stage]).fetchall()
        return {r[0] for r in rows}

    # -- runs -----------------------------------------------------------------

    def start_run(
        self,
        config_json: str,
        model_id: str,
        corpus_id: str | None = None,
        transcoder_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        run_id = now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.con.execute(
            "INSERT INTO runs (run_id, started_at, status, config_json, model_id, transcoder_id,"
            " corpus_id, parent_run_id) VALUES (?, ?, 'running', ?, ?, ?, ?, ?)",
            [run_id, now(), config_json, model_id, transcoder_id, corpus_id, parent_run_id],
        )
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*fields.values(), run_id])

    def finish_run(self, run_id: str, status: str = "complete", error: str | None = None) -> None:
        self.update_run(run_id, finished_at=now(), status=status, error=error)

    # -- reads: every query outside this module goes through these -------------
    # `params` is a list (? placeholders) or a dict ($name placeholders); `tables` are Arrow tables the
    # query may join by name (a list of wanted keys, say), registered for this query only.

    @contextmanager
    def _registered(self, tables: dict[str, pa.Table]) -> Iterator[None]:
        for name, table in tables.items():
            self.con.register(name, table)
        try:
            yield
        finally:
            for name in tables:
                self.con.unregister(name)

    @contextmanager
    def _cursor(
        self, sql: str, params: list[Any] | dict[str, Any] | None, tables: dict[str, pa.Table]
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._registered(tables):
            yield self.con.execute(sql, params if params is not None else [])

    def rows(self, sql: str, params: list[Any] | dict[str, Any] | None = None, **tables: pa.Table) -> list[tuple]:
        with self._cursor(sql, params, tables) as cursor:
            return cursor.fetchall()

    def dicts(self, sql: str, params: list[Any] | dict[str, Any] | None = None, **tables: pa.Table) -> list[dict]:
        """Rows as {column: value}."""
        with self._cursor(sql, params, tables) as cursor:
            columns = [d[0] for d in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def arrow(self, sql: str, params: list[Any] | dict[str, Any] | None = None, **tables: pa.Table) -> pa.Table:
        with self._registered(tables):  # a relation, not a cursor: Arrow straight from DuckDB, no row copy
            return self.con.sql(sql, params=params).to_arrow_table()

    def numpy(self, sql: str, params: list[Any] | dict[str, Any] | None = None, **tables: pa.Table) -> dict:
        """Columns as NumPy arrays: {column: array}."""
        with self._cursor(sql, params, tables) as cursor:
            return cursor.fetchnumpy()

    def query(self, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
        try:
            cursor = self.con.execute(sql, params or [])
        except duckdb.Error as err:
            raise AutolabelError(f"query failed: {err}") from err
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)
