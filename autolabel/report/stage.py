"""`autolabel report`: write a run's self-contained HTML report, an index plus one page per feature.

The store is opened read-only, so a report can be written while other stages
run. Every asset (CSS, the page script, Plotly's bundle from the installed
`plotly` package) is copied next to the pages: the report opens from disk with
no network. Feature pages are rendered one layer at a time, so memory follows
one layer's examples, not the run's.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from markupsafe import Markup

from autolabel.config import ReportConfig, RunConfig
from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel, load_subject_model
from autolabel.pipeline import collected_run
from autolabel.progress import progress_bar
from autolabel.report import features as page_data
from autolabel.report import graphs as graph_pages
from autolabel.report import render, summary
from autolabel.store import Store
from autolabel.transcoders.outputs import output_token_ids
from autolabel.transcoders.stage import open_transcoders
from autolabel.transcoders.transcoder import TranscoderSet


@dataclass
class ReportSummary:
    run_id: str
    index: Path
    pages: int
    seconds: float


def copy_assets(folder: Path) -> None:
    """The report's CSS and script, and Plotly's own minified bundle (no CDN)."""
    static = folder / "static"
    static.mkdir(parents=True, exist_ok=True)
    for asset in files("autolabel.report").joinpath("static").iterdir():
        (static / asset.name).write_bytes(asset.read_bytes())
    plotly_js = files("plotly").joinpath("package_data", "plotly.min.js")
    if not plotly_js.is_file():
        raise AutolabelError(
            "plotly.min.js is missing from the installed plotly package; reinstall it: pip install plotly"
        )
    (static / "plotly.min.js").write_bytes(plotly_js.read_bytes())


def publish(partial: Path, final: Path) -> Path:
    """Swap the finished report into place: readers never see half a report, and every page was written
    to a new file (rewriting thousands of existing files makes the filesystem flush each one)."""
    previous = final.with_name(f".{final.name}.previous")
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    partial.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def memberships(groups: dict[str, list[dict]], clusters: list[dict], mapped: list[tuple]):
    """Feature -> its groups, and feature -> its cluster (id and name)."""
    groups_of: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for name, members in groups.items():
        for m in members:
            groups_of[(m["layer"], m["feature"])].append({"name": name, "similarity": m["similarity"]})
    names = {c["cluster_id"]: c["name"] for c in clusters}
    cluster_of = {
        (layer, feature): {"id": cid, "name": names.get(cid)}
        for layer, feature, _, _, cid, _ in mapped
        if cid is not None
    }
    return groups_of, cluster_of


def search_index(rows: list[dict], labels: dict, groups_of: dict, cluster_of: dict) -> dict:
    """Compact columns for the page's search and map: one list per feature."""
    entries = []
    for row in rows:
        key = (row["layer"], row["feature"])
        label = labels.get(key) or summary.FeatureLabel()
        cluster = cluster_of.get(key) or {}
        density = row["density"] if row["density"] is not None and math.isfinite(row["density"]) else None
        entries.append(
            [
                row["layer"],
                row["feature"],
                label.label or "",
                label.score,
                label.unreliable,
                row["status"],
                density,
                [g["name"] for g in groups_of.get(key, [])],
                cluster.get("name") or "",
            ]
        )
    return {
        "columns": ["layer", "feature", "label", "score", "unreliable", "status", "density", "groups", "cluster"],
        "rows": entries,
    }


@dataclass
class RunData:
    """What the pages of a run draw on, read once."""

    info: dict
    labels: dict[tuple[int, int], summary.FeatureLabel]
    features: list[dict]
    roles: dict[tuple[int, int], list[dict]]
    groups: dict[str, list[dict]]
    clusters: list[dict]
    mapped: list[tuple]
    groups_of: dict[tuple[int, int], list[dict]]
    cluster_of: dict[tuple[int, int], dict]
    interventions: dict[tuple[int, int], dict]  # intervened features only (page_data.interventions)


def read_run(store: Store, run_id: str) -> RunData:
    groups, clusters, mapped = (
        summary.group_members(store, run_id),
        summary.clusters(store, run_id),
        summary.feature_map(store, run_id),
    )
    return RunData(
        summary.run_info(store, run_id),
        summary.feature_labels(store, run_id),
        page_data.feature_rows(store, run_id),
        page_data.role_density(store, run_id),
        groups,
        clusters,
        mapped,
        *memberships(groups, clusters, mapped),
        page_data.interventions(store, run_id),
    )


