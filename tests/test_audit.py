"""The assistant-pervasiveness audit on the tiny model: planted features are flagged (or not) for the
right reasons, intervals match textbook values, and diffs find a feature planted only in a later run."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from test_cli import run_cli
from test_collect import LAYER, WORDS, collect, detector, file_corpus, mlp_inputs

from autolabel import summaries
from autolabel.audit import audit_stage, load_spec
from autolabel.audit.diff import diff_rows
from autolabel.audit.measure import Measured, rate_ratio, share_difference, wilson, z_score
from autolabel.config import DEFAULTS_DIR
from autolabel.errors import AutolabelError
from autolabel.store import Store, now
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

SPEC = load_spec(DEFAULTS_DIR / "assistant_pervasiveness.yaml")
CHAT_CATEGORIES = ["help", "chit", "code", "travel"]
# Planted features: 0 fires in every assistant turn; 1 only in the assistant turns of "help"; 2 on the
# `assistant` marker of the chat template; 3 on a word every role uses. Run B adds 4: a second word that
# every assistant turn has, which run A has no feature for.
EVERY_TURN, ONE_CATEGORY, MARKER, EVERYWHERE, NEW_IN_B = range(5)


def write_corpus(path, seed: int = 0) -> None:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    rows = [{"id": f"t{i}", "category": ["news", "story"][i % 2], "text": words(20, 120)} for i in range(16)]
    for i in range(24):
        category = CHAT_CATEGORIES[i % 4]
        extra = "indeed " if category == "help" else ""
        rows.append(
            {
                "id": f"c{i}",
                "category": category,
                "messages": [
                    {"role": "user", "content": words(3, 30)},
                    {"role": "assistant", "content": f"well certainly truly {extra}{words(10, 40)}"},
                    {"role": "user", "content": words(3, 10)},
                    {"role": "assistant", "content": f"well certainly truly {extra}{words(2, 10)}"},
                ],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_subject):
    folder = tmp_path_factory.mktemp("audit")
    write_corpus(folder / "docs.jsonl")
    return file_corpus(folder, tiny_subject, ctx_len=64)


@pytest.fixture(scope="module")
def transcoders(corpus, tiny_subject) -> tuple[TranscoderSet, TranscoderSet]:
    """Run A's and run B's transcoders: B is A plus one feature, with A's decoder rows kept."""
    tokenizer = tiny_subject.tokenizer
    raw, ids, roles = mlp_inputs(tiny_subject, corpus[2])
    token = tokenizer.convert_tokens_to_ids
    template = roles == 3  # ROLES.index("template")
    masks = [
        ids == token("Ġcertainly"),
        ids == token("Ġindeed"),
        template & (ids == token("istant")),  # <|im_start|>ass|istant
        ids == token("Ġcat"),
        ids == token("Ġtruly"),
    ]
    planted = [detector(raw, mask) for mask in masks]
    generator = torch.Generator().manual_seed(1)
    decoder = torch.linalg.qr(torch.randn(32, 32, generator=generator))[0][:5]  # orthonormal rows: no accidental match

    def tset(n: int) -> TranscoderSet:
        W_enc = torch.stack([direction for direction, _ in planted[:n]], dim=1)  # [32, n]
        b_enc = torch.tensor([bias for _, bias in planted[:n]])
        return TranscoderSet({LAYER: Transcoder(LAYER, W_enc, b_enc, decoder[:n].clone(), torch.zeros(32))})

    return tset(4), tset(5)


def collected(corpus, subject, tset, transcoder_id: str) -> str:
    store_path, corpus_id, _ = corpus
    run_id, _ = collect(store_path, corpus_id, subject, tset)
    with Store(store_path) as store:
        store.update_run(run_id, transcoder_id=transcoder_id)
    return run_id


@pytest.fixture(scope="module")
def runs(corpus, tiny_subject, transcoders) -> tuple[str, str]:
    return (
        collected(corpus, tiny_subject, transcoders[0], "tc-a"),
        collected(corpus, tiny_subject, transcoders[1], "tc-b"),
    )


