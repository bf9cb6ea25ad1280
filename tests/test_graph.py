"""Attribution graphs on tiny random models with random transcoders: the replacement reproduces the model,
freezing makes it affine in its nodes (Llama, Qwen2, Gemma-2), attributions are complete and match removing
each source, a feature budget keeps the most influential features, and pruning keeps what carries the
influence. Storage, export and the command: test_graph_command.py; the report's page: test_graph_report.py."""

from __future__ import annotations

import pytest
import torch
from graph_setup import FAMILIES, N_LAYERS, SETS, TEXT, one_thread, per_layer_set, tiny_subjects

from autolabel.graph.attribute import attribute, salient_logits
from autolabel.graph.prune import influence, prune
from autolabel.graph.replacement import layout, record, replay, unembed, without
from autolabel.models import SubjectModel
from autolabel.transcoders.transcoder import TranscoderSet


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def subjects(tokenizer) -> dict[str, SubjectModel]:
    return tiny_subjects(tokenizer)


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
    return torch.stack(
        [
            tset[layer].pre_acts(live[layer][0, pos])[feature]
            for layer, pos, feature in zip(
                features.layers.tolist(), features.positions.tolist(), features.features.tolist(), strict=True
            )
        ]
    )


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
            return (
                replay(subject, tset, where, prompt, sources).final[0] @ subject.model.get_output_embeddings().weight.T
            )

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
    features, n_f, n_t, n_pos = (
        attribution.features,
        len(attribution.features),
        len(targets.token_ids),
        attribution.n_pos,
    )
    late = int((features.layers == features.layers.max()).nonzero()[-1])  # a feature node of the last covered layer
    logits = logit_inputs(subject, tset, where, prompt, prompt.sources, targets)
    pre = pre_activations(subject, tset, where, prompt, prompt.sources, attribution)[late]
    sources = [
        ("feature", int(features.layers[k]), int(features.positions[k]), int(features.features[k]))
        for k in range(0, n_f, 3)
    ]
    sources += [("error", layer, pos, -1) for layer in range(N_LAYERS) for pos in (1, n_pos - 1)]
    sources += [("embedding", -1, pos, -1) for pos in range(n_pos)]
    for kind, layer, pos, feature in sources:
        if kind == "feature":
            column = [
                k
                for k in range(n_f)
                if (int(features.layers[k]), int(features.positions[k]), int(features.features[k]))
                == (layer, pos, feature)
            ][0]
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
    pruned = prune(
        adjacency, n_features=3, n_fixed=2, probabilities=torch.tensor([1.0]), node_threshold=0.8, edge_threshold=0.98
    )
    share = 10 / 11.01
    assert torch.allclose(
        pruned.influence, torch.tensor([share, share / 2, 0.01 / 11.01, 1 / 11.01, share + 0.01 / 11.01, 0]), atol=1e-6
    )
    assert pruned.nodes.tolist() == [True, True, False, False, True, True]
    assert {tuple(e) for e in pruned.edges.nonzero().tolist()} == {(logit, f0), (f0, f1), (f0, emb), (f1, emb)}
    # With a stricter edge threshold only logit <- f0 survives the edge cut; f0 then has no incoming edge and
    # f1 no outgoing one, so both go, and with f0 its edge.
    strict = prune(adjacency, 3, 2, torch.tensor([1.0]), node_threshold=0.8, edge_threshold=0.3)
    assert strict.nodes.tolist() == [False, False, False, False, True, True] and not strict.edges.any()
