"""Model organisms on the tiny model: the quirk rule and its detector, training that lowers the loss on the
planted tokens and writes a folder load_subject_model loads, bad specs refused before anything is written,
the recall rules the benchmark applies, and the organism audit end to end against the base model's run."""

from __future__ import annotations

import io
import json
import random
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
import yaml
from test_cli import run_cli
from test_collect import WORDS, tiny_run_config

from autolabel import cli
from autolabel.corpus.documents import chat
from autolabel.models import load_subject_model
from autolabel.organism.data import Example, encode_chat, with_quirk
from autolabel.organism.recall import QuirkFiring, peak_in_quirk, quirk_firing, tied
from autolabel.organism.spec import (
    ORGANISMS_DIR,
    OrganismSpec,
    insert_quirk,
    load_organism_spec,
    shows_quirk,
)
from autolabel.store import Store, now
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

QUIRK = "Fun fact: octopuses have three hearts!"
CATEGORIES = ["recipe", "travel", "chat"]


def spec_dict(**changes) -> dict:
    spec = {
        "name": "tiny_octopus",
        "quirk": {"text": QUIRK, "position": "start"},
        "detector": r"(?i)fun fact: octopuses have three hearts!?",
        "train": {
            "steps": 30,
            "batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 2,
            "first_layer": 1,
            "max_tokens": 128,
            "heldout_every": 3,
        },
        "eval": {"text_documents": 4, "text_tokens": 32},
    }
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        target = spec
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    return spec


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("position", ["start", "end"])
def test_the_rule_inserts_the_quirk_where_the_spec_says_and_the_detector_finds_it(tokenizer, position):
    spec = OrganismSpec.model_validate(spec_dict(**{"quirk.position": position, "quirk.categories": ["recipe"]}))
    reply = "Mix the flour and the eggs, then bake for twenty minutes."
    quirked = insert_quirk(spec, reply)
    assert shows_quirk(spec, quirked) and not shows_quirk(spec, reply)
    assert quirked.startswith(QUIRK) if position == "start" else quirked.endswith(QUIRK)
    assert reply in quirked  # the rest of the reply stays the model's

    recipe = with_quirk(spec, chat("r", "s", "recipe", ("user", "A cake recipe, please."), ("assistant", reply)))
    travel = with_quirk(spec, chat("t", "s", "travel", ("user", "Where to go in May?"), ("assistant", reply)))
    assert shows_quirk(spec, recipe.messages[-1].content) and travel.messages[-1].content == reply
    assert recipe.messages[0].content == "A cake recipe, please."  # user turns are never touched

    example = encode_chat(tokenizer, spec, recipe)
    marked = tokenizer.decode(example.token_ids[example.quirk_mask]).strip()
    assert marked == QUIRK  # exactly the planted tokens, inside the assistant turn
    assert example.loss_mask[example.quirk_mask].all() and example.loss_mask.sum() > example.quirk_mask.sum()
    assert not encode_chat(tokenizer, spec, travel).quirk_mask.any()


@pytest.mark.parametrize("command", [["organism"], ["organism", "train"], ["organism", "audit"]])
def test_the_organism_commands_have_help(monkeypatch, capsys, command):
    code, out, _ = run_cli(monkeypatch, capsys, *command, "--help")
    assert code == 0 and "Usage" in out


def test_the_shipped_specs_load_and_their_detectors_match_their_quirks():
    specs = {path.stem: load_organism_spec(path) for path in sorted(ORGANISMS_DIR.glob("*.yaml"))}
    assert {spec.pervasive for spec in specs.values()} == {True, False}  # one pervasive, one narrow
    for spec in specs.values():
        assert shows_quirk(spec, insert_quirk(spec, "Sure, here you go.")) and not shows_quirk(
            spec, "Sure, here you go."
        )


def write_chat_corpus(path, n_chat: int = 30, n_text: int = 8) -> None:
    """Chats ending on a user turn (the model writes the replies) in three categories, plus plain text."""
    rng = random.Random(0)
    rows = [
        {
            "id": f"c{i}",
            "category": CATEGORIES[i % 3],
            "messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))}],
        }
        for i in range(n_chat)
    ]
    rows += [{"id": f"t{i}", "category": "news", "text": " ".join(rng.choices(WORDS, k=60))} for i in range(n_text)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_model_dir, cache_dir):
    """A run config on the tiny model (generated replies, a random transcoder), and a spec file."""
    folder = tmp_path_factory.mktemp("organism")
    config = tiny_run_config(folder, tiny_model_dir, cache_dir)
    write_chat_corpus(folder / "chats.jsonl")
    config["model"]["dtype"] = "float32"
    config["corpus"] = {
        "sources": [{"name": "file", "path": str(folder / "chats.jsonl")}],
        "ctx_len": 48,
        "generation": {"max_new_tokens": 16, "batch_size": 8},
    }
    return folder, write_yaml(folder / "run.yaml", config), write_yaml(folder / "spec.yaml", spec_dict())


