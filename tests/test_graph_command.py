"""Attribution graphs stored, reused, exported and asked for: the stage's tables, a chat's roles,
circuit-tracer's JSON with the run's labels, the command and its bad input (exit 2, nothing written), and
`--feature` / `--audit`: a feature's influence share where it fires most."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from graph_setup import N_LAYERS, TEXT, D, F, labeled_run, one_thread, per_layer_set, tiny_subjects
from test_cli import run_cli

from autolabel.config import GraphConfig, ModelConfig, RunConfig, TranscoderConfig
from autolabel.graph import graph_stage
from autolabel.graph.evidence import influence_rows, influence_shares
from autolabel.graph.export import circuit_tracer_graph, feature_labels
from autolabel.graph.feature import check_prompts, feature_graph_stage
from autolabel.graph.prompts import chat_prompt, read_chat, text_prompt
from autolabel.models import SubjectModel
from autolabel.store import Store
from autolabel.transcoders.formats import save_circuit_tracer
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def subjects(tokenizer) -> dict[str, SubjectModel]:
    return tiny_subjects(tokenizer)


# -- stage, store, export ------------------------------------------------------------------------


def test_stage_stores_the_graph_once_and_reads_it_back(subjects, tmp_path):
    subject, tset = subjects["llama"], per_layer_set()
    prompt = text_prompt(subject.tokenizer, TEXT)
    settings = GraphConfig(max_logits=4, logit_mass=0.99, node_threshold=0.9, batch_size=8)
    with Store(tmp_path / "s.duckdb") as store:
        first = graph_stage(store, subject, tset, "tc-x", prompt, settings)
        again = graph_stage(store, subject, tset, "tc-x", prompt, settings)
        nodes = store.dicts("SELECT * FROM graph_nodes WHERE graph_id = ?", [first.graph_id])
        edges = store.dicts("SELECT * FROM graph_edges WHERE graph_id = ?", [first.graph_id])
        graph = store.dicts("SELECT * FROM graphs")
        shards = store.rows("SELECT count(*) FROM shards WHERE stage = 'graph'")[0][0]
    n_pos = len(prompt.token_ids)
    kinds = {kind: sum(n["kind"] == kind for n in nodes) for kind in ("feature", "error", "embedding", "logit")}
    assert kinds == {"feature": first.n_features, "error": N_LAYERS * n_pos, "embedding": n_pos, "logit": 4}
    assert not first.reused and again.reused and again.graph_id == first.graph_id and shards == 1 and len(graph) == 1
    assert graph[0]["tokens"] == prompt.token_ids and graph[0]["run_id"] is None and graph[0]["transcoder_id"] == "tc-x"
    kept = {n["node_id"] for n in nodes if n["kept"]}
    assert len(edges) == first.kept_edges > 0 and all(e["source"] in kept and e["target"] in kept for e in edges)
    assert all(n["kept"] for n in nodes if n["kind"] in ("embedding", "logit"))
    assert 0 < first.kept_features < first.n_features and again.kept_features == first.kept_features


def test_a_chat_keeps_its_roles_and_opens_the_assistant_turn(subjects, tmp_path):
    subject, tset = subjects["llama"], per_layer_set()
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Is the sky blue?"}]}))
    prompt = chat_prompt(subject.tokenizer, read_chat(path))
    assert prompt.text.endswith("<|im_start|>assistant\n") and prompt.roles[-1] == "template"
    assert "user" in prompt.roles and "system" in prompt.roles  # SmolLM2's template injects a system prompt
    with Store(tmp_path / "s.duckdb") as store:
        summary = graph_stage(store, subject, tset, "tc-x", prompt, GraphConfig(batch_size=64))
        (roles,) = store.rows("SELECT roles FROM graphs")[0]
        first = store.rows("SELECT count(*) FROM graph_nodes WHERE kind = 'feature' AND position = 0")[0][0]
    assert roles == prompt.roles and summary.n_tokens == len(prompt.token_ids)
    assert first == 0  # <|im_start|> is a special token: its features are left to the error nodes


def test_export_is_a_circuit_tracer_graph_with_labels_on_the_features(subjects, tmp_path):
    subject, tset = subjects["llama"], per_layer_set()
    path = tmp_path / "s.duckdb"
    run_id = labeled_run(path, RunConfig(), tset)
    with Store(path) as store:
        summary = graph_stage(store, subject, tset, "tc-x", text_prompt(subject.tokenizer, TEXT), GraphConfig(), run_id)
        labels = feature_labels(store, run_id)
        exported = json.loads(json.dumps(circuit_tracer_graph(store, summary.graph_id, subject.tokenizer, labels)))
    assert labels[(1, 3)] == {"label": "feature 1:3", "score": 0.5, "unreliable": True}
    assert set(exported) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold"} <= set(exported["metadata"])
    assert exported["metadata"]["slug"] == summary.graph_id and exported["metadata"]["prompt"] == TEXT
    assert set(exported["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    required = {
        "node_id",
        "feature",
        "layer",
        "ctx_idx",
        "feature_type",
        "jsNodeId",
        "clerp",
        "influence",
        "activation",
        "token_prob",
        "is_target_logit",
        "run_idx",
        "reverse_ctx_idx",
    }
    nodes = {node["node_id"]: node for node in exported["nodes"]}
    assert len(nodes) == len(exported["nodes"]) and all(required <= set(node) for node in nodes.values())
    types = {node["feature_type"] for node in nodes.values()}
    assert types <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert {"cross layer transcoder", "embedding", "logit"} <= types
    errors = [node["jsNodeId"] for node in nodes.values() if node["feature_type"] == "mlp reconstruction error"]
    assert errors and len(set(errors)) == len(errors)  # one error node per (layer, position)
    assert sum(node["is_target_logit"] for node in nodes.values()) == 1
    for node in nodes.values():
        assert isinstance(node["layer"], str) and 0 <= node["influence"] <= 1 + 1e-9
        if node["feature_type"] == "cross layer transcoder":
            layer, feature, _ = node["node_id"].split("_")
            assert node["clerp"] == f"feature {layer}:{feature}"
    assert exported["links"] and all(link["source"] in nodes and link["target"] in nodes for link in exported["links"])
    assert {"source", "target", "weight"} == set(exported["links"][0])


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture
def cli_setup(tmp_path, tiny_model_dir, cache_dir):
    folder = tmp_path / "transcoders"
    save_circuit_tracer(per_layer_set(), folder, "tiny")
    config = RunConfig(
        cache_dir=str(cache_dir),
        model=ModelConfig(source=str(tiny_model_dir), dtype="float32"),
        transcoder=TranscoderConfig(source=str(folder)),
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return config, config_path, tmp_path / "s.duckdb"


def test_cli_labels_the_top_nodes_with_the_runs_labels_and_writes_json(monkeypatch, capsys, cli_setup, tmp_path):
    config, config_path, store = cli_setup
    run_id = labeled_run(store, config, per_layer_set())
    out_json = tmp_path / "out" / "graph.json"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "graph",
        TEXT,
        "--store",
        str(store),
        "--run",
        run_id,
        "--max-logits",
        "3",
        "--json",
        str(out_json),
    )
    assert code == 0, err
    text = " ".join(out.split())
    assert "feature 1:" in text or "feature 2:" in text
    assert "0.50 unreliable" in text or "feature 2:" in text
    assert json.loads(out_json.read_text())["metadata"]["prompt"] == TEXT
    with Store(store) as db:
        assert db.rows(
            "SELECT run_id, count(*) FILTER (kind = 'logit') FROM graphs JOIN graph_nodes USING (graph_id) GROUP BY ALL"
        ) == [(run_id, 3)]


def foreign_transcoders(folder) -> str:
    """Transcoders for a model with d_model 48 at layers 1 and 2."""
    transcoders = {
        layer: Transcoder(layer, torch.randn(48, F), torch.zeros(F), torch.randn(F, 48), torch.zeros(48))
        for layer in (1, 2)
    }
    save_circuit_tracer(TranscoderSet(transcoders), folder, "another")
    return str(folder)


def write(path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    "case,message",
    [
        ("empty", "the prompt is empty"),
        ("long", "over the model's context of 512"),
        ("foreign", "made for another model"),
        ("not-a-chat", "is not a chat"),
        ("bad-roles", "has role 'robot'"),
        ("not-json", "is not valid UTF-8 JSON"),
        ("both", "pass either a PROMPT or --chat FILE"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(monkeypatch, capsys, cli_setup, tmp_path, case, message):
    _, config_path, store = cli_setup
    args = {
        "empty": ["  "],
        "long": [" word" * 600],
        "foreign": [
            TEXT,
            "--config",
            write(
                tmp_path / "c.yaml",
                yaml.safe_load(config_path.read_text())
                | {"transcoder": {"source": foreign_transcoders(tmp_path / "foreign")}},
            ),
        ],
        "not-a-chat": ["--chat", write(tmp_path / "text.json", {"text": "hello"})],
        "bad-roles": ["--chat", write(tmp_path / "robot.json", [{"role": "robot", "content": "hi"}])],
        "not-json": ["--chat", write(tmp_path / "broken.json", "[{role: user}")],
        "both": [TEXT, "--chat", write(tmp_path / "chat.json", [{"role": "user", "content": "hi"}])],
    }[case]
    if "--config" not in args:
        args += ["--config", str(config_path)]
    code, _, err = run_cli(monkeypatch, capsys, "graph", *args, "--store", str(store))
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    assert not store.exists()


# -- audit hooks: a feature's influence share where it fires most -----------------------------------

PLANTED, DEAD, TARGET = (2, 5), (1, 7), 1234


@pytest.fixture(scope="module")
def planted(tokenizer) -> tuple[SubjectModel, TranscoderSet]:
    """A tiny Llama whose layer-2 MLP is one ReLU unit pushing hard toward token TARGET, and per_layer_set with
    that unit as its feature 2:5 (so the feature is the model's own mechanism, not cancelled by an error node)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        hidden_act="relu",
        mlp_bias=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    unembedding = model.get_output_embeddings().weight.detach()
    push = unembedding[TARGET] - unembedding.mean(0)
    push = 20 * push / push.norm()
    w = torch.randn(D, generator=torch.Generator().manual_seed(2)) / D**0.5
    tset = per_layer_set()
    mlp, transcoder = model.model.layers[2].mlp, tset[2]
    with torch.no_grad():
        for parameter in mlp.parameters():
            parameter.zero_()
        mlp.gate_proj.weight[0], mlp.gate_proj.bias[0], mlp.up_proj.bias[0], mlp.down_proj.weight[:, 0] = (
            w,
            4.0,
            1.0,
            push,
        )
        transcoder.W_enc[:, 5], transcoder.W_dec[5] = w, push
        transcoder.b_enc[5] = 4.0 + transcoder.b_in @ w  # the transcoder subtracts b_in from its input first
    return SubjectModel(model, tokenizer, "tiny-planted"), tset


def feature_store(path, config: RunConfig, tset: TranscoderSet, ids: list[int]) -> str:
    """A labeled run: 2:5 has two top examples (peaks at position 5 and at the end) and the `assistant` audit
    flagged it; 1:7 is dead; every other feature is active without examples."""
    run_id = labeled_run(path, config, tset)
    peaks = [5, len(ids) - 1]
    with Store(path) as store:
        store.upsert(
            "features",
            [
                {
                    "run_id": run_id,
                    "layer": layer,
                    "feature": f,
                    "n_tokens": 100,
                    "n_active": 0 if (layer, f) == DEAD else 10,
                    "max_act": 0.0 if (layer, f) == DEAD else 5.0,
                    "status": "dead" if (layer, f) == DEAD else "active",
                }
                for layer in tset.layers
                for f in range(F)
            ],
        )
        store.upsert(
            "examples",
            [
                {
                    "run_id": run_id,
                    "layer": 2,
                    "feature": 5,
                    "kind": "top",
                    "rank": rank,
                    "doc_id": f"doc-{rank}",
                    "role": "text",
                    "start": 0,
                    "tokens": ids,
                    "acts": [5.0 if i == peak else 1.0 for i in range(len(ids))],
                    "max_act": 5.0,
                }
                for rank, peak in enumerate(peaks)
            ],
        )
        store.upsert(
            "audit_findings",
            [
                {
                    "run_id": run_id,
                    "audit": "assistant",
                    "layer": 2,
                    "feature": 5,
                    "metric": "breadth",
                    "value": 0.5,
                    "flagged": True,
                    "section": "pervasive",
                    "rank": 1,
                }
            ],
        )
    return run_id


def test_a_feature_planted_to_drive_the_output_has_a_high_influence_share(planted, tmp_path):
    subject, planted_tset = planted
    ids = subject.tokenizer(TEXT)["input_ids"]
    path = tmp_path / "s.duckdb"
    run_id = feature_store(path, RunConfig(), planted_tset, ids)
    settings = GraphConfig(batch_size=64)
    with Store(path) as store:
        prompts = check_prompts(store, run_id, [PLANTED], 2, flagged={PLANTED})
        plain = feature_graph_stage(store, subject, per_layer_set(), "tc-plain", run_id, prompts, settings)
        planted = feature_graph_stage(store, subject, planted_tset, "tc-planted", run_id, prompts, settings)
        stored = store.dicts(
            "SELECT f.*, g.tokens FROM feature_graphs f JOIN graphs g USING (graph_id) ORDER BY prompt_index"
        )
        top = store.rows(
            "SELECT DISTINCT arg_max(token_id, probability) FROM graph_nodes WHERE kind = 'logit' AND "
            "list_contains(?, graph_id) GROUP BY graph_id",
            [[row["graph_id"] for row in planted]],
        )
        findings = store.dicts("SELECT * FROM audit_findings ORDER BY metric")
        again = influence_rows(findings[:1], influence_shares(store, run_id))
    # The prompts are the top examples cut after their peak, so each graph explains the token after the peak.
    assert [len(p.token_ids) for p in prompts[PLANTED]] == [6, len(ids)]
    assert [row["tokens"] for row in stored] == [ids[:6], ids]
    assert top == [(TARGET,)]
    for row in planted:  # the planted feature carries most of the influence on the output, and pruning keeps it
        assert row["share"] > 0.5 and row["rank"] == 1 and row["kept"] and row["activation"] > 3
    assert all(row["share"] < 0.1 for row in plain)  # another transcoder's feature 2:5 is no driver
    assert [row["share"] for row in stored] == [row["share"] for row in planted]  # the later rows replace the first
    # Beside the audit's finding, an influence_share finding: the mean share over the prompts, flagged as it is;
    # an audit run later computes the same row from feature_graphs.
    breadth, share = findings
    mean = sum(row["share"] for row in planted) / 2
    assert share["metric"] == "influence_share" and share["audit"] == "assistant" and share["flagged"]
    assert share["value"] == pytest.approx(mean) and json.loads(share["details_json"]) == {"prompts": 2, "kept": 2}
    assert share["ci_low"] <= mean <= share["ci_high"] <= 1
    assert breadth["metric"] == "breadth" and len(again) == 1 and again[0]["value"] == pytest.approx(mean)


@pytest.fixture
def feature_cli(cli_setup, tokenizer):
    """cli_setup's config and store, with a run whose features have top examples."""
    config, config_path, store = cli_setup
    run_id = feature_store(store, config, per_layer_set(), tokenizer(TEXT)["input_ids"])
    return ["--config", str(config_path), "--store", str(store), "--run", run_id], store


def test_cli_traces_an_audits_flagged_features_on_their_top_examples(monkeypatch, capsys, feature_cli):
    args, store = feature_cli
    code, out, err = run_cli(monkeypatch, capsys, "graph", "--audit", "assistant", "--prompts", "1", *args)
    assert code == 0, err
    text = " ".join(out.split())
    with Store(store) as db:
        ((share, kept, graph_id, n_tokens),) = db.rows(
            "SELECT share, kept, graph_id, len(tokens) FROM feature_graphs "
            "JOIN graphs USING (graph_id) WHERE (layer, feature) = (2, 5)"
        )
        findings = db.rows("SELECT audit, value FROM audit_findings WHERE metric = 'influence_share'")
    assert "L2:5" in text and "' mat'" in text and f" {share:.3f} " in text  # the peak token, the share
    assert n_tokens == 6 and graph_id.startswith("g-")
    assert findings == [("assistant", pytest.approx(share))]


@pytest.mark.parametrize(
    "feature,message",
    [
        ("1:7", "never fired in run"),
        ("3:1", "the run's transcoder has no layer 3 (it has 1, 2)"),
        ("2:99", "feature 2:99 does not exist in run"),
        ("2:6", "feature 2:6 has no top examples in run"),
        ("2-5", "--features must be comma-separated LAYER:FEATURE pairs"),
    ],
)
def test_graph_feature_bad_input_exits_2_and_writes_nothing(monkeypatch, capsys, feature_cli, feature, message):
    args, store = feature_cli
    counts = (
        "SELECT (SELECT count(*) FROM shards), (SELECT count(*) FROM graphs), (SELECT count(*) FROM audit_findings)"
    )
    with Store(store) as db:
        before = db.rows(counts)
    code, _, err = run_cli(monkeypatch, capsys, "graph", "--feature", feature, *args)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    with Store(store) as db:
        assert db.rows(counts) == before and db.rows("SELECT count(*) FROM feature_graphs") == [(0,)]
