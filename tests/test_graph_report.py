"""The report's graph page: every kept node embedded with its label, score flag and a link to its feature
page; in headless Chromium the nodes drawn, a node's edges on hover, its feature page on click; the supernode
view by cluster (members, counts and summed edge weights checked in Python, the drawing in Chromium)."""

from __future__ import annotations

import json
import re

import pytest
from browser import Chromium
from graph_setup import TEXT, F, labeled_run, one_thread, per_layer_set, tiny_subjects

from autolabel.config import GraphConfig, ReportConfig, RunConfig
from autolabel.graph import graph_stage
from autolabel.graph.prompts import text_prompt
from autolabel.models import SubjectModel
from autolabel.report.graphs import by_cluster
from autolabel.report.stage import report_stage
from autolabel.store import Store


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def subjects(tokenizer) -> dict[str, SubjectModel]:
    return tiny_subjects(tokenizer)


NAMED = '<b>"sky" & </script>'  # a cluster name the page must show as text


def cluster_rows(run_id: str, layers: list[int]) -> dict[str, list[dict]]:
    """The first covered layer's features in cluster 0 (NAMED, the odd ones) and 1 (no name, the even ones); the
    other layers' in no cluster."""
    mapped = [
        {
            "run_id": run_id,
            "layer": layer,
            "feature": f,
            "umap_x": float(f),
            "umap_y": float(layer),
            "cluster_id": (0 if f % 2 else 1) if layer == layers[0] else None,
            "reliable": True,
        }
        for layer in layers
        for f in range(F)
    ]
    return {
        "feature_map": mapped,
        "clusters": [
            {"run_id": run_id, "cluster_id": 0, "name": NAMED, "description": "", "size": F},
            {"run_id": run_id, "cluster_id": 1, "name": None, "description": "", "size": F},
        ],
    }


@pytest.fixture(scope="module")
def reported(subjects, tmp_path_factory):
    """A report of a run whose every feature is collected, labeled and clustered (cluster_rows), with one graph
    of the run."""
    subject, tset = subjects["llama"], per_layer_set()
    folder = tmp_path_factory.mktemp("graph-report")
    path = folder / "s.duckdb"
    run_id = labeled_run(path, RunConfig(), tset)
    with Store(path) as store:
        store.upsert(
            "features",
            [
                {
                    "run_id": run_id,
                    "layer": layer,
                    "feature": f,
                    "n_tokens": 100,
                    "n_active": 10,
                    "density": 0.1,
                    "max_act": 1.0,
                    "status": "active",
                }
                for layer in tset.layers
                for f in range(F)
            ],
        )
        for table, rows in cluster_rows(run_id, tset.layers).items():
            store.upsert(table, rows)
        summary = graph_stage(store, subject, tset, "tc-x", text_prompt(subject.tokenizer, TEXT), GraphConfig(), run_id)
        kept = store.rows(
            "SELECT count(*) FILTER (kind = 'feature'), count(*) FROM graph_nodes WHERE graph_id = ? AND kept",
            [summary.graph_id],
        )[0]
        report = report_stage(
            store,
            run_id,
            folder / "reports",
            ReportConfig(output_tokens=0, nearest=0),
            subject.tokenizer,
            show_progress=False,
        )
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


def page_data(report, graph_id: str) -> tuple[str, dict]:
    page = (report.index.parent / "graphs" / f"{graph_id}.html").read_text(encoding="utf-8")
    (embedded,) = re.findall(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.DOTALL)
    return page, json.loads(embedded)


def test_supernodes_group_a_clusters_features_and_sum_the_edges_crossing_them():
    # features a, b in cluster 0; c in cluster 1; d in none; e a target logit
    nodes = [
        {"id": "a", "kind": "feature", "cluster_id": 0, "cluster": "zero", "influence": 0.1},
        {"id": "b", "kind": "feature", "cluster_id": 0, "cluster": "zero", "influence": 0.3},
        {"id": "c", "kind": "feature", "cluster_id": 1, "cluster": "cluster 1", "influence": 0.2},
        {"id": "d", "kind": "feature", "cluster_id": None, "cluster": "", "influence": 0.4},
        {"id": "e", "kind": "logit", "influence": 0.0},
    ]
    edges = [
        ["a", "b", 1.0],
        ["a", "e", 2.0],
        ["b", "e", 3.0],
        ["c", "a", 0.5],
        ["d", "b", -1.0],
        ["c", "e", 4.0],
        ["d", "e", 5.0],
    ]
    grouped = by_cluster(nodes, edges)
    zero, one = grouped["supernodes"]
    assert (zero["id"], zero["name"], zero["members"], zero["count"]) == ("S_0", "zero", ["b", "a"], 2)
    assert (zero["weight_in"], zero["weight_out"]) == (0.5 - 1.0, 2.0 + 3.0)  # a -> b is inside: in neither sum
    assert (one["id"], one["members"], one["count"], one["weight_in"], one["weight_out"]) == ("S_1", ["c"], 1, 0, 4.5)
    assert sorted(map(tuple, grouped["super_edges"])) == [
        ("S_0", "e", 5.0),
        ("S_1", "S_0", 0.5),
        ("S_1", "e", 4.0),
        ("d", "S_0", -1.0),
        ("d", "e", 5.0),
    ]


