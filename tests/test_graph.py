"""Attribution graphs on tiny random models with random transcoders: the replacement reproduces the model,
freezing makes it affine in its nodes (Llama, Qwen2, Gemma-2), attributions are complete and match removing
each source, pruning keeps what carries the influence, and graphs are stored, exported and refused as they
should be."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from browser import Chromium
from conftest import tiny_model
from test_cli import run_cli

from autolabel.config import GraphConfig, ModelConfig, ReportConfig, RunConfig, TranscoderConfig
from autolabel.graph import graph_stage
from autolabel.graph.attribute import attribute, salient_logits
from autolabel.graph.evidence import influence_rows, influence_shares
from autolabel.graph.export import circuit_tracer_graph, feature_labels
from autolabel.graph.feature import check_prompts, feature_graph_stage
from autolabel.graph.prompts import chat_prompt, read_chat, text_prompt
from autolabel.graph.prune import influence, prune
from autolabel.graph.replacement import layout, record, replay, unembed, without
from autolabel.models import SubjectModel
from autolabel.report.stage import report_stage
from autolabel.store import Store, now
from autolabel.transcoders.formats import save_circuit_tracer
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

D, F, N_LAYERS = 32, 16, 4
TEXT = "the cat sat on a mat while rain fell"
FAMILIES = ["llama", "qwen2", "gemma2"]


def per_layer_set(seed: int = 0) -> TranscoderSet:
    """ReLU skip transcoders at layers 1 and 2 (0 and 3 uncovered); layer 2 subtracts an input bias."""
    g = torch.Generator().manual_seed(seed)
    transcoders = {}
    for layer in (1, 2):
        transcoders[layer] = Transcoder(
            layer, torch.randn(D, F, generator=g) / D**0.5, 0.1 * torch.randn(F, generator=g),
            torch.randn(F, D, generator=g) / F**0.5, 0.1 * torch.randn(D, generator=g),
            W_skip=torch.randn(D, D, generator=g) / D, b_in=0.1 * torch.randn(D, generator=g) if layer == 2 else None)
    return TranscoderSet(transcoders)


def cross_layer_set(seed: int = 1) -> TranscoderSet:
    """Cross-layer transcoders read at layers 0 and 2: source 0's slots for 1 and 3 write uncovered layers."""
    g = torch.Generator().manual_seed(seed)
    transcoders = {}
    for layer in (0, 2):
        n_out = N_LAYERS - layer
        transcoders[layer] = Transcoder(
            layer, torch.randn(D, F, generator=g) / D**0.5, 0.1 * torch.randn(F, generator=g),
            torch.randn(F, n_out, D, generator=g) / F**0.5, 0.1 * torch.randn(n_out, D, generator=g),
            W_skip=torch.randn(D, D, generator=g) / D if layer == 2 else None)
    return TranscoderSet(transcoders)


