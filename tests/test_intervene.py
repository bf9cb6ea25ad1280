"""Interventions on the tiny model with hand-built transcoders: ablation keeps everything but the one
feature, steering along a token's unembedding raises that token, results are stored once per feature
and setting, bad input is refused before anything is written, and the steering score comes from a real
local HTTP judge, cached."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from test_cli import run_cli
from test_llm import FaultServer

from autolabel.config import InterveneConfig, LLMConfig, ModelConfig, RunConfig, TranscoderConfig
from autolabel.intervene import ablation_effects, flagged_features, intervene_stage
from autolabel.intervene.hooks import Edit, FeatureEdits
from autolabel.intervene.judge import balanced_orders
from autolabel.intervene.run import Prompt, Setting, run_prompts
from autolabel.label.scorers import balanced_accuracy
from autolabel.store import Store, now
from autolabel.transcoders.formats import save_circuit_tracer
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

D, F = 32, 4
SILENT, ZERO_ROW, CAT, RANDOM = 0, 1, 2, 3  # the features of every hand-built transcoder
TEXTS = [
    "the cat sat on a mat while rain fell over old town roads",
    "well certainly the quiet rivers ran past green hills and town",
    "rain fell on the old roads while a cat sat by quiet rivers",
]


def cat_id(subject) -> int:
    return subject.tokenizer.convert_tokens_to_ids("Ġcat")


def transcoder(subject, layer: int, seed: int) -> Transcoder:
    """Feature 0 never fires, 1 fires with a zero decoder row, 2 fires and writes the unembedding of " cat",
    3 fires with a random decoder row."""
    generator = torch.Generator().manual_seed(seed)
    W_enc = 0.01 * torch.randn(D, F, generator=generator)  # small next to the bias: 1-3 fire on every token
    b_enc = torch.tensor([-1e4, 1.0, 1.0, 1.0])
    W_dec = torch.randn(F, D, generator=generator)
    W_dec[ZERO_ROW] = 0
    W_dec[CAT] = subject.model.get_output_embeddings().weight[cat_id(subject)].detach()
    return Transcoder(layer, W_enc, b_enc, W_dec, torch.zeros(D))


@pytest.fixture(scope="module")
def tset(tiny_subject) -> TranscoderSet:
    return TranscoderSet({1: transcoder(tiny_subject, 1, 0), 3: transcoder(tiny_subject, 3, 1)})


def prompt(subject, layer: int, feature: int, text: str = TEXTS[0], index: int = 0) -> Prompt:
    tokens = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(layer, feature, "active", index, "d0", "text", tuple(tokens))


def outcomes_of(subject, tset, prompts, settings, max_act: float = 1.0, **config):
    max_acts = {(p.layer, p.feature): max_act for p in prompts}
    return run_prompts(subject, tset, prompts, settings, max_acts, InterveneConfig(max_new_tokens=6, **config))


def test_ablating_a_feature_whose_decoder_row_is_zero_changes_nothing(tiny_subject, tset):
    prompts = [prompt(tiny_subject, layer, ZERO_ROW, text, i) for layer in (1, 3) for i, text in enumerate(TEXTS)]
    outcomes = outcomes_of(tiny_subject, tset, prompts, [Setting("ablate", 0.0)])
    for outcome in outcomes:
        assert outcome.act > 0 and outcome.n_firing > 0  # it fires, so the ablation really removed something
        assert outcome.kl < 1e-6 and outcome.kl_firing < 1e-6
        assert outcome.intervened_text == outcome.clean_text
    # The same ablation of a feature that writes something does change the output.
    random_row = outcomes_of(tiny_subject, tset, [prompt(tiny_subject, 1, RANDOM)], [Setting("ablate", 0.0)])[0]
    assert random_row.act > 0 and random_row.kl > 1e-4


def test_steering_along_a_tokens_unembedding_raises_it(tiny_subject, tset):
    settings = [Setting("steer", m) for m in (2.0, 8.0, 32.0)]
    outcomes = outcomes_of(tiny_subject, tset, [prompt(tiny_subject, 3, CAT)], settings, max_act=5.0)
    kls = [o.kl for o in outcomes]
    assert kls == sorted(kls) and kls[0] > 0  # stronger steering, larger change
    for outcome in outcomes:
        assert outcome.new_act == 5.0 * outcome.setting.multiple
        raised = {entry["id"]: entry for entry in outcome.top_up}
        assert cat_id(tiny_subject) in raised, outcome.top_up
        assert raised[cat_id(tiny_subject)]["intervened"] > raised[cat_id(tiny_subject)]["clean"]
        assert all(entry["id"] != cat_id(tiny_subject) for entry in outcome.top_down)
    assert outcomes[-1].intervened_text.count(" cat") >= 3 and " cat" not in outcomes[-1].clean_text


def test_ablating_a_silent_feature_reproduces_the_clean_logits_exactly(tiny_subject, tset):
    ids = torch.tensor([tiny_subject.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]] * 3)
    with torch.inference_mode():
        plain = tiny_subject.model(ids[:1]).logits
        with FeatureEdits(tiny_subject, tset, [None, Edit(1, SILENT, 0.0), Edit(1, RANDOM, 0.0)]):
            edited = tiny_subject.model(ids).logits
    # Exactly up to the rounding by which two identical rows of one batch differ (the clean row against the
    # model run without hooks on that row alone): no error term or other feature was touched.
    rounding = (edited[0] - plain[0]).abs().max()
    assert (edited[1] - edited[0]).abs().max() <= max(2 * rounding, 1e-6)
    assert (edited[2] - edited[0]).abs().max() > 1e-3  # a firing feature's ablation does change the logits
    outcome = outcomes_of(tiny_subject, tset, [prompt(tiny_subject, 1, SILENT)], [Setting("ablate", 0.0)])[0]
    assert (outcome.act, outcome.n_firing, outcome.top_up, outcome.top_down) == (0.0, 0, [], [])
    assert outcome.kl < 1e-6 and outcome.intervened_text == outcome.clean_text  # float rounding of the KL sum


def test_a_cross_layer_feature_is_changed_at_every_layer_it_writes(tiny_subject, tset):
    """A cross-layer feature of layer 1 whose only nonzero decoder slice is layer 3's steers exactly as a
    per-layer feature of layer 3 with that decoder row (both never fire, so both add value * row)."""
    per_layer = transcoder(tiny_subject, 3, 1)
    W_dec = torch.zeros(F, 3, D)
    W_dec[:, 2] = per_layer.W_dec
    cross = TranscoderSet({1: Transcoder(1, torch.zeros(D, F), torch.full((F,), -1.0), W_dec, torch.zeros(3, D))})
    silent = TranscoderSet(
        {3: Transcoder(3, torch.zeros(D, F), torch.full((F,), -1.0), per_layer.W_dec, torch.zeros(D))}
    )
    steer = [Setting("steer", 20.0)]
    via_cross = outcomes_of(tiny_subject, cross, [prompt(tiny_subject, 1, CAT)], steer)[0]
    via_layer = outcomes_of(tiny_subject, silent, [prompt(tiny_subject, 3, CAT)], steer)[0]
    assert via_cross.kl > 1e-4 and via_cross.kl == pytest.approx(via_layer.kl, rel=1e-5)
    assert via_cross.intervened_text == via_layer.intervened_text


# -- the stage, on a store built by hand ---------------------------------------------------------


def example_rows(run_id: str, layer: int, feature: int, tokenizer, assistant_ranks: set[int]) -> list[dict]:
    rows = []
    for rank in range(6):
        tokens = tokenizer(TEXTS[rank % 3], add_special_tokens=False)["input_ids"]
        acts = [0.0] * len(tokens)
        acts[4 + rank] = 3.0 - 0.1 * rank
        rows.append(
            {
                "run_id": run_id,
                "layer": layer,
                "feature": feature,
                "kind": "top",
                "rank": rank,
                "bin": None,
                "doc_id": f"d{rank}",
                "turn": 1,
                "role": "assistant" if rank in assistant_ranks else "text",
                "start": 0,
                "tokens": tokens,
                "acts": acts,
                "max_act": max(acts),
            }
        )
    for rank in range(3):
        tokens = tokenizer(TEXTS[(rank + 1) % 3], add_special_tokens=False)["input_ids"][:8]
        rows.append(
            {
                "run_id": run_id,
                "layer": layer,
                "feature": feature,
                "kind": "random",
                "rank": rank,
                "bin": None,
                "doc_id": f"r{rank}",
                "turn": 0,
                "role": "user",
                "start": 0,
                "tokens": tokens,
                "acts": [0.0] * len(tokens),
                "max_act": 0.0,
            }
        )
    return rows


def make_run(path, subject, tset, config_json: str = "{}") -> str:
    """A collected run of `tset`'s features: feature 0 dead, the others with examples (some in assistant turns)."""
    with Store(path) as store:
        run_id = store.start_run(config_json, subject.model_id)
        features, examples = [], []
        for layer in tset.layers:
            for feature in range(F):
                dead = feature == SILENT
                features.append(
                    {
                        "run_id": run_id,
                        "layer": layer,
                        "feature": feature,
                        "n_tokens": 1000,
                        "n_active": 0 if dead else 100,
                        "density": 0.0 if dead else 0.1,
                        "max_act": 0.0 if dead else 3.0,
                        "status": "dead" if dead else "active",
                    }
                )
                if not dead:
                    examples += example_rows(run_id, layer, feature, subject.tokenizer, {2, 4})
        store.write_shard(run_id, "collect", "final", {"features": features, "examples": examples})
    return run_id