def findings(store: Store, run_id: str, audit: str = SPEC.name) -> dict[int, dict]:
    rows = store.con.execute(
        "SELECT feature, metric, value, ci_low, ci_high, flagged, section, details_json "
        "FROM audit_findings WHERE run_id = ? AND audit = ? ORDER BY feature, metric",
        [run_id, audit],
    ).fetchall()
    result: dict[int, dict] = {}
    for feature, metric, value, low, high, flagged, section, details in rows:
        entry = result.setdefault(feature, {"flagged": flagged, "section": section})
        entry[metric] = (value, low, high, json.loads(details))
    return result


def test_every_turn_feature_is_flagged_and_one_category_marker_and_everywhere_features_are_not(corpus, runs):
    run_a, _ = runs
    with Store(corpus[0]) as store:
        summary = audit_stage(store, run_a, [SPEC])
        found = findings(store, run_a)
    every = found[EVERY_TURN]
    _, low, high, counts = every["assistant_turn_share"]
    assert counts["turns"] == 48 and counts["active_turns"] >= 45  # 24 chats x 2 assistant turns
    assert every["flagged"] and every["section"] == "pervasive" and low >= 0.3 and high <= 1
    assert every["breadth"][0] == 1.0 and sorted(every["breadth"][3]["covered"]) == sorted(CHAT_CATEGORIES)
    assert every["lift_vs_user"][1] >= 2 and every["lift_vs_text"][1] >= 2  # never fires in user turns or text

    one = found[ONE_CATEGORY]  # fires in every assistant turn of one category: a quarter of them
    assert not one["flagged"] and one["breadth"][3]["covered"] == ["help"] and one["breadth"][0] == 0.25
    assert one["assistant_turn_share"][0] == pytest.approx(12 / 48, abs=0.05)

    marker = found[MARKER]  # the `assistant` token of the template: its own section, never flagged
    assert marker["section"] == "template" and not marker["flagged"]
    assert marker["assistant_turn_share"][0] == 0  # markers never make a content turn active

    everywhere = found[EVERYWHERE]  # `cat` is in user turns, assistant turns and plain text alike
    assert not everywhere["flagged"] and everywhere["lift_vs_user"][1] < 2

    (result,) = summary.results
    assert [f["feature"] for f in result.flagged] == [EVERY_TURN] and result.notes == []
    assert [f["feature"] for f in result.template] == [MARKER]


def test_intervals_equal_textbook_values():
    z = z_score(0.95)
    assert z == pytest.approx(1.959964, abs=1e-6)
    share, low, high = wilson(np.array([0, 5, 81]), np.array([10, 10, 263]), z)
    # Wilson score intervals: 0/10 -> [0, 0.2775], 5/10 -> [0.2366, 0.7634], 81/263 -> [0.2553, 0.3662]
    assert low == pytest.approx([0, 0.2366, 0.2553], abs=1e-4) and high == pytest.approx(
        [0.2775, 0.7634, 0.3662], abs=1e-4
    )
    assert share == pytest.approx([0, 0.5, 81 / 263])
    ratio, low, high = rate_ratio(
        np.array([10, 0, 31]), np.array([100, 100, 972]), np.array([5, 0, 0]), np.array([100, 100, 341]), z
    )
    # 10/100 over 5/100: given 15 events, 10 fell on the first side; Wilson for 10/15 is [0.4171, 0.8482],
    # and p / (1 - p) maps it to [0.7156, 5.588] (the Katz log interval would say [0.709, 5.64]).
    assert ratio[0] == 2 and low[0] == pytest.approx(0.7156, abs=1e-3) and high[0] == pytest.approx(5.588, abs=1e-2)
    assert math.isnan(ratio[1]) and math.isnan(low[1])  # never fired on either side: undefined
    # 31 of 972 assistant tokens and 0 of 341 user tokens: Wilson for 31/31 has lower end 0.8897, so the
    # lift is at least 0.8897 / 0.1103 * 341 / 972 = 2.83, with no upper end; the point adds half a count.
    assert low[2] == pytest.approx(2.83, abs=1e-2) and math.isnan(high[2])
    assert ratio[2] == pytest.approx((31.5 / 972) / (0.5 / 341))
    # Newcombe (1998), method 10: 56/70 - 48/80 = 0.2 in [0.0524, 0.3339]; 9/10 - 3/10 = 0.6 in [0.1705, 0.8090]
    assert share_difference(56, 70, 48, 80, z) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)
    assert share_difference(9, 10, 3, 10, z) == pytest.approx((0.6, 0.1705, 0.8090), abs=1e-4)