SETS = {"per-layer": per_layer_set, "cross-layer": cross_layer_set}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine two threads wait on each other
    (a 9-token forward pass takes 1 s instead of 3 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def subjects(tokenizer) -> dict[str, SubjectModel]:
    return {family: SubjectModel(tiny_model(family, N_LAYERS), tokenizer, f"tiny-{family}") for family in FAMILIES}


def built(subject: SubjectModel, tset: TranscoderSet, text: str = TEXT):
    where = layout(subject, tset)
    ids = torch.tensor(subject.tokenizer(text)["input_ids"])
    return where, record(subject, tset, where, ids, first_features=True)


def logit_inputs(subject, tset, where, prompt, sources, targets) -> torch.Tensor:
    """[n_t] each target's logit minus the mean logit, in the frozen replacement driven by `sources`."""
    with torch.no_grad():
        return replay(subject, tset, where, prompt, sources).final[0, -1] @ targets.vectors.T


def pre_activations(subject, tset, where, prompt, sources, attribution) -> torch.Tensor:
    """[n_f] each feature node's pre-activation in the frozen replacement driven by `sources`."""
    with torch.no_grad():
        live = replay(subject, tset, where, prompt, sources).inputs
    features = attribution.features
    return torch.stack([tset[layer].pre_acts(live[layer][0, pos])[feature] for layer, pos, feature in
                        zip(features.layers.tolist(), features.positions.tolist(), features.features.tolist(), strict=True)])


# -- the replacement model -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_replacement_with_error_nodes_reproduces_the_models_logits(subjects, family, kind):
    subject, tset = subjects[family], SETS[kind]()
    where, prompt = built(subject, tset)
    with torch.no_grad():
        expected = subject.model(prompt.token_ids[None]).logits[0]  # the model's own attention implementation
        replayed = unembed(subject, replay(subject, tset, where, prompt, prompt.sources, batch=2).final)
    assert torch.allclose(replayed, expected.expand(2, -1, -1), atol=1e-4, rtol=1e-4)
    # The random transcoders miss most of each covered layer's output: the error nodes carry real weight.
    covered = tset.layers[-1]
    assert prompt.sources.errors[covered].norm() > 0.3 * prompt.outputs[covered].norm()


@pytest.mark.parametrize("family", FAMILIES)
def test_freezing_makes_the_replacement_affine_in_its_nodes(subjects, family):
    """With attention patterns and every norm scale frozen (Gemma-2's four norms per layer included), doubling
    every node's output doubles the logits' distance from the bias-only logits; any unfrozen norm or softmax
    would bend it."""
    subject, tset = subjects[family], per_layer_set()
    where, prompt = built(subject, tset)
    doubled = prompt.sources.zeroed()
    doubled.embeddings += 2 * prompt.sources.embeddings
    doubled.errors += 2 * prompt.sources.errors
    for layer, acts in prompt.sources.acts.items():
        doubled.acts[layer] += 2 * acts

    def logits(sources) -> torch.Tensor:
        with torch.no_grad():
            return replay(subject, tset, where, prompt, sources).final[0] @ subject.model.get_output_embeddings().weight.T

    bias, clean, twice = logits(prompt.sources.zeroed()), logits(prompt.sources), logits(doubled)
    assert (clean - bias).abs().max() > 0.1
    assert torch.allclose(twice - bias, 2 * (clean - bias), atol=1e-4)


@pytest.mark.parametrize("kind", SETS)
def test_error_nodes_hold_exactly_what_the_transcoders_miss(subjects, kind):
    subject, tset = subjects["llama"], SETS[kind]()
    _, prompt = built(subject, tset)
    predicted = tset.reconstruct({layer: x for layer, x in prompt.inputs.items()})
    for layer in range(N_LAYERS):
        missed = prompt.outputs[layer] - predicted[layer] if layer in predicted else prompt.outputs[layer]
        assert torch.allclose(prompt.sources.errors[layer], missed, atol=1e-5), layer


# -- attributions --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[("llama", "per-layer"), ("qwen2", "cross-layer"), ("gemma2", "per-layer")])
def graph(request, subjects):
    family, kind = request.param
    subject, tset = subjects[family], SETS[kind]()
    where, prompt = built(subject, tset)
    targets = salient_logits(subject, prompt.logits, max_logits=5, mass=0.99)
    attribution = attribute(subject, tset, where, prompt, targets, max_feature_nodes=10_000, batch=8)
    return subject, tset, where, prompt, targets, attribution


def test_attributions_into_each_node_sum_to_its_input(graph):
    """A target logit (minus the mean logit) and a feature's pre-activation are each the sum of their incoming
    edges plus what the biases alone give (the replacement with every node removed)."""
    subject, tset, where, prompt, targets, attribution = graph
    adjacency, n_f, n_t = attribution.adjacency, len(attribution.features), len(targets.token_ids)
    assert n_f > 20 and n_t == 5
    logits = logit_inputs(subject, tset, where, prompt, prompt.sources, targets)
    logit_bias = logit_inputs(subject, tset, where, prompt, prompt.sources.zeroed(), targets)
    assert torch.allclose(adjacency[-n_t:].sum(1) + logit_bias, logits, atol=1e-4)
    pre = pre_activations(subject, tset, where, prompt, prompt.sources, attribution)
    pre_bias = pre_activations(subject, tset, where, prompt, prompt.sources.zeroed(), attribution)
    assert torch.allclose(adjacency[:n_f].sum(1) + pre_bias, pre, atol=1e-4)
    # Every feature node fired, so its pre-activation is positive; edges only run forward in layers.
    assert (pre > 0).all()
    layers = attribution.features.layers
    assert not adjacency[:n_f, :n_f][layers[:, None] <= layers[None, :]].any()


def test_edges_match_removing_each_source_from_the_frozen_model(graph):
    """Brute force: remove one source node's output and replay; the change of every target's input is the edge."""
    subject, tset, where, prompt, targets, attribution = graph
    features, n_f, n_t, n_pos = attribution.features, len(attribution.features), len(targets.token_ids), attribution.n_pos
    late = int((features.layers == features.layers.max()).nonzero()[-1])  # a feature node of the last covered layer
    logits = logit_inputs(subject, tset, where, prompt, prompt.sources, targets)
    pre = pre_activations(subject, tset, where, prompt, prompt.sources, attribution)[late]
    sources = [("feature", int(features.layers[k]), int(features.positions[k]), int(features.features[k]))
               for k in range(0, n_f, 3)]
    sources += [("error", layer, pos, -1) for layer in range(N_LAYERS) for pos in (1, n_pos - 1)]
    sources += [("embedding", -1, pos, -1) for pos in range(n_pos)]
    for kind, layer, pos, feature in sources:
        if kind == "feature":
            column = [k for k in range(n_f) if (int(features.layers[k]), int(features.positions[k]),
                                                int(features.features[k])) == (layer, pos, feature)][0]
        else:
            column = n_f + (layer * n_pos if kind == "error" else N_LAYERS * n_pos) + pos
        removed = without(prompt.sources, kind, layer, pos, feature)
        changed = logits - logit_inputs(subject, tset, where, prompt, removed, targets)
        assert torch.allclose(changed, attribution.adjacency[-n_t:, column], atol=1e-4), (kind, layer, pos, feature)
        changed = pre - pre_activations(subject, tset, where, prompt, removed, attribution)[late]
        assert torch.allclose(changed, attribution.adjacency[late, column], atol=1e-4), (kind, layer, pos, feature)


def test_a_feature_budget_keeps_the_features_most_influential_on_the_targets(subjects):
    subject, tset = subjects["llama"], per_layer_set()
    where, prompt = built(subject, tset)
    targets = salient_logits(subject, prompt.logits, max_logits=3, mass=0.99)
    full = attribute(subject, tset, where, prompt, targets, max_feature_nodes=10_000, batch=16)
    capped = attribute(subject, tset, where, prompt, targets, max_feature_nodes=8, batch=4)
    assert len(capped.features) == 8 and len(full.features) > 8
    # The first batch after the logits is the 4 features with the most direct influence on the targets.
    direct = full.adjacency[-3:, : len(full.features)].abs()
    direct = (targets.probabilities[:, None] * direct / full.adjacency[-3:].abs().sum(1, keepdim=True)).sum(0)
    keys = lambda f, k: (int(f.layers[k]), int(f.positions[k]), int(f.features[k]))  # noqa: E731
    kept = {keys(capped.features, k) for k in range(8)}
    assert {keys(full.features, k) for k in direct.topk(4).indices.tolist()} <= kept


# -- influence and pruning -----------------------------------------------------------------------


def test_influence_is_the_sum_over_paths_of_normalised_edge_products():
    g = torch.Generator().manual_seed(0)
    adjacency = torch.randn(12, 12, generator=g).tril(-1)  # a DAG: every node reads only earlier ones
    weights = torch.zeros(12)
    weights[-2:] = torch.tensor([0.7, 0.3])
    normalized = adjacency.abs() / adjacency.abs().sum(1, keepdim=True).clamp(min=1e-10)
    expected = weights @ (torch.linalg.inv(torch.eye(12) - normalized) - torch.eye(12))
    assert torch.allclose(influence(adjacency, weights), expected, atol=1e-5)


def test_pruning_keeps_the_influential_nodes_and_drops_those_left_unconnected():
    # nodes: features f0 f1 f2, one error node, one embedding, one target logit
    f0, f1, f2, err, emb, logit = range(6)
    adjacency = torch.zeros(6, 6)
    adjacency[logit, f0], adjacency[logit, err], adjacency[logit, f2] = 10, 1, 0.01
    adjacency[f0, f1], adjacency[f0, emb], adjacency[f1, emb], adjacency[f2, emb] = 5, -5, 1, 1
    pruned = prune(adjacency, n_features=3, n_fixed=2, probabilities=torch.tensor([1.0]), node_threshold=0.8,
                   edge_threshold=0.98)
    share = 10 / 11.01
    assert torch.allclose(pruned.influence, torch.tensor([share, share / 2, 0.01 / 11.01, 1 / 11.01,
                                                          share + 0.01 / 11.01, 0]), atol=1e-6)
    assert pruned.nodes.tolist() == [True, True, False, False, True, True]
    assert {tuple(e) for e in pruned.edges.nonzero().tolist()} == {(logit, f0), (f0, f1), (f0, emb), (f1, emb)}
    # With a stricter edge threshold only logit <- f0 survives the edge cut; f0 then has no incoming edge and
    # f1 no outgoing one, so both go, and with f0 its edge.
    strict = prune(adjacency, 3, 2, torch.tensor([1.0]), node_threshold=0.8, edge_threshold=0.3)
    assert strict.nodes.tolist() == [False, False, False, False, True, True] and not strict.edges.any()


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
        roles, = store.rows("SELECT roles FROM graphs")[0]
        first = store.rows("SELECT count(*) FROM graph_nodes WHERE kind = 'feature' AND position = 0")[0][0]
    assert roles == prompt.roles and summary.n_tokens == len(prompt.token_ids)
    assert first == 0  # <|im_start|> is a special token: its features are left to the error nodes


def labeled_run(path, config: RunConfig, tset: TranscoderSet) -> str:
    """A collected run of `tset` with an ok label (and a score) for every feature."""
    with Store(path) as store:
        run_id = store.start_run(config.model_dump_json(), "tiny")
        store.write_shard(run_id, "collect", "final", {})
        labels = [{"run_id": run_id, "layer": layer, "feature": f, "labeler": "test", "label": f"feature {layer}:{f}",
                   "status": "ok", "created_at": now()} for layer in tset.layers for f in range(F)]
        scores = [{"run_id": run_id, "layer": 1, "feature": f, "labeler": "test", "scorer": "detection", "value": 0.5, "status": "ok",
                   "unreliable": True} for f in range(F)]
        store.write_shard(run_id, "label", "0", {"labels": labels, "scores": scores})
    return run_id


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
    required = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence",
                "activation", "token_prob", "is_target_logit", "run_idx", "reverse_ctx_idx"}
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
    config = RunConfig(cache_dir=str(cache_dir), model=ModelConfig(source=str(tiny_model_dir), dtype="float32"),
                       transcoder=TranscoderConfig(source=str(folder)))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return config, config_path, tmp_path / "s.duckdb"