def stage_config(**intervene) -> RunConfig:
    return RunConfig(
        intervene=InterveneConfig(
            **{
                "prompts": 2,
                "max_new_tokens": 4,
                "multiples": [2.0, 8.0],
                "judge": False,
                "batch_rows": 7,
                "group_features": 2,
                **intervene,
            }
        )
    )


def snapshot(store: Store, run_id: str) -> tuple:
    return (
        store.query("SELECT * FROM interventions WHERE run_id = ? ORDER BY ALL", [run_id])[1],
        store.query("SELECT * FROM shards WHERE run_id = ? AND stage = 'intervene' ORDER BY ALL", [run_id])[1],
    )


def test_stage_stores_every_prompt_and_setting_once_and_resumes(tiny_subject, tset, tmp_path):
    run_id = make_run(tmp_path / "s.duckdb", tiny_subject, tset)
    first, both = [(1, ZERO_ROW)], [(1, ZERO_ROW), (3, CAT), (1, RANDOM)]
    with Store(tmp_path / "s.duckdb") as store:
        summary = intervene_stage(store, tiny_subject, tset, run_id, first, stage_config(), show_progress=False)
        assert (summary.computed, summary.reused) == (1, 0)
        # A stopped run resumes at the features it had not finished: the stored one is not run again.
        before = snapshot(store, run_id)
        summary = intervene_stage(store, tiny_subject, tset, run_id, both, stage_config(), show_progress=False)
        assert (summary.computed, summary.reused) == (2, 1)
        after = snapshot(store, run_id)
        assert [row for row in after[0] if (row[1], row[2]) == (1, ZERO_ROW)] == before[0]
        again = intervene_stage(store, tiny_subject, tset, run_id, both, stage_config(), show_progress=False)
        assert (again.computed, again.reused) == (0, 3) and snapshot(store, run_id) == after
        rows = store.query(
            "SELECT layer, feature, prompt_kind, prompt_index, setting, multiple, role, kl, "
            "prompt_tokens FROM interventions WHERE run_id = ? ORDER BY ALL",
            [run_id],
        )[1]
    # 3 features x (2 active + 2 neutral prompts) x (ablation + 2 strengths)
    assert len(rows) == 3 * 4 * 3
    assert {(r[4], r[5]) for r in rows} == {("ablate", 0.0), ("steer", 2.0), ("steer", 8.0)}
    assert all(r[7] >= 0 for r in rows)
    # Active prompts are top examples cut after their peak token (at 4 + rank).
    assert all(len(r[8]) == 5 + r[3] for r in rows if r[2] == "active")
    by_key = {f.feature: f for f in summary.features}
    assert by_key[ZERO_ROW].ablation.mean < 1e-6 and by_key[RANDOM].ablation.mean > 1e-4