def test_a_flag_that_flips_within_sampling_noise_is_not_a_change():
    """Flagged now and not before (or the reverse) is a change only when the turn share moved beyond noise."""

    def measured(active: list[int], flagged: list[bool]) -> Measured:
        n = len(active)
        counts = {"assistant_turns_active": np.array(active, dtype=float), "assistant_turns": np.full(n, 144.0)}
        shares = wilson(counts["assistant_turns_active"], counts["assistant_turns"], z_score(0.95))
        return Measured(
            [(1, f) for f in range(n)],
            counts,
            [[]] * n,
            {"assistant_turn_share": shares},
            np.array(["pervasive"] * n),
            np.array(flagged),
            np.arange(1, n + 1),
        )

    # 0: 40 -> 50 of 144 turns, crossing the flag; 1: 10 -> 140, a real change; 2: 100 -> 95, unflagged by noise;
    # 3: 120 -> 30, a real loss
    earlier = measured([40, 10, 100, 120], [False, False, True, True])
    now = measured([50, 140, 95, 30], [True, True, False, False])
    rows = diff_rows(now, earlier, SPEC, "now", "before", ({}, {}), None)
    changes = {(row["feature"], row["change"]): json.loads(row["details_json"]) for row in rows}
    assert set(changes) == {(0, "within_noise"), (1, "became_pervasive"), (2, "within_noise"), (3, "stopped_pervasive")}
    assert changes[(0, "within_noise")]["flag"] == "became" and changes[(2, "within_noise")]["flag"] == "stopped"
    low, high = changes[(1, "became_pervasive")]["share_change"][1:]
    assert 0 < low < 130 / 144 < high and changes[(3, "stopped_pervasive")]["share_change"][2] < 0


def test_diff_across_transcoders_finds_the_feature_planted_only_in_the_later_run(corpus, runs, transcoders):
    run_a, run_b = runs
    decoders = {
        run_a: {LAYER: transcoders[0][LAYER].decoder_rows()},
        run_b: {LAYER: transcoders[1][LAYER].decoder_rows()},
    }
    with Store(corpus[0]) as store:
        summary = audit_stage(store, run_b, [SPEC], against=run_a, decoders=decoders.__getitem__)
        changes = store.con.execute(
            "SELECT change, layer, feature, against_feature, match, cosine FROM audit_diffs "
            "WHERE run_id = ? AND against_run_id = ?",
            [run_b, run_a],
        ).fetchall()
        flagged_b = sorted(f for f, entry in findings(store, run_b).items() if entry["flagged"])
    assert flagged_b == [EVERY_TURN, NEW_IN_B]
    # The every-turn feature matches its twin by decoder direction and was flagged in both runs: no change.
    assert changes == [("became_pervasive", LAYER, NEW_IN_B, None, "none", None)]
    assert summary.results[0].changes == {"became_pervasive": 1}

    with Store(corpus[0]) as store:  # and the other way round, the feature stopped
        audit_stage(store, run_a, [SPEC], against=run_b, decoders=decoders.__getitem__)
        backward = store.con.execute(
            "SELECT change, feature, against_feature, match FROM audit_diffs WHERE run_id = ? AND against_run_id = ?",
            [run_a, run_b],
        ).fetchall()
    assert backward == [("stopped_pervasive", NEW_IN_B, NEW_IN_B, "none")]


