"""The graph stage: one prompt -> an attribution graph in the store (graphs, graph_nodes, graph_edges).

A graph's id hashes everything it depends on (model, transcoder set, run, tokens, settings), and it is
written as one shard keyed by that id: asking again for the same graph reads the stored one, and a killed
run leaves the whole graph or nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from autolabel.config import GraphConfig
from autolabel.errors import AutolabelError
from autolabel.graph.attribute import Attribution, attribute, salient_logits
from autolabel.graph.prompts import GraphPrompt, first_is_special
from autolabel.graph.prune import Pruned, prune
from autolabel.graph.replacement import layout, record
from autolabel.models import SubjectModel
from autolabel.store import Store, now, to_json
from autolabel.transcoders.transcoder import TranscoderSet

STAGE = "graph"


@dataclass
class GraphSummary:
    graph_id: str
    reused: bool  # read from the store, not computed now
    n_tokens: int
    n_features: int  # feature nodes (incoming edges computed)
    kept_features: int
    kept_edges: int
    error_share: float  # share of the influence on the targets that error nodes hold (lower: better covered)
    seconds: float


def graph_key(
    model_id: str, transcoder_id: str, run_id: str | None, token_ids: list[int], settings: GraphConfig
) -> str:
    """The id of a graph: a hash of what it depends on (the batch size changes only the speed)."""
    text = to_json(
        {
            "model": model_id,
            "transcoder": transcoder_id,
            "run": run_id,
            "tokens": token_ids,
            "settings": settings.model_dump(mode="json", exclude={"batch_size"}),
        }
    )
    return "g-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def node_ids(attribution: Attribution, token_ids: list[int]) -> list[str]:
    """circuit-tracer's node ids, in adjacency order (features, errors, embeddings, logits)."""
    features, n_layers, n_pos = attribution.features, attribution.n_layers, attribution.n_pos
    return (
        [
            f"{layer}_{feature}_{pos}"
            for layer, pos, feature in zip(
                features.layers.tolist(), features.positions.tolist(), features.features.tolist(), strict=True
            )
        ]
        + [f"{layer}_-1_{pos}" for layer in range(n_layers) for pos in range(n_pos)]
        + [f"E_{token}_{pos}" for pos, token in enumerate(token_ids)]
        + [f"{n_layers + 1}_{token}_{n_pos - 1}" for token in attribution.targets.token_ids.tolist()]
    )


def graph_tables(
    graph_id: str, attribution: Attribution, pruned: Pruned, token_ids: list[int]
) -> dict[str, list[dict]]:
    """graph_nodes and graph_edges rows."""
    features, targets = attribution.features, attribution.targets
    n_layers, n_pos = attribution.n_layers, attribution.n_pos
    influence, kept = pruned.influence.tolist(), pruned.nodes.tolist()
    ids = node_ids(attribution, token_ids)
    nodes = []

    def node(kind: str, **columns) -> None:
        i = len(nodes)
        nodes.append(
            {
                "graph_id": graph_id,
                "node_id": ids[i],
                "kind": kind,
                "layer": None,
                "position": None,
                "feature": None,
                "token_id": None,
                "activation": None,
                "probability": None,
                "influence": influence[i],
                "kept": kept[i],
            }
            | columns
        )

    for layer, pos, feature, act in zip(
        features.layers.tolist(),
        features.positions.tolist(),
        features.features.tolist(),
        features.activations.tolist(),
        strict=True,
    ):
        node("feature", layer=layer, position=pos, feature=feature, activation=act)
    for layer in range(n_layers):
        for pos in range(n_pos):
            node("error", layer=layer, position=pos)
    for pos, token in enumerate(token_ids):
        node("embedding", position=pos, token_id=token)
    for token, probability in zip(targets.token_ids.tolist(), targets.probabilities.tolist(), strict=True):
        node("logit", position=n_pos - 1, token_id=token, probability=probability)
    target_index, source_index = pruned.edges.nonzero(as_tuple=True)
    weights = attribution.adjacency[target_index, source_index].tolist()
    edges = [
        {"graph_id": graph_id, "source": ids[s], "target": ids[t], "weight": w}
        for t, s, w in zip(target_index.tolist(), source_index.tolist(), weights, strict=True)
    ]
    return {"graph_nodes": nodes, "graph_edges": edges}


def _stored_summary(store: Store, graph_id: str, reused: bool) -> GraphSummary:
    n_tokens, seconds = store.rows("SELECT len(tokens), seconds FROM graphs WHERE graph_id = ?", [graph_id])[0]
    n_features, kept_features, error_share = store.rows(
        "SELECT count(*) FILTER (kind = 'feature'), count(*) FILTER (kind = 'feature' AND kept), "
        "coalesce(sum(influence) FILTER (kind = 'error') / nullif(sum(influence), 0), 0) "
        "FROM graph_nodes WHERE graph_id = ?",
        [graph_id],
    )[0]
    kept_edges = store.rows("SELECT count(*) FROM graph_edges WHERE graph_id = ?", [graph_id])[0][0]
    return GraphSummary(graph_id, reused, n_tokens, n_features, kept_features, kept_edges, error_share, seconds)


def graph_stage(
    store: Store,
    subject: SubjectModel,
    tset: TranscoderSet,
    transcoder_id: str,
    prompt: GraphPrompt,
    settings: GraphConfig,
    run_id: str | None = None,
) -> GraphSummary:
    """Build, prune and store the attribution graph of `prompt` (or read the stored one): its summary."""
    graph_id = graph_key(subject.model_id, transcoder_id, run_id, prompt.token_ids, settings)
    if "final" in store.committed_shards(graph_id, STAGE):
        return _stored_summary(store, graph_id, reused=True)
    if subject.dtype != "float32":
        raise AutolabelError(
            f"attribution graphs need the model in float32 (it is {subject.dtype}): gradients "
            f"through bfloat16 lose the small edges; load it with dtype float32"
        )
    where = layout(subject, tset)
    started = time.perf_counter()
    token_ids = torch.tensor(prompt.token_ids, dtype=torch.long)
    recorded = record(subject, tset, where, token_ids, first_features=not first_is_special(subject.tokenizer, prompt))
    targets = salient_logits(subject, recorded.logits, settings.max_logits, settings.logit_mass)
    attribution = attribute(subject, tset, where, recorded, targets, settings.max_feature_nodes, settings.batch_size)
    n_fixed = attribution.n_pos + len(targets.token_ids)
    pruned = prune(
        attribution.adjacency,
        len(attribution.features),
        n_fixed,
        targets.probabilities,
        settings.node_threshold,
        settings.edge_threshold,
    )
    seconds = time.perf_counter() - started
    tables = graph_tables(graph_id, attribution, pruned, prompt.token_ids)
    tables["graphs"] = [
        {
            "graph_id": graph_id,
            "run_id": run_id,
            "model_id": subject.model_id,
            "transcoder_id": transcoder_id,
            "prompt": prompt.text,
            "tokens": prompt.token_ids,
            "roles": prompt.roles,
            "seconds": seconds,
            "settings_json": to_json(
                {
                    **settings.model_dump(mode="json"),
                    "chat": prompt.messages,
                    "n_layers": subject.n_layers,
                    "layers": tset.layers,
                }
            ),
            "created_at": now(),
        }
    ]
    store.write_shard(graph_id, STAGE, "final", tables)
    return _stored_summary(store, graph_id, reused=False)
