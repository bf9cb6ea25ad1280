"""`autolabel report`: write a run's self-contained HTML report, an index plus one page per feature.

The store is opened read-only, so a report can be written while other stages
run. Every asset (CSS, the page script, Plotly's bundle from the installed
`plotly` package) is copied next to the pages: the report opens from disk with
no network. Feature pages are rendered one layer at a time, so memory follows
one layer's examples, not the run's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from autolabel.config import ReportConfig, RunConfig
from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel, load_subject_model
from autolabel.progress import progress_bar
from autolabel.report import features as page_data
from autolabel.report import summary
from autolabel.report.render import decode_pieces, environment, example_html, page_path
from autolabel.store import Store
from autolabel.transcoders.stage import open_transcoders
from autolabel.transcoders.transcoder import TranscoderSet


@dataclass
class ReportSummary:
    run_id: str
    index: Path
    pages: int
    seconds: float


def resolve_run(store: Store, run_id: str | None) -> tuple[str, RunConfig]:
    """The given run, or the latest one with collected features, and the config it ran with."""
    if run_id and store.one("SELECT count(*) FROM runs WHERE run_id = ?", [run_id])[0] == 0:
        raise AutolabelError(f"no run {run_id!r} in {store.path}; list runs with: autolabel query \"select * from runs\"")
    row = store.one("SELECT run_id, config_json FROM runs r WHERE (?::VARCHAR IS NULL OR run_id = ?) "
                    "AND EXISTS (SELECT 1 FROM features f WHERE f.run_id = r.run_id) ORDER BY started_at DESC LIMIT 1",
                    [run_id, run_id])
    if row is None:
        raise AutolabelError(f"{'run ' + run_id if run_id else store.path} has no collected features to report; "
                             "run `autolabel collect` first")
    return row[0], RunConfig.model_validate_json(row[1] or "{}")


def copy_assets(folder: Path) -> None:
    """The report's CSS and script, and Plotly's own minified bundle (no CDN)."""
    static = folder / "static"
    static.mkdir(parents=True, exist_ok=True)
    for asset in files("autolabel.report").joinpath("static").iterdir():
        (static / asset.name).write_bytes(asset.read_bytes())
    plotly_js = files("plotly").joinpath("package_data", "plotly.min.js")
    if not plotly_js.is_file():
        raise AutolabelError("plotly.min.js is missing from the installed plotly package; reinstall it: pip install plotly")
    (static / "plotly.min.js").write_bytes(plotly_js.read_bytes())


def memberships(groups: dict[str, list[dict]], clusters: list[dict], mapped: list[tuple]):
    """Feature -> its groups, and feature -> its cluster (id and name)."""
    groups_of: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for name, members in groups.items():
        for m in members:
            groups_of[(m["layer"], m["feature"])].append({"name": name, "similarity": m["similarity"]})
    names = {c["cluster_id"]: c["name"] for c in clusters}
    cluster_of = {(layer, feature): {"id": cid, "name": names.get(cid)}
                  for layer, feature, _, _, cid, _ in mapped if cid is not None}
    return groups_of, cluster_of


def search_index(rows: list[dict], labels: dict, groups_of: dict, cluster_of: dict) -> dict:
    """Compact columns for the page's search and map: one list per feature."""
    entries = []
    for row in rows:
        key = (row["layer"], row["feature"])
        label = labels.get(key) or summary.FeatureLabel()
        cluster = cluster_of.get(key) or {}
        entries.append([row["layer"], row["feature"], label.label or "", label.score, label.unreliable, row["status"],
                        row["density"], [g["name"] for g in groups_of.get(key, [])], cluster.get("name") or ""])
    return {"columns": ["layer", "feature", "label", "score", "unreliable", "status", "density", "groups", "cluster"],
            "rows": entries}


