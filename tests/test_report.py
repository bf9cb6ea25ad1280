"""The HTML report on the tiny model's collected run, with later stages' rows planted in the store:
every section renders (or says "not run"), pages are self-contained and escaped, and a real headless
Chromium draws the audit table and the map, follows a click to a feature page and back, and runs
no script planted in the corpus, labels, groups or clusters."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from datetime import UTC, datetime
from html.parser import HTMLParser

import pytest
from browser import Chromium
from test_cli import run_cli
from test_collect import file_corpus, write_corpus

from autolabel.config import ReportConfig
from autolabel.report.serve import make_server
from autolabel.report.stage import report_stage
from autolabel.store import Store

LAYER = 1
SECRET = "sk-test-SECRET-MARKER-4242"
# Each payload, if it ever ran, would set window.__xss or change the title.
PAYLOADS = [
    '<script>window.__xss = "script"; document.title = "pwned"</script>',
    "<img src=x onerror=\"window.__xss = 'img'\">",
    '"><svg onload="window.__xss = \'svg\'">',
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_subject):
    """The collection tests' corpus plus documents whose text, ids and chats carry script payloads."""
    folder = tmp_path_factory.mktemp("report")
    write_corpus(folder / "docs.jsonl")
    with (folder / "docs.jsonl").open("a", encoding="utf-8") as out:
        for i, payload in enumerate(PAYLOADS):
            out.write(
                json.dumps(
                    {
                        "id": f"x{i}{payload}",
                        "category": payload,
                        "text": f"the cat {payload} sat on a mat {payload} rain",
                    }
                )
                + "\n"
            )
            out.write(
                json.dumps(
                    {
                        "id": f"xc{i}",
                        "messages": [
                            {"role": "user", "content": f"hills {payload}"},
                            {"role": "assistant", "content": f"well certainly {payload} the cat"},
                        ],
                    }
                )
                + "\n"
            )
    return file_corpus(folder, tiny_subject, ctx_len=48)


def write_report(store_path, run_id, out, tiny_subject, tset):
    with Store(store_path, read_only=True) as store:
        return report_stage(
            store, run_id, out, ReportConfig(), tiny_subject.tokenizer, tiny_subject, tset, show_progress=False
        )