def test_cli_labels_the_top_nodes_with_the_runs_labels_and_writes_json(monkeypatch, capsys, cli_setup, tmp_path):
    config, config_path, store = cli_setup
    run_id = labeled_run(store, config, per_layer_set())
    out_json = tmp_path / "out" / "graph.json"
    code, out, err = run_cli(monkeypatch, capsys, "graph", TEXT, "--store", str(store), "--run", run_id,
                             "--max-logits", "3", "--json", str(out_json))
    assert code == 0, err
    text = " ".join(out.split())
    assert "feature 1:" in text or "feature 2:" in text
    assert "0.50 unreliable" in text or "feature 2:" in text
    assert json.loads(out_json.read_text())["metadata"]["prompt"] == TEXT
    with Store(store) as db:
        assert db.rows("SELECT run_id, count(*) FILTER (kind = 'logit') FROM graphs JOIN graph_nodes USING (graph_id) "
                       "GROUP BY ALL") == [(run_id, 3)]


def foreign_transcoders(folder) -> str:
    """Transcoders for a model with d_model 48 at layers 1 and 2."""
    transcoders = {layer: Transcoder(layer, torch.randn(48, F), torch.zeros(F), torch.randn(F, 48), torch.zeros(48))
                   for layer in (1, 2)}
    save_circuit_tracer(TranscoderSet(transcoders), folder, "another")
    return str(folder)