def test_flagged_features_use_assistant_examples_and_changed_settings_replace_rows(tiny_subject, tset, tmp_path):
    run_id = make_run(tmp_path / "s.duckdb", tiny_subject, tset)
    keys = [(1, RANDOM), (1, CAT)]

    def active_roles(store) -> dict:
        return dict(
            store.query(
                "SELECT feature, list(role ORDER BY prompt_index) FROM interventions WHERE run_id = ? "
                "AND prompt_kind = 'active' AND setting = 'ablate' GROUP BY 1",
                [run_id],
            )[1]
        )

    with Store(tmp_path / "s.duckdb") as store:
        intervene_stage(store, tiny_subject, tset, run_id, keys, stage_config(), show_progress=False)
        before = active_roles(store)
        store.upsert(
            "audit_findings",
            [
                {
                    "run_id": run_id,
                    "audit": "assistant_pervasiveness",
                    "layer": 1,
                    "feature": RANDOM,
                    "metric": "assistant_turn_share",
                    "value": 0.9,
                    "flagged": True,
                    "rank": 1,
                    "section": "pervasive",
                }
            ],
        )
        assert flagged_features(store, run_id) == {"assistant_pervasiveness": [(1, RANDOM)]}
        flagged = intervene_stage(store, tiny_subject, tset, run_id, keys, stage_config(), show_progress=False)
        after = active_roles(store)
        effects = ablation_effects(store, run_id)
        stronger = intervene_stage(
            store, tiny_subject, tset, run_id, keys, stage_config(multiples=[4.0]), show_progress=False
        )
        multiples = store.query("SELECT DISTINCT multiple FROM interventions WHERE run_id = ? ORDER BY 1", [run_id])[1]
    # Once an audit flags it, the feature is run again on its assistant-turn examples (ranks 2 and 4) first;
    # the other feature keeps its rows (top examples by rank).
    assert before == {RANDOM: ["text", "text"], CAT: ["text", "text"]}
    assert (flagged.computed, flagged.reused) == (1, 1)
    assert after == {RANDOM: ["assistant", "assistant"], CAT: ["text", "text"]}
    # Its ablation effect on assistant prompts has an interval over its 2 prompts; the other feature has none.
    effect = effects[(1, RANDOM)]
    assert set(effects) == {(1, RANDOM)} and effect.n == 2 and 0 <= effect.low <= effect.mean <= effect.high
    assert stronger.computed == 2 and multiples == [(0.0,), (4.0,)]  # no rows of the old strengths are left


