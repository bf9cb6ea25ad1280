"""The probe of issue 15, kept as tests: every command, with any input, does its job or prints one line
naming the problem and the fix, exits non-zero and leaves the store as it was."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from test_cli import run_cli

from autolabel.progress import LogProgress, progress_bar
from autolabel.store import Store

# -- the error printer and the commands' arguments -------------------------------------------------------


def test_errors_with_square_brackets_print_as_text(monkeypatch, capsys, filled_store):
    code, _, err = run_cli(monkeypatch, capsys, "query", 'select * from "[/]"', "--store", str(filled_store))
    assert code == 2 and "[/]" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "config", "--config", str(filled_store.parent / "run[1].yaml"))
    assert code == 2 and "run[1].yaml does not exist" in err


def test_query_prints_corpus_text_with_markup_as_it_is(monkeypatch, capsys, filled_store):
    code, out, _ = run_cli(monkeypatch, capsys, "query", "select '[bold]x[/] [/]' as t", "--store", str(filled_store))
    assert code == 0 and "[bold]x[/] [/]" in out


@pytest.mark.parametrize(
    "sql, path",
    [
        ("COPY documents TO '{out}'", "out.csv"),
        ("ATTACH '{out}' AS other", "other.duckdb"),
        ("SELECT * FROM read_csv('{secret}')", None),
    ],
)
def test_query_cannot_write_attach_or_read_other_files(monkeypatch, capsys, filled_store, tmp_path, sql, path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    out = tmp_path / (path or "unused")
    code, _, err = run_cli(
        monkeypatch, capsys, "query", sql.format(out=out, secret=secret), "--store", str(filled_store)
    )
    assert code == 2 and "query failed" in err and "disabled" in err
    assert not out.exists()


@pytest.mark.parametrize("command", [["audit"], ["label"], ["cluster", "--no-names"], ["report"]])
def test_commands_that_read_a_run_never_create_a_store(monkeypatch, capsys, tmp_path, command):
    typo = tmp_path / "typo.duckdb"
    code, _, err = run_cli(monkeypatch, capsys, *command, "--store", str(typo))
    assert code == 2 and "typo.duckdb does not exist" in err and not typo.exists()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_refuses_a_port_out_of_range(monkeypatch, capsys, tmp_path, port):
    code, _, err = run_cli(monkeypatch, capsys, "serve", str(tmp_path), "--port", port)
    assert code == 2 and f"--port {port} is not a TCP port" in err and "Traceback" not in err


def test_serve_does_not_follow_symlinks_out_of_the_folder(tmp_path):
    import threading

    from autolabel.report.serve import make_server

    reports, outside = tmp_path / "reports", tmp_path / "outside"
    reports.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("key")
    (reports / "page.html").write_text("<p>ok</p>")
    (reports / "leak.txt").symlink_to(outside / "secret.txt")
    (reports / "leakdir").symlink_to(outside)
    server = make_server(reports, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert urllib.request.urlopen(f"{base}/page.html").read() == b"<p>ok</p>"
        for path in ("/leak.txt", "/leakdir/secret.txt", "/leakdir/"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path)
            assert refused.value.code == 404, path
    finally:
        server.shutdown()
        server.server_close()


# -- one store, several processes ----------------------------------------------------------------------

HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[3] == "read")
con.execute("SELECT count(*) FROM runs").fetchall()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def hold_lock(path, seconds: float, mode: str = "write") -> subprocess.Popen:
    """Another process with the store open: writing, as `autolabel run` has it during a stage, or reading,
    as `autolabel query` has it (DuckDB lets no other process open the file in either case)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds), mode], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_an_open_waits_for_another_process_lock_then_gives_a_clear_error(filled_store, monkeypatch):
    holder = hold_lock(filled_store, 2.0)
    started = time.monotonic()
    with Store(filled_store, read_only=True) as store:  # waits until the holder lets go
        assert store.one("select count(*) from documents")[0] == 2
    assert time.monotonic() - started > 0.5
    holder.wait()

    monkeypatch.setenv("AUTOLABEL_STORE_WAIT_S", "0.5")
    holder = hold_lock(filled_store, 5.0)
    try:
        from autolabel.errors import AutolabelError

        with pytest.raises(AutolabelError, match="another autolabel process holds it.*AUTOLABEL_STORE_WAIT_S"):
            Store(filled_store)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setenv("AUTOLABEL_STORE_WAIT_S", "soon")
    with pytest.raises(AutolabelError, match="AUTOLABEL_STORE_WAIT_S='soon' is not a number"):
        Store(filled_store)