def write(path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("empty", "the prompt is empty"),
    ("long", "over the model's context of 512"),
    ("foreign", "made for another model"),
    ("not-a-chat", "is not a chat"),
    ("bad-roles", "has role 'robot'"),
    ("not-json", "is not valid UTF-8 JSON"),
    ("both", "pass either a PROMPT or --chat FILE"),
])
def test_bad_input_exits_2_and_writes_nothing(monkeypatch, capsys, cli_setup, tmp_path, case, message):
    _, config_path, store = cli_setup
    args = {
        "empty": ["  "],
        "long": [" word" * 600],
        "foreign": [TEXT, "--config", write(tmp_path / "c.yaml", yaml.safe_load(config_path.read_text()) | {
            "transcoder": {"source": foreign_transcoders(tmp_path / "foreign")}})],
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

    config = LlamaConfig(vocab_size=49152, hidden_size=D, intermediate_size=64, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         hidden_act="relu", mlp_bias=True)
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
        mlp.gate_proj.weight[0], mlp.gate_proj.bias[0], mlp.up_proj.bias[0], mlp.down_proj.weight[:, 0] = w, 4.0, 1.0, push
        transcoder.W_enc[:, 5], transcoder.W_dec[5] = w, push
        transcoder.b_enc[5] = 4.0 + transcoder.b_in @ w  # the transcoder subtracts b_in from its input first
    return SubjectModel(model, tokenizer, "tiny-planted"), tset


def feature_store(path, config: RunConfig, tset: TranscoderSet, ids: list[int]) -> str:
    """A labeled run: 2:5 has two top examples (peaks at position 5 and at the end) and the `assistant` audit
    flagged it; 1:7 is dead; every other feature is active without examples."""
    run_id = labeled_run(path, config, tset)
    peaks = [5, len(ids) - 1]
    with Store(path) as store:
        store.upsert("features", [{"run_id": run_id, "layer": layer, "feature": f, "n_tokens": 100,
                                   "n_active": 0 if (layer, f) == DEAD else 10, "max_act": 0.0 if (layer, f) == DEAD else 5.0,
                                   "status": "dead" if (layer, f) == DEAD else "active"}
                                  for layer in tset.layers for f in range(F)])
        store.upsert("examples", [{"run_id": run_id, "layer": 2, "feature": 5, "kind": "top", "rank": rank,
                                   "doc_id": f"doc-{rank}", "role": "text", "start": 0, "tokens": ids,
                                   "acts": [5.0 if i == peak else 1.0 for i in range(len(ids))], "max_act": 5.0}
                                  for rank, peak in enumerate(peaks)])
        store.upsert("audit_findings", [{"run_id": run_id, "audit": "assistant", "layer": 2, "feature": 5,
                                         "metric": "breadth", "value": 0.5, "flagged": True, "section": "pervasive",
                                         "rank": 1}])
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
        stored = store.dicts("SELECT f.*, g.tokens FROM feature_graphs f JOIN graphs g USING (graph_id) "
                             "ORDER BY prompt_index")
        top = store.rows("SELECT DISTINCT arg_max(token_id, probability) FROM graph_nodes WHERE kind = 'logit' AND "
                         "list_contains(?, graph_id) GROUP BY graph_id", [[row["graph_id"] for row in planted]])
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
        (share, kept, graph_id, n_tokens), = db.rows("SELECT share, kept, graph_id, len(tokens) FROM feature_graphs "
                                                     "JOIN graphs USING (graph_id) WHERE (layer, feature) = (2, 5)")
        findings = db.rows("SELECT audit, value FROM audit_findings WHERE metric = 'influence_share'")
    assert "L2:5" in text and "' mat'" in text and f" {share:.3f} " in text  # the peak token, the share
    assert n_tokens == 6 and graph_id.startswith("g-")
    assert findings == [("assistant", pytest.approx(share))]


@pytest.mark.parametrize("feature,message", [
    ("1:7", "never fired in run"),
    ("3:1", "the run's transcoder has no layer 3 (it has 1, 2)"),
    ("2:99", "feature 2:99 does not exist in run"),
    ("2:6", "feature 2:6 has no top examples in run"),
    ("2-5", "--features must be comma-separated LAYER:FEATURE pairs"),
])
def test_graph_feature_bad_input_exits_2_and_writes_nothing(monkeypatch, capsys, feature_cli, feature, message):
    args, store = feature_cli
    counts = "SELECT (SELECT count(*) FROM shards), (SELECT count(*) FROM graphs), (SELECT count(*) FROM audit_findings)"
    with Store(store) as db:
        before = db.rows(counts)
    code, _, err = run_cli(monkeypatch, capsys, "graph", "--feature", feature, *args)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    with Store(store) as db:
        assert db.rows(counts) == before and db.rows("SELECT count(*) FROM feature_graphs") == [(0,)]


# -- the report's graph page ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reported(subjects, tmp_path_factory):
    """A report of a run whose every feature is collected and labeled, with one graph of the run."""
    subject, tset = subjects["llama"], per_layer_set()
    folder = tmp_path_factory.mktemp("graph-report")
    path = folder / "s.duckdb"
    run_id = labeled_run(path, RunConfig(), tset)
    with Store(path) as store:
        store.upsert("features", [{"run_id": run_id, "layer": layer, "feature": f, "n_tokens": 100, "n_active": 10,
                                   "density": 0.1, "max_act": 1.0, "status": "active"}
                                  for layer in tset.layers for f in range(F)])
        summary = graph_stage(store, subject, tset, "tc-x", text_prompt(subject.tokenizer, TEXT), GraphConfig(), run_id)
        kept = store.rows("SELECT count(*) FILTER (kind = 'feature'), count(*) FROM graph_nodes "
                          "WHERE graph_id = ? AND kept", [summary.graph_id])[0]
        report = report_stage(store, run_id, folder / "reports", ReportConfig(output_tokens=0, nearest=0),
                              subject.tokenizer, show_progress=False)
    return report, summary.graph_id, kept


def test_report_has_a_graph_page_with_labeled_nodes_linked_to_feature_pages(reported):
    report, graph_id, (kept_features, kept_nodes) = reported
    folder = report.index.parent
    assert f'href="graphs/{graph_id}.html"' in report.index.read_text(encoding="utf-8")
    page = (folder / "graphs" / f"{graph_id}.html").read_text(encoding="utf-8")
    (embedded,) = re.findall(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.DOTALL)
    data = json.loads(embedded)
    features = [node for node in data["nodes"] if node["kind"] == "feature"]
    assert len(data["nodes"]) == kept_nodes and len(features) == kept_features > 0
    for node in features:
        assert node["label"] == f"feature {node['layer']}:{node['feature']}"
        assert node["unreliable"] == (node["layer"] == 1) and (folder / "graphs" / node["href"]).resolve().is_file()
    assert page.count('<td><a href="../features/') == kept_features  # the table without script
    assert '<script src="../static/graph.js"></script>' in page and (folder / "static" / "graph.js").is_file()


def test_graph_page_in_chromium_draws_nodes_shows_edges_and_opens_feature_pages(reported):
    report, graph_id, (kept_features, kept_nodes) = reported
    browser = Chromium()
    try:
        browser.open((report.index.parent / "graphs" / f"{graph_id}.html").as_uri())
        browser.wait_until("document.querySelector('#graph svg') !== null")
        assert browser.evaluate("document.querySelectorAll('#graph .node').length") == kept_nodes
        assert browser.evaluate("document.querySelectorAll('#graph circle.node').length") == kept_features
        assert browser.evaluate("document.querySelectorAll('#graph line').length") > 0
        node_id = browser.evaluate("document.querySelector('#graph circle.node').dataset.id")
        layer, feature, _ = node_id.split("_")
        browser.evaluate("document.querySelector('#graph circle.node').dispatchEvent(new MouseEvent('mouseenter'))")
        info = browser.evaluate("document.getElementById('graph-info').textContent")
        assert f"feature {layer}:{feature}" in info  # its label
        assert ("score 0.50 (unreliable)" if layer == "1" else "no score") in info
        assert "from:" in info and "to:" in info  # a kept feature is driven by something and drives something
        assert browser.evaluate("document.querySelectorAll('#graph line.hot').length") > 0
        browser.evaluate("document.querySelector('#graph circle.node').dispatchEvent(new MouseEvent('click'))")
        browser.wait_for_event("Page.loadEventFired")
        assert re.search(r"/features/\d+-\d+\.html$", browser.evaluate("location.href"))
    finally:
        browser.close()
