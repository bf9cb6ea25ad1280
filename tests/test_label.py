"""Labeling end to end on the tiny model's collected features: the real local llama.cpp server
(SmolLM2) for the wiring, the fault-injecting server for output that never parses."""

from __future__ import annotations

import json
import zlib

import pytest
from test_llm import NOT_A_COMPLETION, FaultServer

from autolabel import label as label_package
from autolabel.config import LabelConfig, LLMConfig, RunConfig
from autolabel.errors import AutolabelError
from autolabel.label.stage import label_stage, select_features
from autolabel.store import Store

FEATURES = [2, 5, 7]  # a token detector, the assistant-word detector, a dense random feature
ANSWER = json.dumps({"label": "cats", "explanation": "Fires on cat."})
SCORE_TEXTS = 6  # per scorer: a request each


def judge(prompt: str) -> float:
    """The fault server's P(yes): fixed per text and different between texts, so no score is degenerate."""
    return (zlib.crc32(prompt.encode()) % 97 + 1) / 99


def config(**llm) -> RunConfig:
    return RunConfig(
        label=LabelConfig(
            layers=[1],
            features=FEATURES + [0],
            min_examples=2,
            explain_top=3,
            explain_quantile=1,
            score_examples=SCORE_TEXTS,
            output_tokens=3,
            features_per_shard=2,
        ),  # two shards
        llm=LLMConfig(**{"max_tokens": 160, "concurrency": 2, **llm}),
    )  # room for the bounded schema