def test_run_waits_for_a_query_and_ends_complete_with_a_report_that_says_so(config, prefect_api):
    from flows.audit_pipeline import audit_pipeline

    audit_pipeline(config, until="collect", show_progress=False)  # the store exists, the corpus is built
    holder = hold_lock(config.store, 3.0, "read")  # a long query beside the next run's first open
    try:
        summary = audit_pipeline(config, show_progress=False)
    finally:
        holder.wait()
    with Store(config.store, read_only=True) as store:
        status, error, finished = store.one(
            "SELECT status, error, finished_at FROM runs WHERE run_id = ?", [summary.run_id]
        )
    assert (status, error) == ("complete", None) and finished is not None
    index = open(summary.report, encoding="utf-8").read()
    assert "<dt>status</dt><dd>complete" in index and "running" not in index


def test_a_killed_fresh_collection_resumes_by_collecting_not_from_the_cache(config, prefect_api, monkeypatch):
    from test_collect import TABLES, table

    from autolabel.collect import stage as collect_stage
    from flows.audit_pipeline import audit_pipeline

    cached = audit_pipeline(config, until="collect", show_progress=False)
    real_run_shard, calls = collect_stage.run_shard, []

    def dies_on_the_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_run_shard(*args, **kwargs)

    monkeypatch.setattr(collect_stage, "run_shard", dies_on_the_third_shard)
    with pytest.raises(RuntimeError, match="killed"):
        audit_pipeline(config, until="collect", fresh=True, show_progress=False)
    monkeypatch.setattr(collect_stage, "run_shard", real_run_shard)
    with Store(config.store, read_only=True) as store:
        killed, status = store.one("SELECT run_id, status FROM runs ORDER BY started_at DESC LIMIT 1")
        assert status == "failed" and len(store.committed_shards(killed, "collect")) == 2
    checkpoint = f"{config.store}.collect/{killed}"
    assert os.listdir(checkpoint)

    resumed = audit_pipeline(config, resume=True, until="collect", show_progress=False)
    assert resumed.run_id == killed and resumed.reused_from is None and resumed.collect.resumed_shards == 2
    assert not os.path.exists(checkpoint) or not os.listdir(checkpoint)
    with Store(config.store, read_only=True) as store:
        for name in TABLES:
            assert table(store, name, killed) == table(store, name, cached.run_id), name


# -- corpus identity and unattended logs ---------------------------------------------------------------


def test_the_corpus_id_depends_on_file_contents_not_where_they_lie(tmp_path):
    from test_collect import write_corpus

    from autolabel.config import CorpusConfig
    from autolabel.corpus.build import corpus_id_for

    here, there = tmp_path / "a", tmp_path / "elsewhere" / "b"
    here.mkdir()
    write_corpus(here / "docs.jsonl")
    shutil.copytree(here, there)

    def corpus_id(folder) -> str:
        return corpus_id_for(CorpusConfig(sources=[{"name": "file", "path": str(folder / "docs.jsonl")}]), "m")

    assert corpus_id(here) == corpus_id(there)
    with (there / "docs.jsonl").open("a") as handle:
        handle.write('{"text": "one more document"}\n')
    assert corpus_id(here) != corpus_id(there)


def test_without_a_terminal_progress_is_logged_at_a_bounded_rate(caplog):
    assert isinstance(progress_bar("tok"), LogProgress)  # pytest's stderr is not a TTY
    assert not isinstance(progress_bar("tok", disable=True), LogProgress)  # --quiet stays quiet
    logger = logging.getLogger("autolabel.test")
    with caplog.at_level(logging.INFO, logger="autolabel.test"):
        with LogProgress("tok", logger, every_s=3600) as bar:
            task = bar.add_task("collecting", total=1000)
            for _ in range(1000):
                bar.advance(task, 1)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "collecting: started of 1,000 tok"
    assert len(lines) == 1 + 10 + 1  # start, every 10%, end: not one line per step
    assert lines[-1].startswith("collecting: done 1,000/1,000 tok (100%)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="autolabel.test"):
        with LogProgress("tok", logger, every_s=0.0) as bar:  # no total: every `every_s`
            task = bar.add_task("reading")
            for _ in range(3):
                bar.advance(task, 5)
    assert [r.getMessage().split(" in ")[0] for r in caplog.records][1:] == [
        "reading: progress 5 tok",
        "reading: progress 10 tok",
        "reading: progress 15 tok",
        "reading: done 15 tok",
    ]


@pytest.mark.parametrize(
    "args, field",
    [
        (["cluster", "--seed", "-1"], "seed"),
        (["label", "--layers", "-3"], "layers"),
        (["transcoder", "train", "--out", "x", "--tokens", "-5"], "n_tokens"),
    ],
)
def test_options_that_overwrite_the_config_are_validated_like_it(monkeypatch, capsys, filled_store, args, field):
    code, _, err = run_cli(monkeypatch, capsys, *args, "--store", str(filled_store))
    assert code == 2 and "invalid setting" in err and field in err and "Traceback" not in err