@pytest.fixture
def cli_store(tmp_path, tiny_subject, tset, tiny_model_dir, cache_dir):
    folder = tmp_path / "transcoders"
    save_circuit_tracer(tset, folder, "tiny")
    config = RunConfig(
        cache_dir=str(cache_dir),
        model=ModelConfig(source=str(tiny_model_dir), dtype="float32"),
        transcoder=TranscoderConfig(source=str(folder)),
    )
    path = tmp_path / "s.duckdb"
    make_run(path, tiny_subject, tset, config.model_dump_json())
    return path


def written(path) -> tuple:
    with Store(path) as store:
        return tuple(
            store.one(sql)[0]
            for sql in (
                "SELECT count(*) FROM interventions",
                "SELECT count(*) FROM scores",
                "SELECT count(*) FROM shards WHERE stage = 'intervene'",
                "SELECT count(*) FROM llm_calls",
            )
        )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--features", "1:99"], "feature 1:99 does not exist"),
        (["--features", "1:2,3:0"], "feature 3:0 never fired"),
        (["--features", "2:1"], "has no layer 2 (it has 1, 3)"),
        (["--features", "1-1"], "LAYER:FEATURE"),
        (["--features", "1:1", "--multiples", "2,x"], "--multiples must be comma-separated positive numbers"),
        (["--features", "1:1", "--multiples", "inf"], "'inf' is not one"),
        (["--features", "1:1", "--prompts", "0"], "--prompts"),
        (["--audit", "assistant_pervasiveness"], "no features flagged by audit 'assistant_pervasiveness'"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(monkeypatch, capsys, cli_store, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "intervene", "--store", str(cli_store), "--no-judge", "-q", *args)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    assert written(cli_store) == (0, 0, 0, 0)


def test_cli_prints_a_table_of_the_stored_results(monkeypatch, capsys, cli_store):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "intervene",
        "--store",
        str(cli_store),
        "--features",
        "1:1,3:2",
        "--multiples",
        "2,4",
        "--prompts",
        "1",
        "--max-new-tokens",
        "3",
        "--no-judge",
        "-q",
    )
    assert code == 0, err
    assert "1:1" in out and "3:2" in out and "x4" in out and "2 features run now" in " ".join(out.split())
    assert written(cli_store)[:3] == (2 * 2 * 3, 0, 2)


# -- the steering score against a real local HTTP judge ------------------------------------------


class JudgeServer:
    """/v1/chat/completions that reads both continuations and answers from a script: the one with more
    " cat" (right), the other one (wrong), or no JSON (invalid). Logs (the right letter, the answer)."""

    def __init__(self, script: list[str]):
        self.script, self.log, self.requests, self.lock = script, [], 0, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                first = prompt.split("Continuation A: ")[1].split("\nContinuation B: ")[0]
                second = prompt.split("Continuation B: ")[1].split("\nWhich continuation")[0]
                right = "A" if first.count(" cat") > second.count(" cat") else "B"
                with server.lock:
                    step = server.script[server.requests % len(server.script)]
                    server.requests += 1
                    said = {"right": right, "wrong": "AB".replace(right, ""), "invalid": None}[step]
                    server.log.append((right, said))
                content = json.dumps({"shows": said}) if said else "I cannot tell."
                reply = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()