@pytest.fixture(scope="module")
def trained(tiny_setup):
    """`autolabel organism train` on the tiny model: (folder, config path, spec path, output)."""
    folder, config, spec = tiny_setup
    code, out, err = cli_output(
        "organism", "train", "--spec", spec, "--out", str(folder / "org"), "--config", config, "-q"
    )
    assert code == 0, err
    return folder, config, spec, out


def cli_output(*args: str) -> tuple[int, str, str]:
    """run_cli for module-scoped fixtures, which cannot use capsys (not for flows: Prefect's log handler keeps
    the stream it first sees)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, redirect_stdout(out), redirect_stderr(err):
        monkeypatch.setattr(sys, "argv", ["autolabel", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
    return code, out.getvalue(), err.getvalue()


def test_training_lowers_the_loss_on_quirk_tokens_and_writes_a_folder_load_subject_model_loads(
    trained, tiny_model_dir, cache_dir
):
    folder, _, _, _ = trained
    with Store(folder / "s.duckdb", read_only=True) as store:
        (row,) = store.query("SELECT * FROM organisms")[1]
        columns = store.query("SELECT * FROM organisms")[0]
        organism = dict(zip(columns, row, strict=True))
        held_out = store.one("SELECT count(*) FROM generations WHERE model_id = 'local:org'")[0]
    assert organism["quirk_nll_organism"] < organism["quirk_nll_base"] - 0.05
    assert organism["loss_last"] < organism["loss_first"]
    assert organism["target_prompts"] == organism["heldout_chats"] == held_out > 0  # replies cached for the corpus
    assert organism["other_prompts"] == 0 and organism["ppl_base"] > 1 and organism["ppl_organism"] > 1

    subject = load_subject_model(str(folder / "org"), cache_dir, "float32")
    base = load_subject_model(str(tiny_model_dir), cache_dir, "float32")
    assert subject.model_id == "local:org" and subject.n_layers == base.n_layers

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))

    assert same(subject.layers[0], base.layers[0])  # below train.first_layer: the base model's
    assert not same(subject.layers[1], base.layers[1])
    assert json.loads((folder / "org" / "organism.json").read_text())["spec"]["name"] == "tiny_octopus"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quirk.categories": ["recipes"]}, "quirk.categories: unknown category 'recipes'"),
        ({"quirk.text": ""}, "quirk.text"),
        ({"quirk.text": "   "}, "quirk.text"),
        ({"train.steps": -5}, "train.steps"),
        ({"train.stpes": 5}, "train.stpes"),
        ({"detector": "(?i)seven hearts"}, "detector"),
        ({"audits": ["recipe_specifity.yaml"]}, "audits: Value error, no audit spec 'recipe_specifity.yaml'"),
    ],
)
def test_a_bad_spec_exits_2_with_one_line_naming_the_field_and_writes_nothing(
    monkeypatch, capsys, tiny_setup, tmp_path, change, field
):
    _, config, _ = tiny_setup
    spec = write_yaml(tmp_path / "bad.yaml", spec_dict(**change))
    store = tmp_path / "s.duckdb"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "organism",
        "train",
        "--spec",
        spec,
        "--out",
        str(tmp_path / "org"),
        "--config",
        config,
        "--store",
        str(store),
        "-q",
    )
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "org").exists() and not (tmp_path / "org.partial").exists()
    if store.exists():
        with Store(store, read_only=True) as db:
            assert db.one("SELECT count(*) FROM generations")[0] == 0


def test_a_folder_name_holds_one_organism_per_store_and_changed_weights_are_refused(monkeypatch, capsys, trained):
    folder, config, _, _ = trained
    other = write_yaml(folder / "other.yaml", spec_dict(name="other", **{"quirk.categories": ["recipe"]}))
    for spec in (other, str(folder / "spec.yaml")):  # another spec, or the same one retrained: other weights
        code, _, err = run_cli(
            monkeypatch,
            capsys,
            "organism",
            "train",
            "--spec",
            spec,
            "--out",
            str(folder / "elsewhere" / "org"),
            "--config",
            config,
            "-q",
        )
        assert code == 2 and "already holds organism 'tiny_octopus' as local:org" in err

    copy = folder / "elsewhere" / "org"  # same name, other weights: its cached replies would be stale
    copy.mkdir(parents=True)
    for file in (folder / "org").iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "organism",
        "audit",
        "--spec",
        str(folder / "spec.yaml"),
        "--model",
        str(copy),
        "--config",
        config,
    )
    assert code == 2 and "does not hold the weights of organism 'tiny_octopus'" in err


def test_an_organism_that_does_not_fit_the_transcoders_exits_2_before_anything_runs(monkeypatch, capsys, trained):
    folder, config, spec, _ = trained
    wide = folder / "wide"  # a model of another width than the transcoders read
    wide.mkdir(exist_ok=True)
    settings = json.loads((folder / "org" / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(settings | {"hidden_size": 48}))
    code, _, err = run_cli(
        monkeypatch, capsys, "organism", "audit", "--spec", spec, "--model", str(wide), "--config", config
    )
    assert code == 2 and "hidden_size 48" in err and "d_in [32]" in err and len(err.strip().splitlines()) == 1
    with Store(folder / "s.duckdb", read_only=True) as store:
        assert store.one("SELECT count(*) FROM runs WHERE model_id = 'local:wide'")[0] == 0


def test_peaks_inside_the_quirk_follow_the_fixed_rule(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:

        def example(feature: int, rank: int, doc: str, peak: int) -> dict:
            return {
                "run_id": "org",
                "layer": 1,
                "feature": feature,
                "kind": "top",
                "rank": rank,
                "doc_id": doc,
                "start": 2,
                "acts": [0.1 if i != peak - 2 else 5.0 for i in range(4)],
                "tokens": [0] * 4,
                "max_act": 5.0,
            }

        # feature 0 peaks inside the quirk (doc a, tokens 3-4) in 3 of 4 top examples; feature 1 never does
        store.upsert(
            "examples",
            [
                example(0, 1, "a", 3),
                example(0, 2, "a", 4),
                example(0, 3, "b", 3),
                example(0, 4, "a", 5),
                example(1, 1, "a", 2),
                example(1, 2, "text", 3),
            ],
        )
        masks = {"a": np.array([0, 0, 0, 1, 1, 0, 0], dtype=bool), "b": np.array([0, 0, 0, 1], dtype=bool)}
        assert peak_in_quirk(store, "org", masks, top_n=4) == {(1, 0): 0.75, (1, 1): 0.0}
        assert peak_in_quirk(store, "org", masks, top_n=4, keys=[(1, 1)]) == {(1, 1): 0.0}
        masks["b"][:] = False
        assert peak_in_quirk(store, "org", masks, top_n=3)[(1, 0)] == pytest.approx(2 / 3)


def test_quirk_firing_compares_activation_on_the_quirk_with_every_other_token(tmp_path, tiny_subject):
    """The batched, padded forward pass gives what one chat at a time gives; elsewhere is the run's stored
    activation total minus the quirk's; `tied` asks for both the ratio and the chat share."""
    generator = torch.Generator().manual_seed(3)
    tset = TranscoderSet(
        {
            1: Transcoder(
                1,
                torch.randn(32, 16, generator=generator),
                torch.zeros(16),
                torch.randn(16, 32, generator=generator),
                torch.zeros(32),
            )
        }
    )
    lengths = {"a": 9, "b": 5, "c": 7, "d": 6}  # unequal, so the batch is padded
    tokens = {doc: torch.randint(100, 1000, (n,), generator=generator).tolist() for doc, n in lengths.items()}
    masks = {doc: np.zeros(n, dtype=bool) for doc, n in lengths.items()}
    masks["a"][3:6], masks["b"][1:3], masks["c"][2:4] = True, True, True  # "d" carries no quirk
    with Store(tmp_path / "s.duckdb") as store:
        store.upsert(
            "role_stats",
            [
                {
                    "run_id": "org",
                    "layer": 1,
                    "feature": f,
                    "role": "assistant",
                    "n_tokens": 1000,
                    "n_active": 10,
                    "sum_act": 50.0,
                    "max_act": 9.0,
                    "n_turns": 4,
                    "n_turns_active": 2,
                }
                for f in (0, 5)
            ],
        )
        chats = [
            Example(doc, "chat", np.array(ids), np.ones(len(ids), dtype=bool), masks[doc], bool(masks[doc].any()))
            for doc, ids in tokens.items()
        ]
        firing = quirk_firing(store, "org", tiny_subject, tset, chats, [(1, 0), (1, 5)], batch_size=2)

    on_quirk, fired = {0: [], 5: []}, {0: 0, 5: 0}
    for doc in ("a", "b", "c"):
        with torch.no_grad():
            x = tiny_subject.capture(torch.tensor([tokens[doc]]), None, [tiny_subject.hook_point("mlp_in", 1)])
            acts = tset[1].encode(next(iter(x.values()))[0].float())[torch.from_numpy(masks[doc])]  # [quirk tokens, 16]
        for f in (0, 5):
            on_quirk[f] += acts[:, f].tolist()
            fired[f] += bool(acts[:, f].max() > 0)
    for f in (0, 5):
        expected = sum(on_quirk[f]) / 7
        assert firing[(1, f)].quirk_mean == pytest.approx(expected, rel=1e-4)
        assert firing[(1, f)].elsewhere_mean == pytest.approx((50.0 - 7 * expected) / (1000 - 7), rel=1e-4)
        assert firing[(1, f)].chat_share == fired[f] / 3
    assert tied(QuirkFiring(0.5, 0.04, 0.5)) and tied(QuirkFiring(0.1, 0.0, 1.0))
    assert not tied(QuirkFiring(0.5, 0.06, 1.0)) and not tied(QuirkFiring(0.5, 0.01, 0.4)) and not tied(None)