def test_diff_of_one_transcoder_matches_by_identity_and_reports_changed_labels(corpus, tiny_subject, runs, transcoders):
    run_a, _ = runs
    run_c = collected(corpus, tiny_subject, transcoders[0], "tc-a")  # same transcoder as run A
    with Store(corpus[0]) as store:
        for run_id, label in ((run_a, "assistant politeness"), (run_c, "Assistant  politeness")):
            store.upsert(
                "labels",
                [
                    {
                        "run_id": run_id,
                        "layer": LAYER,
                        "feature": EVERY_TURN,
                        "labeler": "m",
                        "label": label,
                        "status": "ok",
                        "created_at": now(),
                    }
                ],
            )
        store.upsert(
            "labels",
            [
                {
                    "run_id": run_a,
                    "layer": LAYER,
                    "feature": ONE_CATEGORY,
                    "labeler": "m",
                    "label": "helpful openers",
                    "status": "ok",
                    "created_at": now(),
                },
                {
                    "run_id": run_c,
                    "layer": LAYER,
                    "feature": ONE_CATEGORY,
                    "labeler": "m",
                    "label": "the word indeed",
                    "status": "ok",
                    "created_at": now(),
                },
            ],
        )
        audit_stage(store, run_c, [SPEC], against=run_a, decoders=None)  # never asked for decoders
        changes = store.con.execute(
            "SELECT change, feature, against_feature, match, details_json FROM audit_diffs WHERE run_id = ?", [run_c]
        ).fetchall()
        label = store.one(
            "SELECT label FROM audit_findings WHERE run_id = ? AND feature = ? LIMIT 1", [run_c, EVERY_TURN]
        )
    # Same flags in both runs; only a real label change counts (case and spacing do not).
    assert [(c, f, a, m) for c, f, a, m, _ in changes] == [("label_changed", ONE_CATEGORY, ONE_CATEGORY, "identity")]
    assert json.loads(changes[0][4]) == {"label": "the word indeed", "against_label": "helpful openers"}
    assert label == ("Assistant  politeness",)


def test_an_audit_scoped_to_one_category_flags_that_categorys_feature_and_not_the_everywhere_one(corpus, runs):
    run_a, _ = runs
    scoped = load_spec(DEFAULTS_DIR / "recipe_specificity.yaml").model_copy(
        update={"name": "help_specificity", "categories": ["help"]}
    )
    with Store(corpus[0]) as store:
        summary = audit_stage(store, run_a, [scoped])
        found = findings(store, run_a, scoped.name)
        wrong = scoped.model_copy(update={"categories": ["recipe"]})
        with pytest.raises(
            AutolabelError,
            match=r"no assistant turns in categories \['recipe'\].*'chit', 'code', "
            r"'help', 'travel'",
        ):
            audit_stage(store, run_a, [wrong])
    one = found[ONE_CATEGORY]  # every assistant turn of `help`, no other category's
    _, low, _, counts = one["assistant_turn_share"]
    assert counts["turns"] == 12 and counts["active_turns"] >= 11 and low >= 0.5  # 6 help chats x 2 turns
    lift, lift_low, _, other = one["lift_vs_other_categories"]
    assert other["other_active"] == 0 and other["other_tokens"] > 0 and other["categories"] == ["help"]
    assert lift_low >= 2 and one["flagged"] and "breadth" not in one
    every = found[EVERY_TURN]  # fires in help replies as often as in the others: not specific
    lift, lift_low, _, _ = every["lift_vs_other_categories"]
    assert every["assistant_turn_share"][1] >= 0.5 and 0.5 < lift < 2 and lift_low < 2 and not every["flagged"]
    assert [f["feature"] for f in summary.results[0].flagged] == [ONE_CATEGORY]


def test_the_audit_command_prints_a_scoped_audits_own_metrics(monkeypatch, capsys, corpus, runs, tmp_path):
    spec = yaml.safe_load((DEFAULTS_DIR / "recipe_specificity.yaml").read_text(encoding="utf-8"))
    path = tmp_path / "help.yaml"
    path.write_text(yaml.safe_dump(spec | {"name": "help_specificity", "categories": ["help"]}), encoding="utf-8")
    monkeypatch.setattr(summaries, "console", Console(width=250))  # one line per header, whatever the terminal
    traced = [
        {
            "run_id": runs[0],
            "layer": LAYER,
            "feature": ONE_CATEGORY,
            "prompt_index": i,
            "graph_id": f"g{i}",
            "share": share,
            "kept": True,
            "rank": 1,
        }
        for i, share in enumerate((0.2, 0.3))
    ]
    with Store(corpus[0]) as store:  # `autolabel graph --audit` traced the feature on two prompts
        store.upsert("feature_graphs", traced)
    try:
        code, out, err = run_cli(
            monkeypatch,
            capsys,
            "audit",
            "--store",
            str(corpus[0]),
            "--run",
            runs[0],
            "--spec",
            str(path),
            "--against",
            "none",
        )
    finally:
        with Store(corpus[0]) as store:
            store.con.execute("DELETE FROM feature_graphs")
    assert code == 0, err
    header = next(line for line in out.splitlines() if "layer/feature" in line)
    assert "lift vs other categories" in header and "breadth" not in header and "lift vs text" not in header
    row = next(line for line in out.splitlines() if f"│ 1/{ONE_CATEGORY} " in line)
    assert "influence share" in header and "0.25 (" in row and "1 of 4 features flagged" in out


