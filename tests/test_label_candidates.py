"""Best-of-N labels and harder detection negatives, on a collection with room for two held-out splits:
the real local llama.cpp server (SmolLM2) drafts and judges, the fault-injecting server where a test
needs to know the answer."""

from __future__ import annotations

import json
import shutil

import pytest
from test_collect import CONFIG, collect
from test_label import judge
from test_llm import FaultServer

from autolabel.config import LabelConfig, LLMConfig, RunConfig
from autolabel.label.candidates import held_out_splits, selection_value, shown_subsets
from autolabel.label.evidence import read_examples
from autolabel.label.negatives import content_words, detection_negatives, mentions, silent_stretches
from autolabel.label.prompts import Label
from autolabel.label.scorers import Score
from autolabel.label.stage import label_stage
from autolabel.store import Store

# Twice the test collection's examples, so each held-out split has enough texts of each kind to score.
WIDE = CONFIG.model_copy(update={"top_k": 24, "per_bin": 4, "random_examples": 12, "example_tokens": 12})
SCORE_TEXTS = 8
CAT, RAIN = 2, 3  # planted token detectors of " cat" and " rain"


@pytest.fixture(scope="module")
def wide(corpus, tiny_subject, planted, tmp_path_factory):
    """(store path, run_id) of the planted transcoder collected with WIDE, in a copy of the corpus store."""
    store_path, corpus_id, _ = corpus
    copy = tmp_path_factory.mktemp("wide") / "s.duckdb"
    shutil.copy(store_path, copy)
    run_id, _ = collect(copy, corpus_id, tiny_subject, planted[0], config=WIDE)
    return copy, run_id


def settings(features: list[int], candidates: int, **llm) -> RunConfig:
    return RunConfig(
        label=LabelConfig(
            layers=[1],
            features=features,
            min_examples=2,
            explain_top=3,
            explain_quantile=1,
            score_examples=SCORE_TEXTS,
            output_tokens=3,
            scorers=["detection", "fuzzing"],
            candidates=candidates,
        ),
        llm=LLMConfig(**{"max_tokens": 160, "concurrency": 2, **llm}),
    )


def examples_of(store: Store, run_id: str, feature: int, tokenizer) -> dict:
    return read_examples(store, run_id, 1, feature, tokenizer)


def test_candidates_are_drafted_from_shown_examples_and_scored_on_two_disjoint_held_out_splits(wide, tiny_subject):
    store_path, run_id = wide
    with Store(store_path) as store:
        examples = examples_of(store, run_id, CAT, tiny_subject.tokenizer)
    label = settings([CAT], candidates=3).label
    subsets = shown_subsets(examples, label, "0:1:2")
    assert subsets[0] == shown_subsets(examples, label.model_copy(update={"candidates": 1}), "0:1:2")[0]
    assert len(subsets) == 3 and len({json.dumps(s) for s in subsets}) == 3
    assert all(i % 2 == 0 for s in subsets for kind in ("top", "quantile") for i in s[kind])  # never a held-out one
    assert all((len(s["top"]), len(s["quantile"])) == (3, 1) for s in subsets)
    selection, report = held_out_splits(examples, choosing=True)
    _, everything = held_out_splits(examples, choosing=False)
    # Examples by identity: two documents can share a context's text (the system prompt).
    held = {
        name: ({id(e) for e in split.positives}, {id(e) for e in split.random})
        for name, split in (("selection", selection), ("report", report), ("all", everything))
    }
    for kind in (0, 1):  # activating, silent
        assert not held["selection"][kind] & held["report"][kind]
        assert held["selection"][kind] | held["report"][kind] == held["all"][kind]
    assert held["all"] == (
        {id(e) for e in examples["top"][1::2] + examples["quantile"][1::2]},
        {id(e) for e in examples["random"]},
    )
    assert min(len(selection.positives), len(report.positives)) >= 6  # fuzzing's 3 marked right and 3 wrong
    assert min(len(selection.random), len(report.random)) >= SCORE_TEXTS // 2


