"""Labeling end to end on the tiny model's collected features: the real local llama.cpp server
(SmolLM2) for the wiring, the fault-injecting server for output that never parses."""

from __future__ import annotations

import json

import pytest

from autolabel.config import LabelConfig, LLMConfig, RunConfig
from autolabel.label.stage import label_stage
from autolabel.store import Store

from test_collect import collected, corpus, planted  # noqa: F401 (fixtures)
from test_llm import FaultServer

FEATURES = [2, 5, 7]  # a token detector, the assistant-word detector, a dense random feature


def config(**llm) -> RunConfig:
    return RunConfig(label=LabelConfig(layers=[1], features=FEATURES + [0], min_examples=2, explain_top=3,
                                       explain_quantile=1, score_examples=4, output_tokens=3,
                                       features_per_shard=2),  # two shards
                     llm=LLMConfig(max_tokens=160, concurrency=2, **llm))  # room for the bounded schema


def test_labels_and_scores_from_the_local_server_then_a_free_rerun(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    tset, _ = planted
    run_id, _ = collected
    with Store(store_path) as store:
        summary = label_stage(store, tiny_subject, tset, run_id, config(), show_progress=False)
        labels = store.query("SELECT feature, status, label, error FROM labels WHERE run_id = ? ORDER BY feature",
                             [run_id])[1]
        scores = store.query("SELECT feature, scorer, status, value, n, unreliable FROM scores WHERE run_id = ? "
                             "ORDER BY feature, scorer", [run_id])[1]
        calls = store.one("SELECT count(*) FROM llm_calls WHERE run_id = ? AND NOT cached", [run_id])[0]
        again = label_stage(store, tiny_subject, tset, run_id, config(), show_progress=False)
        calls_after = store.one("SELECT count(*) FROM llm_calls WHERE run_id = ? AND NOT cached", [run_id])[0]
    # Feature 0 never fired: it is not labeled (dead features are skipped by selection, never faked).
    assert [f for f, *_ in labels] == FEATURES
    assert all(status == "ok" and label for _, status, label, _ in labels), labels  # the grammar forces the schema
    assert {(f, s) for f, s, *_ in scores} == {(f, s) for f in FEATURES for s in ("detection", "embedding", "fuzzing")}
    for _, scorer, status, value, n, unreliable in scores:
        if status == "ok":
            assert 0 <= value <= 1 and n > 0 and unreliable == (value < 0.6)
        else:
            assert value is None
    assert summary.by_status == {"ok": 3} and summary.calls == calls > 0
    assert again.calls == 0 and calls_after == calls  # every answer came from the cache


def test_output_that_never_parses_is_recorded_as_a_failure_not_a_label(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    tset, _ = planted
    run_id, _ = collected
    server = FaultServer(["wrong_schema"] * 100, answer="{}")
    try:
        with Store(store_path) as store:
            settings = config(base_url=server.base_url, model="broken-labeler", invalid_retries=1)
            settings.label.features = [2]
            summary = label_stage(store, tiny_subject, tset, run_id, settings, show_progress=False)
            (status, label, error), = store.query("SELECT status, label, error FROM labels WHERE run_id = ? "
                                                  "AND labeler = 'broken-labeler'", [run_id])[1]
    finally:
        server.close()
    assert (status, label) == ("invalid", None) and "label" in error
    assert summary.by_status == {"invalid": 1} and server.requests == 2


def test_budget_stops_cleanly_and_a_resume_finishes(corpus, tiny_subject, planted, collected, tmp_path):
    store_path, _, _ = corpus
    tset, _ = planted
    run_id, _ = collected
    server = FaultServer([], answer=json.dumps({"label": "cats", "explanation": "Fires on cat.", "fires": [1, 2],
                                                "correct": [1]}))
    try:
        with Store(store_path) as store:
            settings = config(base_url=server.base_url, model="budget-labeler", max_calls=2)
            settings.label.scorers = ["detection"]
            first = label_stage(store, tiny_subject, tset, run_id, settings, show_progress=False)
            assert first.stopped and "max_calls" in first.stopped
            settings.llm.max_calls = None
            second = label_stage(store, tiny_subject, tset, run_id, settings, show_progress=False)
            labels = store.query("SELECT feature, status, label FROM labels WHERE run_id = ? "
                                 "AND labeler = 'budget-labeler' ORDER BY feature", [run_id])[1]
    finally:
        server.close()
    assert second.stopped is None
    assert labels == [(f, "ok", "cats") for f in FEATURES]


def test_an_audits_flagged_features_are_the_candidates(corpus, collected):
    from autolabel.audit import audit_stage, load_spec
    from autolabel.config import DEFAULTS_DIR
    from autolabel.errors import AutolabelError
    from autolabel.label.stage import select_features

    store_path, _, _ = corpus
    run_id, _ = collected
    settings = RunConfig(label=LabelConfig(audit="assistant_pervasiveness"))
    with Store(store_path) as store:
        with pytest.raises(AutolabelError, match="no findings of audit 'assistant_pervasiveness'.*autolabel audit"):
            select_features(store, run_id, settings)
        audit_stage(store, run_id, [load_spec(DEFAULTS_DIR / "assistant_pervasiveness.yaml")])
        selected = select_features(store, run_id, settings)
    # Feature 5 fires on "certainly", which opens every assistant turn; nothing else is assistant-only.
    assert [(layer, feature) for layer, feature, _ in selected] == [(1, 5)]