def test_graph_page_has_supernodes_by_cluster_with_their_members_and_edge_sums(reported):
    report, graph_id, _ = reported
    page, data = page_data(report, graph_id)
    features = [node for node in data["nodes"] if node["kind"] == "feature"]
    clustered = {node["id"]: node["cluster_id"] for node in features if node["cluster_id"] is not None}
    assert {0, 1} <= set(clustered.values()) and len(clustered) < len(features)  # some features in no cluster
    supernodes = {group["cluster_id"]: group for group in data["supernodes"]}
    assert supernodes[0]["name"] == NAMED and supernodes[1]["name"] == "cluster 1"
    for cluster, group in supernodes.items():
        members = {node for node, c in clustered.items() if c == cluster}
        assert set(group["members"]) == members and group["count"] == len(members)
        assert group["weight_in"] == pytest.approx(
            sum(w for s, t, w in data["edges"] if t in members and s not in members)
        )
        assert group["weight_out"] == pytest.approx(
            sum(w for s, t, w in data["edges"] if s in members and t not in members)
        )
    # The supernode view's edges keep the total weight of the edges between different units.
    inside = sum(w for s, t, w in data["edges"] if s in clustered and clustered[s] == clustered.get(t))
    assert sum(w for _, _, w in data["super_edges"]) + inside == pytest.approx(sum(w for _, _, w in data["edges"]))
    # Without script, a table of the clusters, their names escaped.
    table = page.split('id="graph-clusters"', 1)[1].split("</table>", 1)[0]
    assert "&lt;b&gt;&#34;sky&#34; &amp; &lt;/script&gt;" in table and NAMED not in page
    assert table.count('href="../features/') == len(clustered)


def test_graph_page_in_chromium_toggles_to_supernodes_that_list_their_members(reported):
    report, graph_id, (_, kept_nodes) = reported
    _, data = page_data(report, graph_id)
    named = next(group for group in data["supernodes"] if group["cluster_id"] == 0)
    grouped = sum(group["count"] for group in data["supernodes"])
    browser = Chromium()
    try:
        browser.open((report.index.parent / "graphs" / f"{graph_id}.html").as_uri())
        browser.wait_until("document.querySelector('#graph svg') !== null")
        select = (
            "{ const v = document.getElementById('graph-view'); v.value = '%s'; v.dispatchEvent(new Event('change')); }"
        )
        browser.evaluate(select % "supernodes")
        assert browser.evaluate("document.querySelectorAll('#graph circle.supernode').length") == len(
            data["supernodes"]
        )
        assert browser.evaluate("document.querySelectorAll('#graph .node').length") == (
            kept_nodes - grouped + len(data["supernodes"])
        )
        assert browser.evaluate("document.querySelectorAll('#graph line').length") == len(data["super_edges"])
        shape = "document.querySelector('#graph circle.supernode[data-id=\"S_0\"]')"
        browser.evaluate(f"{shape}.dispatchEvent(new MouseEvent('mouseenter'))")
        info = browser.evaluate("document.getElementById('graph-info').textContent")
        assert f"{NAMED}: {named['count']} feature" in info
        assert f"summed edge weight in {named['weight_in']:.3f}, out {named['weight_out']:.3f}" in info
        browser.evaluate(f"{shape}.dispatchEvent(new MouseEvent('click'))")
        links = browser.evaluate("[...document.querySelectorAll('#graph-info a')].map(a => [a.href, a.textContent])")
        assert (
            len(links) == named["count"] and browser.evaluate("document.querySelectorAll('#graph-info b').length") == 0
        )
        for (href, text), member in zip(links, named["members"], strict=True):
            layer, feature, _ = member.split("_")
            assert text.startswith(f"L{layer}/{feature}@") and f"feature {layer}:{feature}" in text
            assert href.endswith(f"/features/{layer}-{feature}.html")
            assert (report.index.parent / "features" / f"{layer}-{feature}.html").is_file()
        browser.evaluate(select % "nodes")
        assert browser.evaluate("document.querySelectorAll('#graph .node').length") == kept_nodes
    finally:
        browser.close()