def plant_later_stages(store: Store, run_id: str, corpus_id: str, tokenizer) -> None:
    """Rows the label, cluster and audit stages would write, with payloads wherever a string goes."""
    store.update_run(run_id, corpus_id=corpus_id, transcoder_id="tc-test")
    stamp = datetime.now(UTC)
    store.con.execute(
        "INSERT OR REPLACE INTO transcoders VALUES ('tc-test', 'planted', NULL, 'tiny-llama', 32, 16, "
        "[1], 'relu', 'mlp_in', 'mlp_out', MAP([1], [0.25]), MAP([1], [9.0]), MAP([1], [0.0625]), NULL)"
    )
    labels = {2: "the word cat", 5: PAYLOADS[1], 7: PAYLOADS[0], 9: "dense random direction"}
    store.upsert(
        "labels",
        [
            {
                "run_id": run_id,
                "layer": LAYER,
                "feature": f,
                "labeler": "test",
                "label": text,
                "explanation": f"explains {PAYLOADS[2]}",
                "status": "ok",
                "created_at": stamp,
            }
            for f, text in labels.items()
        ],
    )
    store.upsert(
        "scores",
        [
            {
                "run_id": run_id,
                "layer": LAYER,
                "feature": f,
                "labeler": "test",
                "scorer": scorer,
                "value": value,
                "n": 30,
                "status": "ok",
                "unreliable": value < 0.6,
                "details_json": "{}",
                "ci_low": value - 0.12,
                "ci_high": min(value + 0.07, 1.0),
                "accuracy": value - 0.05,
            }
            for f in labels
            for scorer, value in (("detection", 0.9 if f == 2 else 0.5), ("embedding", 0.8))
        ],
    )
    store.upsert(
        "scores",
        [
            {
                "run_id": run_id,
                "layer": LAYER,
                "feature": 2,
                "labeler": "another",
                "scorer": "detection",
                "value": 0.1,
                "n": 30,
                "status": "ok",
                "unreliable": True,
            }
        ],
    )  # another labeler's label
    store.upsert(
        "llm_calls",
        [
            {
                "call_id": f"c{i}",
                "run_id": run_id,
                "stage": "label",
                "model": "test",
                "tokens_in": 100,
                "tokens_out": 20,
                "cost_usd": 0.001,
                "status": "ok",
                "cached": False,
                "created_at": stamp,
            }
            for i in range(3)
        ],
    )
    store.upsert(
        "feature_map",
        [
            {
                "run_id": run_id,
                "layer": LAYER,
                "feature": f,
                "umap_x": float(f % 4),
                "umap_y": float(f // 4),
                "cluster_id": f % 3,
                "reliable": True,
            }
            for f in range(16)
        ],
    )
    store.upsert(
        "feature_map",
        [
            {
                "run_id": run_id,
                "layer": 2,
                "feature": f,
                "umap_x": 4 + (f % 71) / 10,
                "umap_y": (f % 53) / 10,
                "cluster_id": 0,
                "reliable": False,
            }
            for f in range(6000)
        ],
    )
    store.upsert(
        "clusters",
        [
            {"run_id": run_id, "cluster_id": c, "name": name, "description": PAYLOADS[0], "size": 5}
            for c, name in enumerate(["animals", PAYLOADS[2], "weather"])
        ],
    )
    store.upsert(
        "groups",
        [
            {"run_id": run_id, "group_name": name, "layer": LAYER, "feature": f, "similarity": 0.7, "lift": 3.0}
            for name, f in (("sycophancy", 5), ("sycophancy", 7), (PAYLOADS[1], 9))
        ],
    )
    findings = []
    for rank, (f, section) in enumerate(((5, "pervasive"), (7, "pervasive"), (9, "template"))):
        for metric, value, low, high in (
            ("assistant_turn_share", 0.8, 0.7, 0.9),
            ("lift_vs_user", 4.0, 3.0, 5.0),
            ("lift_vs_text", 6.0, 4.0, 8.0),
            ("breadth", 0.75, None, None),
        ):
            findings.append(
                {
                    "run_id": run_id,
                    "audit": "assistant_pervasiveness",
                    "layer": LAYER,
                    "feature": f,
                    "metric": metric,
                    "value": value,
                    "ci_low": low,
                    "ci_high": high,
                    "flagged": f == 5,
                    "details_json": "{}",
                    "section": section,
                    "rank": rank + 1,
                    "group_name": "sycophancy" if f != 9 else PAYLOADS[1],
                    "label": labels[f],
                }
            )
    evidence = {
        "run_id": run_id,
        "audit": "assistant_pervasiveness",
        "layer": LAYER,
        "feature": 5,
        "flagged": True,
        "section": "pervasive",
        "rank": 1,
    }
    findings += [
        evidence
        | {
            "metric": "ablation_kl",
            "value": 0.0614,
            "ci_low": 0.0487,
            "ci_high": 0.0741,
            "details_json": json.dumps({"causal": True}),
        },
        evidence | {"metric": "influence_share", "value": 0.125, "ci_low": 0.05, "ci_high": 0.2, "details_json": "{}"},
    ]
    # A category-restricted audit: its own lift column, no breadth.
    for metric, value in (("assistant_turn_share", 0.9), ("lift_vs_other_categories", 7.5), ("lift_vs_user", 3.0)):
        findings.append(
            {
                "run_id": run_id,
                "audit": "recipe_specificity",
                "layer": LAYER,
                "feature": 7,
                "metric": metric,
                "value": value,
                "ci_low": value / 2,
                "ci_high": value,
                "flagged": True,
                "details_json": "{}",
                "section": "pervasive",
                "rank": 1,
                "label": labels[7],
            }
        )
    store.upsert("audit_findings", findings)
    diff = {
        "run_id": run_id,
        "against_run_id": "earlier",
        "change": "became_pervasive",
        "against_layer": LAYER,
        "match": "identity",
        "cosine": 1.0,
        "details_json": "{}",
    }
    store.upsert(
        "audit_diffs",
        [
            diff | {"audit": "assistant_pervasiveness", "layer": LAYER, "feature": 5, "against_feature": 5},
            diff | {"audit": "recipe_specificity", "layer": LAYER, "feature": 7, "against_feature": 7},
        ],
    )
    store.upsert("interventions", intervention_rows(run_id))
    store.upsert(
        "scores",
        [
            {
                "run_id": run_id,
                "layer": LAYER,
                "feature": 5,
                "labeler": "test",
                "scorer": "steering",
                "value": 0.75,
                "n": 4,
                "status": "ok",
                "unreliable": False,
                "details_json": "{}",
            }
        ],
    )
    # One top example made of a payload, so escaping is checked on highlighted tokens whatever the transcoder found.
    ids = tokenizer(PAYLOADS[0] + PAYLOADS[1], add_special_tokens=False)["input_ids"]
    store.upsert(
        "examples",
        [
            {
                "run_id": run_id,
                "layer": LAYER,
                "feature": 7,
                "kind": "top",
                "rank": 0,
                "doc_id": "planted",
                "turn": 1,
                "role": "assistant",
                "start": 0,
                "tokens": ids,
                "acts": [float(i % 5) for i in range(len(ids))],
                "max_act": 4.0,
            }
        ],
    )


# Ablation KL of feature 5 at its three active prompts (the first two peak in assistant turns): over all three
# the 95% interval clears CAUSAL_KL, over the assistant two it reaches 0.
ACTIVE_KL = (0.0512, 0.0614, 0.0716)


def intervention_rows(run_id: str) -> list[dict]:
    """What `autolabel intervene` stores for feature 5: three active prompts and a silent one, each ablated and
    steered at 2x and 8x, with payloads in the prompts, continuations and token lists."""
    rows = []
    for kind, index, role in (
        ("active", 0, "assistant"),
        ("active", 1, "assistant"),
        ("active", 2, "user"),
        ("neutral", 0, "text"),
    ):
        for setting, multiple in (("ablate", 0.0), ("steer", 2.0), ("steer", 8.0)):
            kl = ACTIVE_KL[index] if (kind, setting) == ("active", "ablate") else 0.25 * multiple + index / 100
            rows.append(
                {
                    "run_id": run_id,
                    "layer": LAYER,
                    "feature": 5,
                    "prompt_kind": kind,
                    "prompt_index": index,
                    "setting": setting,
                    "multiple": multiple,
                    "doc_id": f"d{index}{PAYLOADS[2]}",
                    "role": role,
                    "prompt_tokens": [1, 2, 3],
                    "prompt_text": f"{kind} prompt {index} {PAYLOADS[0]}",
                    "act": 2.5,
                    "new_act": 3.0 * multiple,
                    "kl": kl,
                    "kl_firing": kl / 2 if setting == "ablate" else None,
                    "n_firing": 3 if setting == "ablate" else None,
                    "top_up": json.dumps(
                        [{"token": f" up{multiple:g}{PAYLOADS[1]}", "id": 9, "clean": 0.01, "intervened": 0.2}]
                    ),
                    "top_down": json.dumps([{"token": f" down{multiple:g}", "id": 8, "clean": 0.3, "intervened": 0.1}]),
                    "clean_text": f" clean {kind} {index} {PAYLOADS[1]}",
                    "intervened_text": f" {setting} {multiple:g}x {kind} {index}",
                    "settings": "test",
                }
            )
    return rows


@pytest.fixture(scope="module")
def reports(corpus, tiny_subject, planted, collected, tmp_path_factory, monkeypatch_module):
    """(bare, full) report folders: one before the later stages' rows exist, one after."""
    monkeypatch_module.setenv("OPENAI_API_KEY", SECRET)
    store_path, corpus_id, _ = corpus
    tset, _ = planted
    run_id, _ = collected
    out = tmp_path_factory.mktemp("reports")
    bare = write_report(store_path, run_id, out / "bare", tiny_subject, tset)
    with Store(store_path) as store:
        plant_later_stages(store, run_id, corpus_id, tiny_subject.tokenizer)
    full = write_report(store_path, run_id, out / "full", tiny_subject, tset)
    return bare, full


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def browser():
    chromium = Chromium()
    yield chromium
    chromium.close()


class Tags(HTMLParser):
    """The elements a page really contains, as a browser's parser sees them."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()
        self.handlers: list[tuple[str, str]] = []
        self.scripts: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.names.add(tag)
        self.handlers += [(tag, name) for name, _ in attrs if name.startswith("on")]
        if tag == "script":
            self.scripts.add(dict(attrs).get("src") or dict(attrs).get("type") or "inline")


def all_text(folder) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.html")))


def test_sections_say_not_run_before_their_stages(reports):
    bare, _ = reports
    index = bare.index.read_text(encoding="utf-8")
    for section in (
        "audit (no audit_findings",
        "cluster (no feature_map",
        "group tagging",
        "audit diff",
        "label (no LLM calls)",
        "label scoring",
        "transcoder check",
        "graph (none for this run",
    ):
        assert f"not run: {section}" in index, section
    assert bare.pages == 16 and len(list((bare.index.parent / "features").glob("*.html"))) == 16


def test_pages_are_self_contained_escaped_and_secret_free(reports):
    _, full = reports
    folder = full.index.parent
    assert {p.name for p in (folder / "static").iterdir()} == {"report.css", "report.js", "graph.js", "plotly.min.js"}
    text = all_text(folder)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing from the network
    assert SECRET not in text and SECRET not in (folder / "static" / "report.js").read_text()
    for payload in PAYLOADS:
        assert payload not in text
    for page in folder.rglob("*.html"):
        tags = Tags()
        tags.feed(page.read_text(encoding="utf-8"))
        assert not tags.handlers and "img" not in tags.names, page  # no event handler, no planted element
        assert tags.scripts <= {"static/plotly.min.js", "static/report.js", "application/json"}, page
    assert "&lt;img src=x onerror=" in text  # shown, as text
    index = full.index.read_text(encoding="utf-8")
    (search,) = re.findall(r'<script type="application/json" id="search-data">(.*?)</script>', index, re.DOTALL)
    assert "<" not in search and "\\u003cimg" in search
    assert json.loads(search)["rows"][5][2] == PAYLOADS[1]  # the JSON still round-trips


def test_feature_page_shows_highlights_scores_outputs_and_neighbours(reports):
    _, full = reports
    page = (full.index.parent / "features" / f"{LAYER}-2.html").read_text(encoding="utf-8")
    marks = re.findall(r'<mark class="h\d" title="[^"]+">([^<]*)</mark>', page)
    assert marks and set(marks) == {" cat"}  # the planted detector lights up on " cat" and nothing else
    assert 'data-role="text"' in page and 'data-role="assistant"' in page
    assert "the word cat" in page and "detection" in page and "labeled by test" in page
    # AUROC with its interval and the held-out accuracy; the score of another labeler's label is not shown
    assert re.search(
        r"<td>detection</td><td class=\"num\">0\.9</td>\s*<td class=\"num\">0\.78–0\.97</td>\s*"
        r"<td class=\"num\">0\.85</td><td class=\"num\">30</td>",
        page,
    )
    assert page.count("<td>detection</td>") == 1
    assert page.count('class="tok up"') == 10 and page.count('class="tok down"') == 10
    assert len(re.findall(r'<td><a href="../features/1-\d+.html">', page)) == 5  # nearest by decoder cosine
    assert 'href="1-1.html" rel="prev"' in page and 'href="1-3.html" rel="next"' in page
    unreliable = (full.index.parent / "features" / f"{LAYER}-5.html").read_text(encoding="utf-8")
    assert "⚠ unreliable" in unreliable and "sycophancy" in unreliable


def test_an_intervened_features_page_shows_its_continuations_kl_and_token_changes(reports):
    bare, full = reports
    for page in (bare.index.parent / "features").glob("*.html"):  # no interventions stored yet: no section
        assert "interventions" not in page.read_text(encoding="utf-8"), page
    assert "interventions" not in (full.index.parent / "features" / f"{LAYER}-2.html").read_text(encoding="utf-8")
    page = (full.index.parent / "features" / f"{LAYER}-5.html").read_text(encoding="utf-8")
    (section,) = re.findall(r'<section class="interventions" id="interventions">(.*?)</section>', page, re.DOTALL)
    # The summary, read through intervene.evidence: causal over all three active prompts (mean 0.0614), only
    # correlational over the two in assistant turns; then the judge's steering score.
    assert re.search(
        r"ablation KL where it fires: <strong class=\"num\">0.0614</strong>.*?over 3 prompts.*?"
        r'<span class="causal">causal</span>',
        section,
        re.DOTALL,
    )
    assert re.search(
        r"in assistant turns \(as the audit measures it\): <strong class=\"num\">0.0563</strong>.*?"
        r"over 2 prompts.*?correlational",
        section,
        re.DOTALL,
    )
    assert re.search(r'steering score .*?<strong class="num">0.75</strong>', section, re.DOTALL)
    # Per prompt, active first: the escaped prompt, the clean continuation, then ablated and each steered one.
    prompts = re.findall(r'<div class="ex prompt">(.*?)</div>', section)
    assert prompts == [
        f"{kind} prompt {i} &lt;script&gt;window.__xss = &#34;script&#34;; document.title = "
        f"&#34;pwned&#34;&lt;/script&gt;"
        for kind, i in (("active", 0), ("active", 1), ("active", 2), ("neutral", 0))
    ]
    rows = re.findall(r'<tr class="(\w+)"><td>(.*?)</td>\s*<td class="ex">(.*?)</td>', section, re.DOTALL)
    assert [(kind, text) for kind, _, text in rows[:4]] == [
        ("clean", " clean active 0 &lt;img src=x onerror=&#34;window.__xss = &#39;img&#39;&#34;&gt;"),
        ("ablate", " ablate 0x active 0"),
        ("steer", " steer 2x active 0"),
        ("steer", " steer 8x active 0"),
    ]
    assert [setting.split(" <")[0] for _, setting, _ in rows[:4]] == ["clean", "ablated", "steered 2×", "steered 8×"]
    assert len(rows) == 16
    assert "0.0512" in section and "0.0256" in section and "(3 tokens)" in section  # KL, and where it fires
    assert re.search(r'<code class="tok up" title="0.01 → 0.2"> up8&lt;img src=x', section)
    assert '<code class="tok down" title="0.3 → 0.1"> down0</code>' in section


def test_audit_and_diff_tables_show_each_audits_metrics_and_the_causal_and_influence_evidence(reports):
    _, full = reports
    html = full.index.read_text(encoding="utf-8")

    def table(selector: str) -> str:
        start = html.index(selector)
        return html[start : html.index("</table>", start)]

    pervasive = table('data-audit="assistant_pervasiveness" data-section="pervasive"')
    scoped = table('data-audit="recipe_specificity" data-section="pervasive"')
    assert "lift vs text" in pervasive and "breadth" in pervasive and "lift vs other categories" not in pervasive
    assert "lift vs other categories" in scoped and "breadth" not in scoped and "7.5 <span" in scoped
    assert '0.0614 <span class="muted">[0.0487, 0.0741]</span>' in pervasive  # feature 5's ablation
    assert "12.5%" in pervasive and "correlational" not in pervasive  # its interval clears CAUSAL_KL
    changes = table('data-audit="assistant_pervasiveness" data-change="became_pervasive"')
    assert "L1/5" in changes and "0.0614" in changes and "12.5%" in changes
    scoped_changes = table('data-audit="recipe_specificity" data-change="became_pervasive"')
    assert "L1/7" in scoped_changes and "L1/5" not in scoped_changes
    assert "assistant_pervasiveness: became pervasive" in html and "recipe_specificity: became pervasive" in html


def test_index_in_chromium_audit_map_search_and_click_through(reports, browser, tmp_path):
    _, full = reports
    index_url = full.index.as_uri()
    browser.open(index_url)
    browser.wait_until("document.querySelector('#feature-map .main-svg') !== null")
    pervasive = "table.audit[data-audit=assistant_pervasiveness]"
    assert browser.evaluate(f"document.querySelectorAll('{pervasive}[data-section=pervasive] tbody tr').length") == 2
    assert browser.evaluate(f"document.querySelectorAll('{pervasive}[data-section=template] tbody tr').length") == 1
    # 6,016 points: above 5k the map is WebGL, whose shader code Plotly generates at run time; the page's
    # Content-Security-Policy must allow that (without 'unsafe-eval' it said "WebGL is not supported").
    assert browser.evaluate("document.querySelectorAll('#feature-map canvas').length") > 0
    assert "WebGL is not supported" not in browser.evaluate("document.getElementById('feature-map').textContent")
    assert browser.evaluate("document.querySelectorAll('#results tbody tr').length") == 16
    browser.evaluate(
        "const q = document.getElementById('q'); q.value = 'word cat';q.dispatchEvent(new Event('input'));"
    )
    assert browser.evaluate("[...document.querySelectorAll('#results tbody tr')].map(r => r.cells[0].textContent)") == [
        "L1/2"
    ]
    png = browser.screenshot()
    (tmp_path / "index.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # A click on a map point opens its feature page; back returns to the index.
    browser.evaluate(
        "document.getElementById('feature-map').emit('plotly_click', {points: [{customdata: 'features/1-2.html'}]})"
    )
    browser.wait_for_event("Page.loadEventFired")
    assert browser.evaluate("location.href").endswith("/features/1-2.html")
    assert browser.evaluate("document.getElementById('label').textContent.trim()") == "the word cat"
    browser.evaluate("document.getElementById('back').click()")
    browser.wait_for_event("Page.loadEventFired")
    assert browser.evaluate("location.href") == index_url


def test_no_planted_script_runs_in_chromium(reports, browser):
    _, full = reports
    folder = full.index.parent
    for page in [
        full.index,
        folder / "features" / f"{LAYER}-5.html",
        folder / "features" / f"{LAYER}-7.html",
        *sorted((folder / "features").glob("*.html")),
    ]:
        browser.open(page.as_uri())
        # A control image with the payloads' broken src, added last: once its error handler has run, any
        # payload image's would have too (the page's load event already waited for the markup's own).
        browser.evaluate(
            "(() => { const probe = document.createElement('img');"
            "probe.onerror = () => { window.__probe = true }; probe.src = 'x';"
            "document.body.append(probe); })()"
        )
        browser.wait_until("window.__probe === true")
        assert browser.evaluate("window.__xss === undefined && document.title !== 'pwned'"), page
    browser.open(full.index.as_uri())
    browser.wait_until("document.querySelector('#feature-map .main-svg') !== null")
    browser.evaluate(
        "const s = document.getElementById('map-colour'); s.value = 'group';s.dispatchEvent(new Event('change'));"
    )
    legend = browser.evaluate("[...document.querySelectorAll('#feature-map .legendtext')].map(t => t.textContent)")
    assert PAYLOADS[1] in legend  # the group name is drawn as text
    # Hover the real mouse over feature 5's point: Plotly shows its label, which holds a payload.
    x, y = browser.evaluate(
        "(() => { const gd = document.getElementById('feature-map'), url = 'features/1-5.html';"
        "gd.scrollIntoView(); const layout = gd._fullLayout, box = gd.getBoundingClientRect();"
        "const trace = gd.data.find(t => t.customdata.includes(url)), i = trace.customdata.indexOf(url);"
        "return [box.left + layout._size.l + layout.xaxis.l2p(trace.x[i]),"
        "        box.top + layout._size.t + layout.yaxis.l2p(trace.y[i])]; })()"
    )
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    browser.wait_until("document.querySelector('#feature-map .hoverlayer .hovertext') !== null")
    hover = browser.evaluate("document.querySelector('#feature-map .hoverlayer .hovertext').textContent")
    assert PAYLOADS[1] in hover  # the label in the hover box, as text
    assert browser.evaluate("window.__xss === undefined")
    browser.open((folder / "features" / f"{LAYER}-5.html").as_uri())
    assert browser.evaluate("document.getElementById('label').textContent.trim()") == PAYLOADS[1]
    # The interventions section draws each payload as text: the prompts, and the continuations beside each other.
    assert (
        browser.evaluate("[...document.querySelectorAll('#interventions .prompt')].map(p => p.textContent)")[0]
        == f"active prompt 0 {PAYLOADS[0]}"
    )
    assert browser.evaluate("document.querySelectorAll('#interventions table.continuations tbody tr').length") == 16
    assert (
        browser.evaluate("document.querySelector('#interventions tr.clean td.ex').textContent")
        == f" clean active 0 {PAYLOADS[1]}"
    )


def test_serve_binds_to_loopback_only(reports):
    _, full = reports
    server = make_server(full.index.parent.parent, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{full.run_id}/index.html", timeout=10) as response:
            assert b"Feature map" in response.read()
    finally:
        server.shutdown()
        server.server_close()


def test_cli_report_bad_input_exits_2_with_the_fix(monkeypatch, capsys, corpus, collected, tmp_path):
    store_path, _, _ = corpus
    code, _, err = run_cli(monkeypatch, capsys, "report", "--store", str(store_path), "--run", "nope", "-q")
    assert code == 2 and "no run 'nope'" in err and "autolabel query" in err
    empty = tmp_path / "empty.duckdb"
    Store(empty).close()
    code, _, err = run_cli(monkeypatch, capsys, "report", "--store", str(empty), "-q")
    assert code == 2 and "no collected features" in err and "autolabel collect" in err
    code, _, err = run_cli(monkeypatch, capsys, "serve", str(tmp_path / "missing"))
    assert code == 2 and "autolabel report" in err


def test_cli_report_writes_the_run_with_its_own_model(monkeypatch, capsys, reports, corpus, collected, tmp_path):
    """The run's stored config names the embedded SmolLM2 and transcoders; the planted layer 1 is not among
    the transcoders' layers, so output tokens and neighbours say "not available" instead of guessing."""
    store_path, _, _ = corpus
    run_id, _ = collected
    code, out, _ = run_cli(
        monkeypatch, capsys, "report", "--store", str(store_path), "--run", run_id, "--out", str(tmp_path), "-q"
    )
    assert code == 0 and "16 feature pages" in out
    page = (tmp_path / run_id / "features" / f"{LAYER}-2.html").read_text(encoding="utf-8")
    assert page.count("not available") == 2 and "the word cat" in page
    assert not list(tmp_path.glob(".*"))  # no partial folder left behind
    for command, promise in (("report", "run_id"), ("serve", "127.0.0.1")):
        code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
        assert code == 0 and promise in out, out