def write_layer_pages(
    store: Store,
    run: RunData,
    layer: int,
    rows: list[dict],
    settings: ReportConfig,
    template,
    folder: Path,
    tokenizer,
    pieces: dict[int, str],
    subject: SubjectModel | None,
    tset: TranscoderSet | None,
) -> None:
    """One layer's feature pages: its examples, output tokens and nearest features are computed together."""
    table = page_data.examples_table(store, run.info["run_id"], run.info["corpus_id"], layer, settings)
    alive = [r["feature"] for r in rows if r["status"] != "dead"]
    has_decoder = tset is not None and layer in tset.layers  # else those parts of the pages say "not available"
    outputs = (
        output_token_ids(subject, tset, layer, alive, settings.output_tokens)
        if subject is not None and has_decoder and settings.output_tokens
        else None
    )
    output_ids = {t for pair in (outputs or {}).values() for ids in pair for t in ids}
    render.decode_pieces(tokenizer, page_data.distinct_tokens(table) | output_ids, pieces)
    examples = render.example_lists(table, pieces, {r["feature"]: r["max_act"] for r in rows})
    nearest = page_data.nearest_features(tset, layer, settings.nearest) if has_decoder and settings.nearest else None
    for i, row in enumerate(rows):
        feature = row["feature"]
        key = (layer, feature)
        html = template.render(
            root="../",
            run=run.info,
            f=row,
            label=run.labels.get(key),
            roles=run.roles.get(key, []),
            previous=rows[i - 1]["feature"] if i > 0 else None,
            next=rows[i + 1]["feature"] if i + 1 < len(rows) else None,
            histogram=render.histogram_svg(row["histogram"], row["histogram_edges"]),
            top=examples.get((feature, "top")),
            quantile=examples.get((feature, "quantile")),
            outputs=None
            if outputs is None
            else [
                [Markup(pieces[t]) for t in ids]  # escaped by decode_pieces
                for ids in outputs.get(feature, ([], []))
            ],
            nearest=None
            if nearest is None
            else [(layer, other, cosine, run.labels.get((layer, other))) for other, cosine in nearest.get(feature, [])],
            groups=run.groups_of.get(key, []),
            cluster=run.cluster_of.get(key),
            interventions=run.interventions.get(key),
        )
        (folder / render.page_path(*key)).write_text(html, encoding="utf-8")


def index_html(store: Store, run: RunData, env, graphs: list[dict]) -> str:
    run_id = run.info["run_id"]
    return env.get_template("index.html").render(
        root="",
        run=run.info,
        corpus=summary.corpus_tokens(store, run.info["corpus_id"]),
        ledger=summary.llm_ledger(store, run_id),
        status=summary.feature_status(store, run_id),
        scores=summary.score_distribution(run.labels),
        audits=summary.audits(store, run_id),
        diffs=summary.audit_diffs(store, run_id),
        clusters=run.clusters,
        groups=run.groups,
        labels=run.labels,
        graphs=graphs,
        search=search_index(run.features, run.labels, run.groups_of, run.cluster_of),
        feature_map={
            "columns": ["layer", "feature", "x", "y", "cluster", "reliable"],
            "rows": run.mapped,
            "clusters": {c["cluster_id"]: c["name"] for c in run.clusters},
        },
    )


def report_stage(
    store: Store,
    run_id: str,
    out_dir: Path,
    settings: ReportConfig,
    tokenizer,
    subject: SubjectModel | None = None,
    tset: TranscoderSet | None = None,
    show_progress: bool = True,
) -> ReportSummary:
    """Write out_dir/<run_id>/index.html and a page per feature. Output tokens need `subject` and `tset`,
    nearest features need `tset`; without them those parts of the pages say so."""
    started = time.perf_counter()
    run = read_run(store, run_id)
    folder = out_dir / f".{run_id}.partial"
    shutil.rmtree(folder, ignore_errors=True)  # a report that was interrupted
    (folder / "features").mkdir(parents=True)
    copy_assets(folder)
    env = render.environment()
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for row in run.features:
        by_layer[row["layer"]].append(row)
    pieces: dict[int, str] = {}
    with progress_bar("pages", disable=not show_progress) as bar:
        task = bar.add_task("writing feature pages", total=len(run.features))
        for layer, rows in by_layer.items():
            write_layer_pages(
                store,
                run,
                layer,
                rows,
                settings,
                env.get_template("feature.html"),
                folder,
                tokenizer,
                pieces,
                subject,
                tset,
            )
            bar.advance(task, len(rows))
    graphs = graph_pages.write_graph_pages(
        store, run_id, env.get_template("graph.html"), folder, tokenizer, run.labels, run.cluster_of, run.groups_of
    )
    (folder / "index.html").write_text(index_html(store, run, env, graphs), encoding="utf-8")
    final = publish(folder, out_dir / run_id)
    return ReportSummary(run_id, final / "index.html", len(run.features), time.perf_counter() - started)


def report_run(
    config: RunConfig, run_id: str | None = None, out_dir: Path | None = None, show_progress: bool = True
) -> ReportSummary:
    """Report a run (the latest collected one by default) with the run's own model and transcoders."""
    settings = config.report
    with Store(config.store, read_only=True) as store:
        run_id, stored = collected_run(store, run_id)
        subject = load_subject_model(stored.model.source, config.cache_dir, stored.model.dtype)
        needs_transcoder = settings.output_tokens > 0 or settings.nearest > 0
        tset = open_transcoders(stored.transcoder.source, stored.transcoder.format) if needs_transcoder else None
        return report_stage(
            store, run_id, Path(out_dir or settings.out_dir), settings, subject.tokenizer, subject, tset, show_progress
        )