def test_labels_and_scores_from_the_local_server_then_a_free_rerun(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    tset, _ = planted
    run_id, _ = collected
    with Store(store_path) as store:
        summary = label_stage(store, tiny_subject, tset, run_id, config(), show_progress=False)
        labels = store.query(
            "SELECT feature, status, label, error FROM labels WHERE run_id = ? ORDER BY feature", [run_id]
        )[1]
        scores = store.query(
            "SELECT feature, scorer, status, value, n, unreliable, ci_low, ci_high, "
            "details_json->>'graded_by' FROM scores WHERE run_id = ? ORDER BY feature, scorer",
            [run_id],
        )[1]
        calls = store.one("SELECT count(*) FROM llm_calls WHERE run_id = ? AND NOT cached", [run_id])[0]
        asked = [
            json.loads(request)["messages"][-1]["content"]
            for (request,) in store.rows("SELECT request_json FROM llm_cache WHERE model LIKE 'smollm2-135m@%'")
        ]
        again = label_stage(store, tiny_subject, tset, run_id, config(), show_progress=False)
        calls_after = store.one("SELECT count(*) FROM llm_calls WHERE run_id = ? AND NOT cached", [run_id])[0]
    # Feature 0 never fired: it is not labeled (dead features are skipped by selection, never faked).
    assert [f for f, *_ in labels] == FEATURES
    assert all(status == "ok" and label for _, status, label, _ in labels), labels  # the grammar forces the schema
    assert {(f, s) for f, s, *_ in scores} == {(f, s) for f in FEATURES for s in ("detection", "embedding", "fuzzing")}
    for _, scorer, status, value, n, unreliable, low, high, graded_by in scores:
        if status == "ok":
            assert 0 <= low <= value <= high <= 1 and n >= SCORE_TEXTS and unreliable == (value < 0.6)
            assert graded_by == ("logprobs" if scorer != "embedding" else None)  # llama.cpp returns them
        else:
            assert value is None and status in ("degenerate", "failed") and not unreliable
    assert sum(status == "ok" for _, _, status, *_ in scores) >= 6
    assert summary.by_status == {"ok": 3} and summary.calls == calls > 0
    assert again.calls == 0 and calls_after == calls  # every answer came from the cache
    # Role-aware evidence: each example says whose text it is, and the prompt where the feature fires by role
    # (feature 5 fires on the word that opens every assistant turn).
    label_prompts = [prompt for prompt in asked if prompt.startswith("Examples:")]
    assert len(label_prompts) == len(FEATURES) and all("\nWhere it fires: " in p for p in label_prompts)
    assert any("[assistant turn" in p and "of assistant turns" in p for p in label_prompts)
    # Which tokens fire, counted over the shown examples, and where it fires by document category.
    assert all("\nFiring tokens: " in p for p in label_prompts)
    assert any("'" in p.split("\nFiring tokens: ")[1].split("\n")[0] for p in label_prompts)  # tokens named
    assert any("\nBy category: " in p for p in label_prompts)  # a category stands out for a planted feature


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
            ((status, label, error),) = store.query(
                "SELECT status, label, error FROM labels WHERE run_id = ? AND labeler = 'broken-labeler'", [run_id]
            )[1]
    finally:
        server.close()
    assert (status, label) == ("invalid", None) and "label" in error
    assert summary.by_status == {"invalid": 1} and server.requests == 2


def test_budget_stops_cleanly_and_a_resume_finishes(corpus, tiny_subject, planted, collected, tmp_path):
    store_path, _, _ = corpus
    tset, _ = planted
    run_id, _ = collected
    server = FaultServer([], answer=ANSWER, judge=judge)
    try:
        with Store(store_path) as store:
            settings = config(base_url=server.base_url, model="budget-labeler", max_calls=2)
            settings.label.scorers = ["detection"]
            first = label_stage(store, tiny_subject, tset, run_id, settings, show_progress=False)
            assert first.stopped and "max_calls" in first.stopped
            settings.llm.max_calls = None
            second = label_stage(store, tiny_subject, tset, run_id, settings, show_progress=False)
            labels = store.query(
                "SELECT feature, status, label FROM labels WHERE run_id = ? "
                "AND labeler = 'budget-labeler' ORDER BY feature",
                [run_id],
            )[1]
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


def label_with(store, tiny_subject, tset, run_id, server: FaultServer, model: str, features=FEATURES, **llm):
    """A detection-scored label run against the fault server: (summary, [(feature, status, error)])."""
    settings = config(base_url=server.base_url, model=model, backoff_s=0.01, **llm)
    settings.label.features, settings.label.scorers = features, ["detection"]
    summary = label_stage(store, tiny_subject, tset, run_id, settings, show_progress=False)
    labels = store.query(
        "SELECT feature, status, error FROM labels WHERE run_id = ? AND labeler = ? ORDER BY 1", [run_id, model]
    )[1]
    return summary, labels


def test_replies_that_are_not_completions_are_counted_failures_and_the_run_completes(
    corpus, tiny_subject, planted, collected
):
    store_path, _, _ = corpus
    run_id, _ = collected
    faults = NOT_A_COMPLETION + ["429:soon", "429:Wed, 21 Oct 2015 07:28:00 -0000"]
    server = FaultServer(faults, answer=ANSWER, judge=judge)
    try:
        with Store(store_path) as store:
            summary, labels = label_with(
                store, tiny_subject, planted[0], run_id, server, "garbage-labeler", max_retries=len(faults)
            )
            ledger = dict(
                store.query(
                    "SELECT status, count(*) FROM llm_calls WHERE run_id = ? AND model = 'garbage-labeler' GROUP BY 1",
                    [run_id],
                )[1]
            )
            scored = store.one(
                "SELECT count(*) FROM scores WHERE run_id = ? AND labeler = 'garbage-labeler' AND status = 'ok'",
                [run_id],
            )[0]
    finally:
        server.close()
    assert labels == [(f, "ok", None) for f in FEATURES] and summary.by_status == {"ok": 3}
    assert ledger.pop("ok") == server.requests - len(faults)  # per feature: the label, a judgement per text
    assert ledger == {"bad_response": 5, "connection_error": 1, "rate_limited": 2}
    # Feature 7 fires almost everywhere: too few silent contexts to score it, so it asks nothing.
    assert scored == 2 and summary.calls == server.requests == len(FEATURES) + scored * SCORE_TEXTS + len(faults)


def test_labels_failed_in_an_outage_are_asked_again_and_then_never(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    run_id, _ = collected
    tset = planted[0]
    server = FaultServer(["500"] * 1000, answer=ANSWER, judge=judge)
    try:
        with Store(store_path) as store:
            outage, failed = label_with(store, tiny_subject, tset, run_id, server, "outage-labeler", max_retries=1)
            server.script = []
            healthy, healed = label_with(store, tiny_subject, tset, run_id, server, "outage-labeler", max_retries=1)
            requests = server.requests
            again, _ = label_with(store, tiny_subject, tset, run_id, server, "outage-labeler", max_retries=1)
    finally:
        server.close()
    assert [(f, status) for f, status, _ in failed] == [(f, "error") for f in FEATURES]
    assert all("HTTP 500 (after 2 attempts)" in error for *_, error in failed) and outage.by_status == {"error": 3}
    assert healthy.calls > 0 and healed == [(f, "ok", None) for f in FEATURES]
    assert again.calls == 0 and server.requests == requests and again.by_status == {"ok": 3}


# The two scorers that ask the LLM (embedding needs none), by name: rows of other scorers must not decide.
SCORES_OF_FEATURE_2 = (
    "SELECT list(status ORDER BY scorer) FROM scores WHERE run_id = ? AND feature = 2 "
    "AND scorer IN ('detection', 'fuzzing') AND labeler = 'score-outage-labeler'"
)


def test_a_score_that_got_no_answer_is_asked_again(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    run_id, _ = collected
    tset = planted[0]
    server = FaultServer(["ok", "500"], answer=ANSWER, judge=judge)  # one request at a time: the label, then its score
    try:
        with Store(store_path) as store:
            first, labels = label_with(
                store,
                tiny_subject,
                tset,
                run_id,
                server,
                "score-outage-labeler",
                features=[2],
                max_retries=0,
                concurrency=1,
            )
            score = store.one(SCORES_OF_FEATURE_2, [run_id])[0]
            second, _ = label_with(
                store,
                tiny_subject,
                tset,
                run_id,
                server,
                "score-outage-labeler",
                features=[2],
                max_retries=0,
                concurrency=1,
            )
            healed = store.one(SCORES_OF_FEATURE_2, [run_id])[0]
    finally:
        server.close()
    assert labels == [(2, "ok", None)] and score == ["error"]  # one of its texts got the 500
    assert second.calls == 1 and healed == ["ok"]  # the label and five texts from the cache, one from the server


def test_a_surprise_in_one_feature_keeps_the_others_and_is_retried(
    corpus, tiny_subject, planted, collected, monkeypatch
):
    store_path, _, _ = corpus
    run_id, _ = collected
    tset = planted[0]
    label_feature = label_package.stage.label_feature

    async def fails_after_its_requests(client, embedder, layer, feature, *args):
        result = await label_feature(client, embedder, layer, feature, *args)
        if feature == 5:
            raise RuntimeError("the scorer fell over")
        return result

    server = FaultServer([], answer=ANSWER, judge=judge)
    try:
        with Store(store_path) as store:
            monkeypatch.setattr(label_package.stage, "label_feature", fails_after_its_requests)
            first, labels = label_with(store, tiny_subject, tset, run_id, server, "surprised-labeler")
            monkeypatch.undo()
            second, healed = label_with(store, tiny_subject, tset, run_id, server, "surprised-labeler")
    finally:
        server.close()
    assert labels == [(2, "ok", None), (5, "error", "RuntimeError: the scorer fell over"), (7, "ok", None)]
    assert first.by_status == {"ok": 2, "error": 1}
    assert second.calls == 0 and healed == [(f, "ok", None) for f in FEATURES]  # feature 5 replayed from the cache


def test_invalid_labels_are_asked_again_only_when_asked(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    run_id, _ = collected
    tset = planted[0]
    server = FaultServer(["wrong_schema"] * 2, answer=ANSWER, judge=judge)
    try:
        with Store(store_path) as store:
            _, invalid = label_with(
                store, tiny_subject, tset, run_id, server, "stubborn-labeler", features=[2], invalid_retries=1
            )
            kept, still = label_with(
                store, tiny_subject, tset, run_id, server, "stubborn-labeler", features=[2], invalid_retries=1
            )
            settings = config(base_url=server.base_url, model="stubborn-labeler", invalid_retries=1)
            settings.label.features, settings.label.scorers = [2], ["detection"]
            settings.label.retry_invalid = True
            retried = label_stage(store, tiny_subject, tset, run_id, settings, show_progress=False)
            status = store.one("SELECT status FROM labels WHERE run_id = ? AND labeler = 'stubborn-labeler'", [run_id])[
                0
            ]
    finally:
        server.close()
    assert [status for _, status, _ in invalid] == ["invalid"] and still == invalid and kept.calls == 0
    assert retried.calls == 1 + SCORE_TEXTS and status == "ok"  # past the two cached invalid answers


@pytest.mark.parametrize(
    "selection,message",
    [
        ({"layers": [99]}, r"has no layer 99; pick --layers from the layers it has: 1$"),
        ({"layers": [1, 99, 7]}, r"has no layer 7, 99; pick --layers from the layers it has: 1$"),
        ({"features": [999_999]}, r"has no feature 999999; pick --features from 0 to 15$"),
        ({"layers": [1], "features": [2, 16]}, r"has no feature 16; pick --features from 0 to 15$"),
    ],
)
def test_a_selection_the_run_does_not_have_is_an_error(corpus, collected, selection, message):
    store_path, _, _ = corpus
    run_id, _ = collected
    with Store(store_path) as store, pytest.raises(AutolabelError, match=message):
        select_features(store, run_id, RunConfig(label=LabelConfig(**selection)))


def test_a_judge_that_says_yes_to_every_text_is_degenerate_not_chance(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    run_id, _ = collected
    server = FaultServer([], answer=ANSWER, judge=lambda prompt: 0.9)
    try:
        with Store(store_path) as store:
            summary, labels = label_with(store, tiny_subject, planted[0], run_id, server, "yes-labeler", features=[2])
            row = store.one(
                "SELECT status, value, unreliable, details_json->>'reason' FROM scores "
                "WHERE run_id = ? AND labeler = 'yes-labeler'",
                [run_id],
            )
    finally:
        server.close()
    assert labels == [(2, "ok", None)] and summary.unreliable == 0
    status, value, unreliable, reason = row
    assert (status, value, unreliable) == ("degenerate", None, False) and "did not tell them apart" in reason


def test_two_labelers_keep_their_own_labels_scores_and_cached_answers(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    run_id, _ = collected
    server = FaultServer([], answer=ANSWER, judge=judge)
    try:
        with Store(store_path) as store:
            first, _ = label_with(store, tiny_subject, planted[0], run_id, server, "labeler-a", features=[2])
            second, _ = label_with(store, tiny_subject, planted[0], run_id, server, "labeler-b", features=[2])
            labels = store.query(
                "SELECT labeler, status FROM labels WHERE run_id = ? AND feature = 2 "
                "AND labeler LIKE 'labeler-_' ORDER BY 1",
                [run_id],
            )[1]
            scores = store.query(
                "SELECT labeler, scorer, status FROM scores WHERE run_id = ? AND feature = 2 "
                "AND labeler LIKE 'labeler-_' ORDER BY 1",
                [run_id],
            )[1]
            cached = store.query(
                "SELECT model, count(*) FROM llm_cache WHERE model LIKE 'labeler-_' GROUP BY 1 ORDER BY 1", []
            )[1]
    finally:
        server.close()
    assert first.calls == second.calls == 1 + SCORE_TEXTS  # b asked for itself: nothing of a's was reused
    assert labels == [("labeler-a", "ok"), ("labeler-b", "ok")]
    assert scores == [("labeler-a", "detection", "ok"), ("labeler-b", "detection", "ok")]
    assert cached == [("labeler-a", 1 + SCORE_TEXTS), ("labeler-b", 1 + SCORE_TEXTS)]