def test_rerun_with_stricter_thresholds_replaces_the_findings(corpus, runs):
    run_a, _ = runs
    strict = SPEC.model_copy(update={"keep": 1, "flag": SPEC.flag | {"assistant_turn_share": 0.99}})
    with Store(corpus[0]) as store:
        audit_stage(store, run_a, [SPEC])
        audit_stage(store, run_a, [strict])
        kept = store.query(
            "SELECT DISTINCT feature, flagged FROM audit_findings WHERE run_id = ? AND audit = ? "
            "AND section = 'pervasive'",
            [run_a, SPEC.name],
        )[1]
    assert kept == [(EVERY_TURN, False)]  # no stale rows from the looser run


@pytest.mark.parametrize(
    "spec, error",
    [
        (
            "name: x\nkind: assistant_pervasiveness\nmetrics: [assistant_turn_share, loudness]\nflag: {}\n",
            "unknown metric(s) loudness",
        ),
        ("kind: assistant_pervasiveness\nflag: {breadth: 0.5}\n", "name: Field required"),
        ("name: x\nkind: assistant_pervasiveness\nflag: {breadth: 0.5}\ncolour: red\n", "colour: Extra inputs"),
        (
            "name: x\nkind: assistant_pervasiveness\nmetrics: [breadth]\nflag: {lift_vs_user: 2}\n",
            "flag names lift_vs_user, which `metrics` does not list",
        ),
        (
            "name: x\nkind: assistant_pervasiveness\nmetrics: [lift_vs_other_categories]\nflag: {}\n",
            "lift_vs_other_categories compares `categories` with the rest",
        ),
        (
            "name: x\nkind: assistant_pervasiveness\ncategories: [help]\nflag: {breadth: 0.5}\n",
            "metric breadth counts categories",
        ),
    ],
)
def test_bad_specs_name_the_field_and_exit_2(monkeypatch, capsys, corpus, runs, tmp_path, spec, error):
    path = tmp_path / "bad.yaml"
    path.write_text(spec, encoding="utf-8")
    before = Store(corpus[0], read_only=True)
    count = before.one("SELECT count(*) FROM audit_findings")[0]
    before.close()
    code, _, err = run_cli(monkeypatch, capsys, "audit", "--store", str(corpus[0]), "--spec", str(path))
    assert code == 2 and str(path) in err and error in err
    with Store(corpus[0], read_only=True) as store:
        assert store.one("SELECT count(*) FROM audit_findings")[0] == count


def test_findings_carry_the_ablation_effect_and_say_when_it_is_only_correlational():
    import json

    from autolabel.audit.stage import causal_rows
    from autolabel.intervene.evidence import CAUSAL_KL, Effect, mean_interval

    finding = {
        "run_id": "r",
        "audit": "a",
        "metric": "assistant_turn_share",
        "value": 0.9,
        "ci_low": 0.8,
        "ci_high": 0.95,
        "flagged": True,
        "section": "pervasive",
        "rank": 1,
        "group_name": None,
        "label": "x",
        "details_json": "{}",
    }
    findings = [finding | {"layer": 1, "feature": f} for f in (1, 2, 3, 4)]
    findings += [findings[0] | {"metric": "breadth"}]  # a second metric of feature 1: one ablation row still
    effects = {
        (1, 1): mean_interval([0.5, 0.7, 0.6]),  # clearly above zero
        (1, 2): mean_interval([0.0, 0.0, 0.0]),  # ablation changed nothing
        (1, 3): Effect(0.4, None, None, 1),
    }  # one prompt: no interval, so not shown causal
    rows = causal_rows(findings, effects)
    by_feature = {row["feature"]: row for row in rows}
    assert sorted(by_feature) == [1, 2, 3] and all(row["metric"] == "ablation_kl" for row in rows)
    assert [json.loads(by_feature[f]["details_json"])["causal"] for f in (1, 2, 3)] == [True, False, False]
    one = by_feature[1]
    assert one["ci_low"] > CAUSAL_KL and one["ci_low"] <= one["value"] == 0.6 <= one["ci_high"]
    assert (one["rank"], one["flagged"], one["label"]) == (1, True, "x")  # the finding's own ranking travels along
