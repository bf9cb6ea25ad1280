"""The command line: help everywhere, config errors, query formats, exit codes."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import yaml

from autolabel import cli
from autolabel.config import RunConfig, load_config
from autolabel.errors import AutolabelError
from autolabel.store import Store


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["autolabel", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["corpus"],
        ["corpus", "build"],
        ["model"],
        ["model", "info"],
        ["query"],
        ["config"],
        ["collect"],
        ["label"],
        ["audit"],
        ["cluster"],
        ["report"],
        ["schedule"],
    ],
)
def test_every_command_has_help(monkeypatch, capsys, command):
    code, out, _ = run_cli(monkeypatch, capsys, *command, "--help")
    assert code == 0 and "Usage" in out


def test_query_formats(monkeypatch, capsys, filled_store):
    sql = "select doc_id, count(*) as n from tokens group by doc_id order by doc_id"
    code, out, _ = run_cli(monkeypatch, capsys, "query", sql, "--store", str(filled_store), "--format", "csv")
    assert code == 0 and list(csv.reader(io.StringIO(out))) == [["doc_id", "n"], ["a", "2"], ["b", "2"]]
    code, out, _ = run_cli(monkeypatch, capsys, "query", sql, "--store", str(filled_store), "-f", "json")
    assert code == 0 and json.loads(out) == [{"doc_id": "a", "n": 2}, {"doc_id": "b", "n": 2}]
    code, out, _ = run_cli(
        monkeypatch, capsys, "query", "select role, count(*) from tokens group by role", "--store", str(filled_store)
    )
    assert code == 0 and "text" in out and "4" in out


def test_query_is_read_only_and_errors_are_clear(monkeypatch, capsys, filled_store, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "query", "delete from documents", "--store", str(filled_store))
    assert code == 2 and "query failed" in err
    with Store(filled_store, read_only=True) as store:
        assert store.one("select count(*) from documents")[0] == 2
    code, _, err = run_cli(monkeypatch, capsys, "query", "select 1", "--store", str(tmp_path / "none.duckdb"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(monkeypatch, capsys, "query", "select 1", "--store", str(filled_store), "-f", "xml")
    assert code == 2 and "--format must be" in err


def test_config_defaults_round_trip(monkeypatch, capsys, tmp_path):
    code, out, _ = run_cli(monkeypatch, capsys, "config")
    assert code == 0
    path = tmp_path / "run.yaml"
    path.write_text(out, encoding="utf-8")
    assert load_config(path) == RunConfig()
    assert load_config(None).model.source == "embedded:smollm2"
    assert [s.name for s in RunConfig().corpus.sources][-1] == "prompts"


@pytest.mark.parametrize(
    "text,message",
    [
        ("corpus:\n  ctx_len: 256\n  ctx_lenn: 3\n", "corpus.ctx_lenn: Extra inputs are not permitted"),
        ("corpus:\n  ctx_len: -1\n", "corpus.ctx_len"),
        ("store: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "mapping at the top level"),
    ],
)
def test_bad_config_is_rejected(monkeypatch, capsys, tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "corpus", "build", "--config", str(path))
    assert code == 2 and message in err and str(path) in err


def test_corpus_build_bad_file_exits_nonzero_and_keeps_store(monkeypatch, capsys, tmp_path, filled_store, cache_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}\n')
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"cache_dir": str(cache_dir), "corpus": {"sources": [{"name": "file", "path": str(bad)}]}}),
        encoding="utf-8",
    )
    with Store(filled_store) as store:
        before = store.query("select * from documents order by doc_id")[1]
    code, _, err = run_cli(monkeypatch, capsys, "corpus", "build", "-c", str(config), "--store", str(filled_store))
    assert code == 2 and "role 'tool'" in err and "bad.jsonl row 0" in err
    with Store(filled_store) as store:
        assert store.query("select * from documents order by doc_id")[1] == before


BAD_INPUTS = {
    "missing file": (None, "does not exist"),
    "empty file": (b"", "holds no documents"),
    "non-UTF-8": (b'{"text": "na\xefve"}\n', "is not valid UTF-8"),
    "unknown role": (b'{"messages": [{"role": "robot", "content": "x"}]}\n', "role 'robot'"),
    "template fails": (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
        "roles must alternate",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS) + ["missing model"])
def test_bad_input_exit_code_message_and_unchanged_store(
    monkeypatch, capsys, tmp_path, filled_store, tiny_model_dir, cache_dir, prefect_api, case
):
    data = tmp_path / "corpus.jsonl"
    content, message = BAD_INPUTS.get(case, (b'{"text": "fine"}\n', "does not exist"))
    if content is not None:
        data.write_bytes(content)
    model = str(tmp_path / "no-such-model") if case == "missing model" else str(tiny_model_dir)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cache_dir": str(cache_dir),
                "model": {"source": model},
                "corpus": {"sources": [{"name": "file", "path": str(data)}], "generation": {"max_new_tokens": 2}},
            }
        )
    )
    with Store(filled_store) as store:
        before = {t: store.query(f"select * from {t}")[1] for t in ("documents", "doc_tokens", "shards", "runs")}
    code, out, err = run_cli(monkeypatch, capsys, "run", "-c", str(config), "--store", str(filled_store), "-q")
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    with Store(filled_store) as store:
        after = {t: store.query(f"select * from {t}")[1] for t in ("documents", "doc_tokens", "shards")}
        runs = store.query("select status, error from runs")[1]
    assert after == {k: v for k, v in before.items() if k != "runs"}
    # The attempt is recorded as a failed run (or not at all when the model never loaded).
    assert all(status == "failed" and message.split()[0] in error for status, error in runs)


def test_flows_reached_through_the_cli_log_bad_input_without_its_traceback(prefect_api):
    """The CLI's door into flows/ quiets Prefect's handlers about bad input only: a bug keeps its traceback."""
    import logging

    from autolabel.cli_flows import ExpectedErrors, prefect_flows

    assert prefect_flows().audit_pipeline.name == "audit_pipeline"
    prefect_flows()  # opening the door again adds no second filter
    handlers = [
        h for name in (None, "prefect.flow_runs", "prefect.task_runs") for h in logging.getLogger(name).handlers
    ]
    filters = [[f for f in h.filters if isinstance(f, ExpectedErrors)] for h in handlers]
    assert handlers and all(len(found) == 1 for found in filters)

    def logged(error: Exception) -> logging.LogRecord:
        try:
            raise error
        except Exception:
            record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
        for (expected,) in filters:
            assert expected.filter(record)  # the record is kept, only its traceback may go
        return record

    assert logged(AutolabelError("store x does not exist")).exc_info is None
    assert logged(ValueError("a bug")).exc_info[0] is ValueError


def test_transcoder_train_then_check(monkeypatch, capsys, tmp_path, tiny_model_dir, cache_dir):
    """Train on the tiny model through the CLI, reopen the saved set, and refuse a transposed copy."""
    import random

    from safetensors.torch import load_file, save_file

    words = "the cat sat on a mat while rain fell over old town roads and quiet rivers ran".split()
    rng = random.Random(0)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": i, "text": " ".join(rng.choices(words, k=60))}) + "\n" for i in range(60)),
        encoding="utf-8",
    )
    extra = tmp_path / "more.jsonl"  # more plain text for training only
    extra.write_text(
        "".join(json.dumps({"id": i, "text": " ".join(rng.choices(words, k=60))}) + "\n" for i in range(40)),
        encoding="utf-8",
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cache_dir": str(cache_dir),
                "store": str(tmp_path / "s.duckdb"),
                "model": {"source": str(tiny_model_dir)},
                "corpus": {"sources": [{"name": "file", "path": str(corpus)}], "generation": {"enabled": False}},
                "transcoder": {
                    "check_tokens": 2000,
                    "train": {
                        "layers": [1, 2],
                        "d_feat": 64,
                        "k": 8,
                        "n_tokens": 30_000,
                        "buffer_tokens": 4000,
                        "passes_per_buffer": 4,
                        "batch_tokens": 256,
                        "lr": 3e-3,
                        "checkpoint_every_steps": 40,
                        "heldout_every": 4,
                        "save_dtype": "float32",
                        "corpus": {
                            "sources": [{"name": "file", "path": str(corpus)}, {"name": "file", "path": str(extra)}],
                            "generation": {"enabled": False},
                        },
                    },
                },
            }
        ),
        encoding="utf-8",
    )
    out = tmp_path / "tc"
    code, stdout, err = run_cli(monkeypatch, capsys, "transcoder", "train", "--out", str(out), "-c", str(config), "-q")
    assert code == 0, err
    assert {"config.yaml", "layer_1.safetensors", "layer_2.safetensors", "autolabel.json", "history.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "plan.json").is_file() and not (out / "checkpoints").exists()  # resumable; scratch removed
    code, stdout, _ = run_cli(monkeypatch, capsys, "transcoder", "train", "--out", str(out), "-c", str(config), "-q")
    assert code == 0 and "nothing to do" in stdout
    code, _, err = run_cli(
        monkeypatch, capsys, "transcoder", "train", "--out", str(out), "-c", str(config), "-q", "--tokens", "40000"
    )
    assert code == 2 and "n_tokens: 30000 there, 40000 now" in err
    with Store(tmp_path / "s.duckdb") as store:  # the run's corpus (held-out) and the training corpus
        assert store.query("select n_docs from corpora order by n_docs")[1] == [(60,), (100,)]
    meta = json.loads((out / "autolabel.json").read_text())
    assert set(meta["heldout"]) == {"1", "2"} and meta["tokens"] >= 30_000
    assert "FVU" in stdout

    code, stdout, err = run_cli(monkeypatch, capsys, "transcoder", "check", "-t", str(out), "-c", str(config), "-q")
    assert code == 0, err
    with Store(tmp_path / "s.duckdb") as store:
        ((layers, fvu),) = store.query("select layers, fvu_by_layer from transcoders")[1]
    assert layers == [1, 2] and all(0 <= v < 0.5 for v in fvu.values())

    # The same weights written transposed (as a wrong exporter would): refused, exit 2, cause named.
    for layer in (1, 2):
        tensors = load_file(str(out / f"layer_{layer}.safetensors"))
        tensors["W_enc"], tensors["W_dec"] = tensors["W_dec"].clone(), tensors["W_enc"].clone()
        save_file(tensors, str(out / f"layer_{layer}.safetensors"))
    code, _, err = run_cli(monkeypatch, capsys, "transcoder", "check", "-t", str(out), "-c", str(config), "-q")
    assert code == 2 and "does not reconstruct" in err and "transposed weights" in err


def test_label_bad_input_is_clear(monkeypatch, capsys, filled_store):
    code, _, err = run_cli(monkeypatch, capsys, "label", "--layers", "6,x", "--store", str(filled_store))
    assert code == 2 and "--layers must be comma-separated integers" in err
    code, _, err = run_cli(monkeypatch, capsys, "label", "--store", str(filled_store), "-q")
    assert code == 2 and "no collected run" in err and "autolabel collect" in err
    with Store(filled_store) as store:
        assert store.one("select count(*) from labels")[0] == 0