def judged_config(base_url: str, model: str) -> RunConfig:
    config = stage_config(judge=True, prompts=3)
    config.llm = LLMConfig(base_url=base_url, model=model, invalid_retries=0, max_retries=0, concurrency=2)
    return config


def test_steering_score_is_the_balanced_accuracy_of_the_judges_picks_and_is_cached(tiny_subject, tset, tmp_path):
    run_id = make_run(tmp_path / "s.duckdb", tiny_subject, tset)
    server = JudgeServer(["right", "right", "wrong", "invalid", "right"])
    keys = [(3, CAT), (1, RANDOM)]
    try:
        with Store(tmp_path / "s.duckdb") as store:
            store.upsert(
                "labels",
                [
                    {
                        "run_id": run_id,
                        "layer": 3,
                        "feature": CAT,
                        "labeler": "x",
                        "label": "cats",
                        "explanation": "Makes the text talk about cats.",
                        "status": "ok",
                        "created_at": now(),
                    }
                ],
            )
            config = judged_config(server.base_url, "judge")
            summary = intervene_stage(store, tiny_subject, tset, run_id, keys, config, show_progress=False)
            ((value, n, status, details),) = store.query(
                "SELECT value, n, status, details_json FROM scores WHERE run_id = ? AND scorer = 'steering'", [run_id]
            )[1]
            requests = server.requests
            again = intervene_stage(store, tiny_subject, tset, run_id, keys, config, show_progress=False)
            # Lost the score after the judge answered (killed before the commit): the cache answers again.
            store.con.execute("DELETE FROM scores WHERE run_id = ?", [run_id])
            store.con.execute("DELETE FROM shards WHERE run_id = ? AND shard LIKE 'steering:%'", [run_id])
            replayed = intervene_stage(store, tiny_subject, tset, run_id, keys, config, show_progress=False)
            value_again = store.one("SELECT value FROM scores WHERE run_id = ? AND scorer = 'steering'", [run_id])[0]
            uncached = store.one("SELECT count(*) FROM llm_calls WHERE run_id = ? AND NOT cached", [run_id])[0]
    finally:
        server.close()
    # 6 prompts of the labeled feature (3 where it fires, 3 silent); the unlabeled one is not judged.
    assert requests == 6 and summary.judged == 1 and summary.unlabeled == 1 and summary.calls == 6
    answered = [(right == "A", said == "A") for right, said in server.log if said is not None]
    assert status == "ok" and n == len(answered) == 5 and json.loads(details)["invalid"] == 1
    assert value == pytest.approx(balanced_accuracy(*zip(*answered, strict=False))) and 0 < value < 1
    assert again.calls == 0 and again.judged == 0 and replayed.calls == 0 and replayed.judged == 1
    assert server.requests == requests == uncached and value_again == value


def test_a_judge_that_keeps_failing_gives_a_failed_score_not_zero(tiny_subject, tset, tmp_path):
    run_id = make_run(tmp_path / "s.duckdb", tiny_subject, tset)
    server = FaultServer(["500"] * 100)
    try:
        with Store(tmp_path / "s.duckdb") as store:
            store.upsert(
                "labels",
                [
                    {
                        "run_id": run_id,
                        "layer": 3,
                        "feature": CAT,
                        "labeler": "x",
                        "label": "cats",
                        "explanation": "",
                        "status": "ok",
                        "created_at": now(),
                    }
                ],
            )
            intervene_stage(
                store,
                tiny_subject,
                tset,
                run_id,
                [(3, CAT)],
                judged_config(server.base_url, "down"),
                show_progress=False,
            )
            ((value, status, details),) = store.query(
                "SELECT value, status, details_json FROM scores WHERE run_id = ?", [run_id]
            )[1]
    finally:
        server.close()
    assert (value, status) == (None, "failed") and "6 failed requests" in json.loads(details)["reason"]


def test_balanced_orders_put_the_steered_continuation_first_half_the_time():
    import random

    for n in range(1, 9):
        orders = balanced_orders(n, random.Random(n))
        assert sum(orders) == (n + 1) // 2 and len(orders) == n
