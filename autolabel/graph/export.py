"""A stored graph in circuit-tracer's graph JSON (its frontend's and Neuronpedia's format), and the labels
its feature nodes carry.

The JSON holds the kept nodes and edges as circuit-tracer's `create_graph_files` writes them: `metadata`
(slug, scan, prompt, prompt_tokens, node_threshold), `qParams`, `nodes` (node_id, feature, layer, ctx_idx,
feature_type, jsNodeId, clerp, influence as the cumulative share, activation, token_prob,
is_target_logit) and `links` (source, target, weight). A feature's clerp is its autolabel label.
"""

from __future__ import annotations

import json

from autolabel.store import Store

VISIBLE = {"\n": "⏎", "\t": "→", "\r": "↵"}


def token_text(tokenizer, token_id: int) -> str:
    """A token as a reader sees it, whitespace control characters made visible."""
    text = tokenizer.decode([token_id])
    for raw, shown in VISIBLE.items():
        text = text.replace(raw, shown)
    return text


def feature_labels(store: Store, run_id: str | None) -> dict[tuple[int, int], dict]:
    """(layer, feature) -> the latest ok label with its mean score and unreliable flag (none without a run)."""
    if run_id is None:
        return {}
    rows = store.rows(
        "WITH label AS (SELECT layer, feature, label FROM current_labels WHERE run_id = $run), "
        "     score AS (SELECT layer, feature, avg(value) FILTER (status = 'ok') AS score, "
        "               bool_or(coalesce(unreliable, false)) AS unreliable FROM current_scores WHERE run_id = $run "
        "               GROUP BY ALL) "
        "SELECT layer, feature, label, score, coalesce(unreliable, false) "
        "FROM label LEFT JOIN score USING (layer, feature)",
        {"run": run_id},
    )
    return {
        (layer, feature): {"label": label, "score": score, "unreliable": unreliable}
        for layer, feature, label, score, unreliable in rows
    }


def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def _node(row: dict, cumulative: float, n_layers: int, top_token: int | None, tokenizer, labels: dict) -> dict:
    kind, layer, pos = row["kind"], row["layer"], row["position"]
    common = {
        "node_id": row["node_id"],
        "ctx_idx": pos,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "influence": cumulative,
        "token_prob": 0.0,
        "is_target_logit": False,
        "clerp": "",
        "activation": None,
    }
    if kind == "feature":
        label = labels.get((layer, row["feature"]), {}).get("label") or ""
        return common | {
            "feature": _cantor(layer, row["feature"]),
            "layer": str(layer),
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{row['feature']}-0",
            "clerp": label,
            "activation": row["activation"],
        }
    if kind == "error":
        return common | {
            "feature": -1,
            "layer": str(layer),
            "feature_type": "mlp reconstruction error",
            "jsNodeId": f"{layer}_-1-{pos}",
        }
    token = row["token_id"]
    if kind == "embedding":
        return common | {"feature": pos, "layer": "E", "feature_type": "embedding", "jsNodeId": f"E_{token}-{pos}"}
    probability = row["probability"]
    return common | {
        "feature": token,
        "layer": str(n_layers + 1),
        "feature_type": "logit",
        "jsNodeId": f"L_{token}-{pos}",
        "token_prob": probability,
        "is_target_logit": token == top_token,
        "clerp": f'Output "{token_text(tokenizer, token)}" (p={probability:.3f})',
    }


def circuit_tracer_graph(store: Store, graph_id: str, tokenizer, labels: dict[tuple[int, int], dict]) -> dict:
    graph = store.dicts("SELECT * FROM graphs WHERE graph_id = ?", [graph_id])[0]
    settings = json.loads(graph["settings_json"])
    rows = store.dicts("SELECT * FROM graph_nodes WHERE graph_id = ? ORDER BY influence DESC, node_id", [graph_id])
    total = sum(row["influence"] for row in rows) or 1.0
    running, cumulative = 0.0, {}
    for row in rows:
        running += row["influence"]
        cumulative[row["node_id"]] = running / total
    logits = sorted((row for row in rows if row["kind"] == "logit"), key=lambda row: -row["probability"])
    top_token = logits[0]["token_id"] if logits else None
    nodes = [
        _node(row, cumulative[row["node_id"]], settings["n_layers"], top_token, tokenizer, labels)
        for row in sorted(rows, key=lambda row: row["node_id"])
        if row["kept"]
    ]
    links = store.dicts(
        "SELECT source, target, weight FROM graph_edges WHERE graph_id = ? ORDER BY target, source", [graph_id]
    )
    return {
        "metadata": {
            "slug": graph_id,
            "scan": graph["transcoder_id"],
            "transcoder_list": [],
            "prompt_tokens": [token_text(tokenizer, t) for t in graph["tokens"]],
            "prompt": graph["prompt"],
            "node_threshold": settings["node_threshold"],
            "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