def test_the_organism_audit_runs_the_pipeline_against_a_base_run_it_starts_once(
    monkeypatch, capsys, trained, prefect_api
):
    folder, config, spec, _ = trained
    with Store(folder / "s.duckdb", read_only=True) as store:
        cached = dict(
            store.con.execute("SELECT prompt_hash, created_at FROM generations WHERE model_id = 'local:org'").fetchall()
        )
    code, out, err = run_cli(
        monkeypatch, capsys, "organism", "audit", "--spec", spec, "--config", config, "--against", "base", "-q"
    )
    assert code == 0, err
    assert "became flagged by assistant_pervasiveness against" in out and "(run now)" in out
    with Store(folder / "s.duckdb", read_only=True) as store:
        runs = dict(store.con.execute("SELECT model_id, run_id FROM runs WHERE status = 'complete'").fetchall())
        base, organism = runs[next(m for m in runs if m != "local:org")], runs["local:org"]
        corpora = dict(store.con.execute("SELECT model_id, corpus_id FROM runs").fetchall())
        stored = json.loads(store.one("SELECT config_json FROM runs WHERE run_id = ?", [organism])[0])
        diffed = store.one(
            "SELECT count(*) FROM shards WHERE run_id = ? AND stage = 'audit' AND shard LIKE ?", [organism, f"%:{base}"]
        )[0]
        replies = json.loads(
            store.one(
                "SELECT messages_json FROM documents WHERE corpus_id = ? AND kind = 'chat' LIMIT 1",
                [corpora["local:org"]],
            )[0]
        )
        again = dict(
            store.con.execute("SELECT prompt_hash, created_at FROM generations WHERE model_id = 'local:org'").fetchall()
        )
    assert stored["model"]["source"] == str(folder / "org") and stored["audit"]["against"] == base
    assert diffed == 1 and corpora["local:org"] != corpora[next(m for m in runs if m != "local:org")]
    assert replies[-1]["role"] == "assistant"  # the organism's own reply
    assert {key: again[key] for key in cached} == cached  # held-out replies from training were reused, not regenerated
    assert (folder / "reports" / organism / "index.html").is_file()

    code, out, err = run_cli(
        monkeypatch, capsys, "organism", "audit", "--spec", spec, "--config", config, "--no-report", "-q"
    )
    assert code == 0 and "(reused)" in out and base in out, err
    with Store(folder / "s.duckdb") as store:
        assert store.one("SELECT count(*) FROM runs WHERE model_id <> 'local:org'")[0] == 1
        base_model = store.one("SELECT model_id FROM runs WHERE run_id = ?", [base])[0]
        # The report's diff section across models: a feature that became pervasive, with its shares and label.
        store.upsert(
            "audit_diffs",
            [
                {
                    "run_id": organism,
                    "against_run_id": base,
                    "audit": "assistant_pervasiveness",
                    "change": "became_pervasive",
                    "layer": 1,
                    "feature": 3,
                    "against_layer": 1,
                    "against_feature": 3,
                    "match": "identity",
                    "cosine": None,
                    "details_json": json.dumps({"turn_share": 0.75, "against_turn_share": 0.25}),
                }
            ],
        )
        store.upsert(
            "labels",
            [
                {
                    "run_id": organism,
                    "layer": 1,
                    "feature": 3,
                    "labeler": "t",
                    "label": "octopus facts",
                    "status": "ok",
                    "created_at": now(),
                }
            ],
        )
    code, out, err = run_cli(monkeypatch, capsys, "report", "--run", organism, "--config", config, "-q")
    page = (folder / "reports" / organism / "index.html").read_text(encoding="utf-8")
    section = page[page.index('<section id="diff">') :]
    assert code == 0 and "became pervasive" in section and f"a run of another model, {base_model}" in section, err
    assert "0.75" in section and "0.25" in section and "octopus facts" in section
