"""The report's graph pages: every attribution graph made for the run (`autolabel graph --run`).

A page shows the prompt's tokens with their roles, the kept nodes by layer and position (drawn as SVG by
static/graph.js from the JSON embedded in the page; without script, a table of the kept features), each
feature labeled with the run's label, its score and unreliable flag, coloured by cluster or audit group,
and linked to its feature page. The supernode view draws each cluster's kept features as one node: a reader
sees which themes pass the signal on before reading single features.
"""

from __future__ import annotations

import json
from collections import defaultdict

from autolabel.graph.export import token_text
from autolabel.report.render import page_path
from autolabel.report.summary import FeatureLabel
from autolabel.store import Store


def graph_path(graph_id: str) -> str:
    """A graph page, relative to the report folder."""
    return f"graphs/{graph_id}.html"


def run_graphs(store: Store, run_id: str) -> list[dict]:
    return store.dicts(
        "SELECT g.graph_id, g.prompt, len(g.tokens) AS n_tokens, g.created_at, "
        "       count(*) FILTER (n.kind = 'feature' AND n.kept) AS kept_features, "
        "       (SELECT count(*) FROM graph_edges e WHERE e.graph_id = g.graph_id) AS kept_edges "
        "FROM graphs g JOIN graph_nodes n USING (graph_id) WHERE g.run_id = ? GROUP BY ALL ORDER BY g.created_at",
        [run_id],
    )


def graph_data(
    store: Store,
    graph_id: str,
    tokenizer,
    labels: dict[tuple[int, int], FeatureLabel],
    cluster_of: dict[tuple[int, int], dict],
    groups_of: dict[tuple[int, int], list[dict]],
) -> dict:
    """What graph.js draws: the prompt's tokens, the kept nodes (labeled) and the kept edges."""
    graph = store.dicts("SELECT tokens, roles, settings_json FROM graphs WHERE graph_id = ?", [graph_id])[0]
    nodes = []
    for row in store.dicts(
        "SELECT node_id, kind, layer, position, feature, token_id, activation, probability, "
        "influence FROM graph_nodes WHERE graph_id = ? AND kept ORDER BY node_id",
        [graph_id],
    ):
        node = {
            "id": row["node_id"],
            "kind": row["kind"],
            "layer": row["layer"],
            "pos": row["position"],
            "influence": row["influence"],
        }
        if row["kind"] == "feature":
            key = (row["layer"], row["feature"])
            label = labels.get(key) or FeatureLabel()
            cluster = cluster_of.get(key) or {}
            node |= {
                "feature": row["feature"],
                "activation": row["activation"],
                "label": label.label or "",
                "score": label.score,
                "unreliable": label.unreliable,
                "cluster_id": cluster.get("id"),
                "cluster": cluster.get("name") or ("" if cluster.get("id") is None else f"cluster {cluster['id']}"),
                "groups": [g["name"] for g in groups_of.get(key, [])],
                "href": "../" + page_path(*key),
            }
        elif row["kind"] in ("embedding", "logit"):
            node |= {"token": token_text(tokenizer, row["token_id"]), "probability": row["probability"]}
        nodes.append(node)
    edges = [
        list(edge)
        for edge in store.rows(
            "SELECT source, target, weight FROM graph_edges WHERE graph_id = ? ORDER BY source, target", [graph_id]
        )
    ]
    return {
        "graph_id": graph_id,
        "n_layers": json.loads(graph["settings_json"])["n_layers"],
        "tokens": [token_text(tokenizer, t) for t in graph["tokens"]],
        "roles": graph["roles"],
        "nodes": nodes,
        "edges": edges,
    } | by_cluster(nodes, edges)


def by_cluster(nodes: list[dict], edges: list[list]) -> dict:
    """The supernode view: `supernodes`, one per cluster with kept features (name, members most influential
    first, count, and the summed weights of the edges crossing its boundary, in and out), and `super_edges`
    [source, target, weight] between what that view draws (supernodes and every node outside a cluster), the
    weights of parallel edges summed and the edges inside a supernode left out."""
    owner = {node["id"]: f"S_{node['cluster_id']}" for node in nodes if node.get("cluster_id") is not None}
    groups: dict[str, dict] = {}
    for node in sorted((n for n in nodes if n["id"] in owner), key=lambda n: -n["influence"]):
        group = groups.setdefault(
            owner[node["id"]],
            {
                "id": owner[node["id"]],
                "kind": "supernode",
                "cluster_id": node["cluster_id"],
                "name": node["cluster"],
                "members": [],
                "weight_in": 0.0,
                "weight_out": 0.0,
            },
        )
        group["members"].append(node["id"])
    summed: dict[tuple[str, str], float] = defaultdict(float)
    for source, target, weight in edges:
        source, target = owner.get(source, source), owner.get(target, target)
        if source != target:
            summed[(source, target)] += weight
    for (source, target), weight in summed.items():
        if target in groups:
            groups[target]["weight_in"] += weight
        if source in groups:
            groups[source]["weight_out"] += weight
    for group in groups.values():
        group["count"] = len(group["members"])
    return {
        "supernodes": sorted(groups.values(), key=lambda g: (-g["count"], g["cluster_id"])),
        "super_edges": [[source, target, weight] for (source, target), weight in sorted(summed.items())],
    }


def write_graph_pages(
    store: Store, run_id: str, template, folder, tokenizer, labels: dict, cluster_of: dict, groups_of: dict
) -> list[dict]:
    """folder/graphs/<graph_id>.html for each graph of the run; the graphs, for the index."""
    graphs = run_graphs(store, run_id)
    if graphs:
        (folder / "graphs").mkdir(exist_ok=True)
    for graph in graphs:
        data = graph_data(store, graph["graph_id"], tokenizer, labels, cluster_of, groups_of)
        features = sorted((n for n in data["nodes"] if n["kind"] == "feature"), key=lambda n: -n["influence"])
        by_id = {node["id"]: node for node in data["nodes"]}
        groups = [(group, [by_id[member] for member in group["members"]]) for group in data["supernodes"]]
        html = template.render(
            root="../", run={"run_id": run_id}, graph=graph, data=data, features=features, groups=groups, labels=labels
        )
        (folder / graph_path(graph["graph_id"])).write_text(html, encoding="utf-8")
    return graphs
