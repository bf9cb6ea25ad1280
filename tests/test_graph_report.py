"""The report's graph page: every kept node embedded with its label, score flag and a link to its feature
page; in headless Chromium the nodes drawn, a node's edges on hover, its feature page on click."""

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
from autolabel.report.stage import report_stage
from autolabel.store import Store


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def subjects(tokenizer) -> dict[str, SubjectModel]:
    return tiny_subjects(tokenizer)


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