def test_the_best_candidate_on_the_selection_split_is_kept_and_scored_on_the_other(wide, tiny_subject, planted):
    store_path, run_id = wide
    config = settings([CAT, RAIN], candidates=3)
    drafts = (
        "SELECT count(*) FROM llm_cache WHERE model LIKE 'smollm2-135m@%' "
        "AND request_json->'messages'->-1->>'content' LIKE 'Examples:%'"
    )
    with Store(store_path) as store:
        drafted_before = store.one(drafts)[0]  # the copied store holds earlier modules' drafts in a full run
        summary = label_stage(store, tiny_subject, planted[0], run_id, config, show_progress=False)
        labels = store.rows(
            "SELECT feature, status, label, explanation, prompt_hash, candidates_json FROM labels "
            "WHERE run_id = ? AND labeler LIKE 'smollm2-135m@%' ORDER BY 1",
            [run_id],
        )
        scores = {
            (f, scorer): (status, n)
            for f, scorer, status, n in store.rows(
                "SELECT feature, scorer, status, n FROM scores WHERE run_id = ? AND labeler LIKE 'smollm2-135m@%'",
                [run_id],
            )
        }
        drafted = store.one(drafts)[0] - drafted_before
        again = label_stage(store, tiny_subject, planted[0], run_id, config, show_progress=False)
    assert [(f, status) for f, status, *_ in labels] == [(CAT, "ok"), (RAIN, "ok")]
    expected_requests = 0
    for feature, _, label, explanation, prompt_hash, record in labels:
        candidates = json.loads(record)["candidates"]
        assert len(candidates) == 3 and all(c["status"] == "ok" for c in candidates)  # the grammar forces JSON
        distinct = {(c["label"], c["explanation"]): c["selection"] for c in candidates}
        if len(distinct) > 1:  # a choice to make: each distinct label scored once on the selection split
            kept = chosen(candidates)
            expected_requests += sum(v["n"] for selection in distinct.values() for v in selection.values())
        else:  # nothing to choose: no selection score
            kept = 0
            assert all(c["selection"] == {} and c["selection_value"] is None for c in candidates)
        assert [c["kept"] for c in candidates] == [i == kept for i in range(3)]
        assert (candidates[kept]["label"], candidates[kept]["explanation"]) == (label, explanation)
        assert candidates[kept]["prompt_hash"] == prompt_hash
        for scorer in ("detection", "fuzzing"):
            status, n = scores[(feature, scorer)]
            assert status in ("ok", "degenerate") and n >= SCORE_TEXTS // 2
            expected_requests += n
    assert drafted == 2 * 3
    # The report split shares no text with the selection split: none of the kept label's report judgements
    # came from the cache, so every request counts.
    assert summary.calls == drafted + expected_requests
    assert again.calls == 0 and again.by_status == {"ok": 2}


def chosen(candidates: list[dict]) -> int:
    """The candidate the documented rule keeps, recomputed from the recorded selection scores."""
    values = [
        selection_value([Score(s, v["value"], v["n"], v["status"]) for s, v in c["selection"].items()])
        for c in candidates
    ]
    assert [c["selection_value"] for c in candidates] == pytest.approx(values)
    return max(range(len(candidates)), key=lambda i: (values[i], -i))


def test_hard_negatives_are_silent_contexts_that_mention_the_label(wide, tiny_subject):
    store_path, run_id = wide
    with Store(store_path) as store:
        rain = examples_of(store, run_id, RAIN, tiny_subject.tokenizer)
        cat = examples_of(store, run_id, CAT, tiny_subject.tokenizer)
    assert content_words(Label("the word cats in text", "")) == {"cat"}  # generic words are not content
    _, held = held_out_splits(rain, choosing=False)
    stretches = silent_stretches(held.positives)
    assert stretches and all(max(e.acts) <= 0 and any(e.text in p.text for p in held.positives) for e in stretches)
    negatives, n_hard = detection_negatives(Label("cats", ""), held.random, stretches, 6, 0.5)
    assert n_hard == 3 and len(negatives) == 6 and len({id(e) for e in negatives}) == 6
    assert all(mentions(e.text, {"cat"}) for e in negatives[:n_hard])
    silent = {e.text for e in held.random + stretches}
    assert all(e.text in silent and max(e.acts) <= 0 for e in negatives)
    assert negatives[n_hard:] == [e for e in held.random if e not in negatives[:n_hard]][:3]  # the rest: random
    assert detection_negatives(Label("cats", ""), held.random, stretches, 6, 0.0) == (held.random[:6], 0)
    # The cat detector is silent on no context with " cat" in it: its right label finds no hard negative.
    _, cat_held = held_out_splits(cat, choosing=False)
    assert detection_negatives(Label("cats", ""), cat_held.random, silent_stretches(cat_held.positives), 6, 1.0)[1] == 0