def report_stage(store: Store, run_id: str, out_dir: Path, settings: ReportConfig, tokenizer,
                 subject: SubjectModel | None = None, tset: TranscoderSet | None = None,
                 show_progress: bool = True) -> ReportSummary:
    """Write out_dir/<run_id>/index.html and a page per feature. Output tokens need `subject` and `tset`,
    nearest features need `tset`; without them those parts of the pages say so."""
    started = time.perf_counter()
    info = summary.run_info(store, run_id)
    labels = summary.feature_labels(store, run_id)
    rows = page_data.feature_rows(store, run_id)
    groups, clusters, mapped = summary.group_members(store, run_id), summary.clusters(store, run_id), summary.feature_map(store, run_id)
    groups_of, cluster_of = memberships(groups, clusters, mapped)
    roles = page_data.role_density(store, run_id)
    folder = out_dir / run_id
    (folder / "features").mkdir(parents=True, exist_ok=True)
    copy_assets(folder)
    env = environment()
    feature_page = env.get_template("feature.html")
    pieces: dict[int, str] = {}
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        by_layer[row["layer"]].append(row)
    with progress_bar("pages", disable=not show_progress) as bar:
        task = bar.add_task("writing feature pages", total=len(rows))
        for layer, layer_rows in by_layer.items():
            table = page_data.examples_table(store, run_id, info["corpus_id"], layer, settings)
            decode_pieces(tokenizer, page_data.distinct_tokens(table), pieces)
            examples = page_data.split_examples(table)
            alive = [r["feature"] for r in layer_rows if r["status"] != "dead"]
            outputs = (page_data.layer_output_tokens(subject, tset, layer, alive, settings.output_tokens)
                       if subject is not None and tset is not None else None)
            nearest = page_data.nearest_features(tset, layer, settings.nearest) if tset is not None else None
            for row in layer_rows:
                key = (layer, row["feature"])
                shown = [(e, example_html(e, pieces, row["max_act"])) for e in examples.get(row["feature"], [])]
                html = feature_page.render(
                    root="../", run=info, f=row, label=labels.get(key), roles=roles.get(key, []),
                    histogram=page_data.histogram_bars(row["histogram"], row["histogram_edges"]),
                    top=[s for s in shown if s[0].kind == "top"], quantile=[s for s in shown if s[0].kind == "quantile"],
                    outputs=None if outputs is None else outputs.get(row["feature"], ([], [])),
                    nearest=None if nearest is None else [(layer, other, cosine, labels.get((layer, other)))
                                                          for other, cosine in nearest.get(row["feature"], [])],
                    groups=groups_of.get(key, []), cluster=cluster_of.get(key))
                (folder / page_path(*key)).write_text(html, encoding="utf-8")
                bar.advance(task)
    index = env.get_template("index.html").render(
        root="", run=info, corpus=summary.corpus_tokens(store, info["corpus_id"]),
        ledger=summary.llm_ledger(store, run_id), status=summary.feature_status(store, run_id),
        scores=summary.score_distribution(labels), audits=summary.audits(store, run_id),
        diffs=summary.audit_diffs(store, run_id), clusters=clusters, groups=groups, labels=labels,
        search=search_index(rows, labels, groups_of, cluster_of),
        feature_map={"columns": ["layer", "feature", "x", "y", "cluster", "reliable"], "rows": mapped,
                     "clusters": {c["cluster_id"]: c["name"] for c in clusters}})
    (folder / "index.html").write_text(index, encoding="utf-8")
    return ReportSummary(run_id, folder / "index.html", len(rows), time.perf_counter() - started)


def report_run(config: RunConfig, run_id: str | None = None, out_dir: Path | None = None,
               show_progress: bool = True) -> ReportSummary:
    """Report a run (the latest collected one by default) with the run's own model and transcoders."""
    settings = config.report
    with Store(config.store, read_only=True) as store:
        run_id, stored = resolve_run(store, run_id)
        subject = load_subject_model(stored.model.source, config.cache_dir, stored.model.dtype)
        needs_transcoder = settings.output_tokens > 0 or settings.nearest > 0
        tset = open_transcoders(stored.transcoder.source, stored.transcoder.format) if needs_transcoder else None
        return report_stage(store, run_id, Path(out_dir or settings.out_dir), settings, subject.tokenizer, subject,
                            tset, show_progress)