def test_detection_judges_the_hard_negatives(wide, tiny_subject, planted):
    store_path, run_id = wide
    server = FaultServer([], answer=json.dumps({"label": "cats", "explanation": "Fires on cat."}), judge=judge)
    try:
        with Store(store_path) as store:
            config = settings([RAIN], candidates=1, base_url=server.base_url, model="hard-labeler")
            config.label.hard_negatives = 0.5
            label_stage(store, tiny_subject, planted[0], run_id, config, show_progress=False)
            status, details = store.one(
                "SELECT status, details_json FROM scores WHERE run_id = ? "
                "AND labeler = 'hard-labeler' AND scorer = 'detection'",
                [run_id],
            )
            judged = {
                json.loads(r)["messages"][-1]["content"].split("\nText: ")[1].removesuffix("\nAnswer yes or no.")
                for (r,) in store.rows(
                    "SELECT request_json FROM llm_cache WHERE model = 'hard-labeler' AND "
                    "request_json->'messages'->-1->>'content' LIKE 'Feature: cats.%Does%'"
                )
            }
            rain = examples_of(store, run_id, RAIN, tiny_subject.tokenizer)
    finally:
        server.close()
    _, held = held_out_splits(rain, choosing=False)
    negatives, n_hard = detection_negatives(
        Label("cats", ""), held.random, silent_stretches(held.positives), SCORE_TEXTS // 2, 0.5
    )
    assert status == "ok" and json.loads(details)["hard_negatives"] == n_hard == 2
    assert {e.text for e in negatives} <= judged and len(judged) == SCORE_TEXTS


def test_candidates_that_never_parse_stay_invalid(wide, tiny_subject, planted):
    store_path, run_id = wide
    server = FaultServer(["wrong_schema"] * 100, answer="{}")
    try:
        with Store(store_path) as store:
            config = settings(
                [CAT], candidates=3, base_url=server.base_url, model="broken-candidates", invalid_retries=0
            )
            summary = label_stage(store, tiny_subject, planted[0], run_id, config, show_progress=False)
            row = store.one(
                "SELECT status, label FROM labels WHERE run_id = ? AND labeler = 'broken-candidates'", [run_id]
            )
            n_scores = store.one("SELECT count(*) FROM scores WHERE labeler = 'broken-candidates'")[0]
    finally:
        server.close()
    assert row == ("invalid", None) and n_scores == 0 and summary.by_status == {"invalid": 1}
    assert server.requests == 3  # one draft per candidate, no score for a label that never came


def test_a_selection_score_without_an_answer_is_an_error_asked_again(wide, tiny_subject, planted):
    store_path, run_id = wide
    answers = iter(["cats", "rain", "hills"] * 10)

    class Drafts(FaultServer):
        """A different label for each draft, so there is a choice to score."""

        @property
        def answer(self) -> str:
            return json.dumps({"label": next(answers), "explanation": "Fires on it."})

        @answer.setter
        def answer(self, value: str) -> None:
            pass

    server = Drafts(["ok", "ok", "ok", "500"], judge=judge)
    try:
        with Store(store_path) as store:
            config = settings(
                [CAT], candidates=3, base_url=server.base_url, model="flaky-judge", max_retries=0, concurrency=1
            )
            first = label_stage(store, tiny_subject, planted[0], run_id, config, show_progress=False)
            failed = store.one("SELECT status, error FROM labels WHERE labeler = 'flaky-judge'")
            second = label_stage(store, tiny_subject, planted[0], run_id, config, show_progress=False)
            healed = store.one("SELECT status, candidates_json FROM labels WHERE labeler = 'flaky-judge'")
            reported = store.one("SELECT sum(n) FROM scores WHERE labeler = 'flaky-judge'")[0]
    finally:
        server.close()
    assert first.by_status == {"error": 1} and failed[0] == "error" and "selection split" in failed[1]
    assert healed[0] == "ok" and reported > 0
    # The one unanswered judgement and the report split's; the drafts and other judgements from the cache.
    assert second.calls == 1 + reported
    candidates = json.loads(healed[1])["candidates"]
    assert len({c["label"] for c in candidates}) == 3 and all(
        set(c["selection"]) == {"detection", "fuzzing"} for c in candidates
    )
    assert [c["kept"] for c in candidates] == [i == chosen(candidates) for i in range(3)]
