"""`autolabel label`, `audit`, `report`, `serve`, `cluster`, `intervene`, `graph`, `query` and `config`: each a
thin shell over one library stage on a collected run, or over the store or the config (commands of autolabel.cli)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from autolabel.cli_options import ConfigOption, QuietOption, StoreOption, int_list, load_run_config
from autolabel.config import config_yaml, load_config, with_options
from autolabel.errors import AutolabelError
from autolabel.summaries import console, print_audit, print_cluster, print_labels, print_table

commands_app = typer.Typer()


@commands_app.command()
def label(
    config: ConfigOption = None,
    store: StoreOption = None,
    quiet: QuietOption = False,
    run_id: Annotated[str | None, typer.Option("--run", help="A collected run (default: the latest).")] = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default: all).")] = None,
    features: Annotated[str | None, typer.Option(help="Comma-separated feature ids.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many features, densest first.")] = None,
    audit: Annotated[
        str | None, typer.Option(help="Only the features this audit flagged, e.g. assistant_pervasiveness.")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint (default: a local llama.cpp server).")
    ] = None,
    llm_model: Annotated[str | None, typer.Option(help="Model name sent to the endpoint.")] = None,
    labeler_gguf: Annotated[
        Path | None,
        typer.Option(
            help="GGUF for the local server, or labeler:NAME (docs/labelers.md); default: SmolLM2-135M-Instruct."
        ),
    ] = None,
    max_calls: Annotated[int | None, typer.Option(help="Stop cleanly after this many requests.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop cleanly after this many USD.")] = None,
    retry_invalid: Annotated[
        bool,
        typer.Option(
            "--retry-invalid", help="Ask again for labels that never parsed, past the cache (failed ones always are)."
        ),
    ] = False,
) -> None:
    """Draft a label per feature with an LLM and score it on held-out examples (detection, fuzzing, embedding)."""
    from autolabel.pipeline import label_run

    run_config = load_run_config(config, store)
    settings, llm = run_config.label, run_config.llm
    settings.layers = int_list(layers, "--layers") or settings.layers
    settings.features = int_list(features, "--features") or settings.features
    settings.limit = limit or settings.limit
    settings.audit = audit or settings.audit
    settings.retry_invalid = retry_invalid or settings.retry_invalid
    llm.base_url = base_url or llm.base_url
    llm.model = llm_model or llm.model
    llm.gguf = str(labeler_gguf) if labeler_gguf else llm.gguf
    llm.max_calls = llm.max_calls if max_calls is None else max_calls
    llm.max_cost_usd = llm.max_cost_usd if max_cost is None else max_cost
    print_labels(label_run(run_config, run_id, show_progress=not quiet))


@commands_app.command()
def audit(
    config: ConfigOption = None,
    store: StoreOption = None,
    run_id: Annotated[str | None, typer.Option("--run", help="A collected run (default: the latest).")] = None,
    against: Annotated[str | None, typer.Option(help="Diff against this run id, 'previous' or 'none'.")] = None,
    spec: Annotated[
        list[Path] | None, typer.Option(help="Audit spec YAML (repeatable; default: the config's).")
    ] = None,
) -> None:
    """Rank features pervasive in assistant contexts (with 95% intervals) and diff against an earlier run."""
    from autolabel.pipeline import audit_run
    from autolabel.store import Store

    run_config = load_run_config(config, store)
    if spec:
        run_config.audit.specs = [str(path) for path in spec]
    if against:
        run_config.audit.against = None if against == "none" else against
    with Store(run_config.store, create=False) as db:
        print_audit(audit_run(db, run_config, run_id))


@commands_app.command()
def report(
    config: ConfigOption = None,
    store: StoreOption = None,
    quiet: QuietOption = False,
    run_id: Annotated[str | None, typer.Option("--run", help="A collected run (default: the latest).")] = None,
    out: Annotated[Path | None, typer.Option(help="Reports folder (default: report.out_dir, reports/).")] = None,
) -> None:
    """Write a run's self-contained HTML report: OUT/<run_id>/index.html plus one page per feature."""
    from autolabel.report.stage import report_run

    summary = report_run(load_run_config(config, store), run_id, out, show_progress=not quiet)
    console.print(
        f"run [bold]{summary.run_id}[/]: {summary.pages:,} feature pages in {summary.seconds:.1f} s; "
        f"open {escape(str(summary.index))}"
    )


@commands_app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="Reports folder to serve.")] = Path("reports"),
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 8000,
) -> None:
    """Serve a reports folder on 127.0.0.1 (only) until interrupted."""
    from autolabel.report.serve import make_server

    server = make_server(folder, port)
    console.print(f"serving {escape(str(folder))} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@commands_app.command()
def cluster(
    config: ConfigOption = None,
    store: StoreOption = None,
    quiet: QuietOption = False,
    run_id: Annotated[str | None, typer.Option("--run", help="A collected run (default: the latest).")] = None,
    seed: Annotated[int | None, typer.Option(help="UMAP seed; a re-run with another seed records the ARI.")] = None,
    embedding: Annotated[str | None, typer.Option(help="label or label+decoder.")] = None,
    groups: Annotated[
        Path | None, typer.Option(help="Audit group spec YAML (default: the built-in groups.yaml).")
    ] = None,
    no_names: Annotated[bool, typer.Option("--no-names", help="Do not ask the LLM for cluster names.")] = False,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint (default: a local llama.cpp server).")
    ] = None,
    llm_model: Annotated[str | None, typer.Option(help="Model name sent to the endpoint.")] = None,
) -> None:
    """Lay features out on a 2-D map (MiniLM + UMAP), cluster them (HDBSCAN), name the clusters with an LLM,
    and tag the audit groups (the built-in groups.yaml, or --groups)."""
    from autolabel.pipeline import cluster_run

    run_config = load_run_config(config, store)
    settings = run_config.cluster
    if embedding is not None and embedding not in {"label", "label+decoder"}:
        raise AutolabelError(f"--embedding must be label or label+decoder, not {embedding!r}")
    settings.embedding = embedding or settings.embedding
    settings.seed = settings.seed if seed is None else seed
    settings.groups = str(groups) if groups else settings.groups
    settings.name_clusters = settings.name_clusters and not no_names
    run_config.llm.base_url = base_url or run_config.llm.base_url
    run_config.llm.model = llm_model or run_config.llm.model
    print_cluster(cluster_run(run_config, run_id, show_progress=not quiet))


@commands_app.command()
def intervene(
    config: ConfigOption = None,
    store: StoreOption = None,
    quiet: QuietOption = False,
    run_id: Annotated[str | None, typer.Option("--run", help="A collected run (default: the latest).")] = None,
    features: Annotated[str | None, typer.Option(help="LAYER:FEATURE pairs, e.g. 6:12,15:3.")] = None,
    audit: Annotated[
        str | None,
        typer.Option(
            help="This audit's flagged features, best ranked first (default, with no --features: every audit's)."
        ),
    ] = None,
    multiples: Annotated[
        str | None, typer.Option(help="Steering strengths in units of the feature's max activation, e.g. 2,4,8.")
    ] = None,
    prompts: Annotated[
        int | None, typer.Option(help="Prompts of each kind per feature: where it fires, and where it is silent.")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Greedy continuation length.")] = None,
    no_judge: Annotated[bool, typer.Option("--no-judge", help="No steering score (no LLM calls).")] = False,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint for the judge (default: a local llama.cpp server).")
    ] = None,
    llm_model: Annotated[str | None, typer.Option(help="Judge model name sent to the endpoint.")] = None,
) -> None:
    """Ablate and steer features on prompts where they fire and where they are silent: KL against the clean
    run, the tokens that rise and fall, continuations with and without; score labels by steering."""
    from autolabel.intervene.command import TABLE_TITLE, intervene_run, summary_rows
    from autolabel.intervene.targets import parse_features, parse_multiples

    if features and audit:
        raise AutolabelError("pass --features or --audit, not both")
    run_config = load_run_config(config, store)
    keys = parse_features(features) if features else None
    run_config.intervene = with_options(
        run_config.intervene,
        "intervene",
        multiples=parse_multiples(multiples) if multiples is not None else None,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        judge=False if no_judge else None,
    )
    run_config.llm.base_url = base_url or run_config.llm.base_url
    run_config.llm.model = llm_model or run_config.llm.model
    summary = intervene_run(run_config, run_id, keys, audit, show_progress=not quiet)
    print_table(TABLE_TITLE, *summary_rows(summary, run_config.intervene.multiples))
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(
        f"run [bold]{summary.run_id}[/]: {summary.computed} features run now, {summary.reused} already "
        f"stored; {summary.judged} steering scores, {summary.calls} requests, ${summary.cost_usd:.4f}, "
        f"{summary.seconds:.0f} s; rows in interventions"
    )
    if summary.stopped:
        console.print(f"[yellow]judging stopped early:[/] {escape(summary.stopped)}; the same command resumes")


@commands_app.command()
def graph(
    prompt: Annotated[str | None, typer.Argument(help="The text whose next token the graph explains.")] = None,
    chat: Annotated[
        Path | None,
        typer.Option(
            help="A chat instead: JSON list of {role, content} messages, rendered with the model's chat template."
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run", help="A collected run: its model, transcoders and labels (default: the config's, no labels)."
        ),
    ] = None,
    max_logits: Annotated[int | None, typer.Option(help="Target logits: at most this many next tokens.")] = None,
    node_threshold: Annotated[float | None, typer.Option(help="Keep nodes holding this share of influence.")] = None,
    edge_threshold: Annotated[float | None, typer.Option(help="Keep edges holding this share of influence.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write circuit-tracer's graph JSON here.")
    ] = None,
    feature: Annotated[
        str | None,
        typer.Option(
            help="Instead of a prompt: LAYER:FEATURE pairs (e.g. 6:12,15:3), "
            "each traced on the prompts where it fires most."
        ),
    ] = None,
    audit: Annotated[str | None, typer.Option(help="Instead of a prompt: this audit's flagged features.")] = None,
    prompts: Annotated[int, typer.Option(min=1, help="With --feature / --audit: top examples per feature.")] = 4,
    limit: Annotated[int, typer.Option(min=1, help="With --audit: its best-ranked flagged features.")] = 8,
    config: ConfigOption = None,
    store: StoreOption = None,
) -> None:
    """Attribution graph of a prompt over the transcoder features (frozen attention and norms, error nodes,
    pruned by influence on the top logits), stored in graphs / graph_nodes / graph_edges, labeled by the run.
    With --feature or --audit: each feature's influence share on the graphs of its top examples."""
    from autolabel.graph.command import feature_rows, feature_run, graph_run, summary_rows
    from autolabel.intervene.targets import parse_features

    run_config = load_run_config(config, store)
    run_config.graph = with_options(
        run_config.graph, "graph", max_logits=max_logits, node_threshold=node_threshold, edge_threshold=edge_threshold
    )
    if feature is not None or audit is not None:
        if prompt is not None or chat is not None or json_out is not None or (feature and audit):
            raise AutolabelError(
                "--feature or --audit (one of them) traces each feature on its own top examples: "
                "pass no PROMPT, --chat or --json with it"
            )
        traced = feature_run(run_config, run_id, parse_features(feature) if feature else None, audit, prompts, limit)
        print_table(
            "influence share on the next token where the feature fires most (on path: kept by pruning)",
            *feature_rows(traced),
        )
        console.print(
            f"run [bold]{traced.run_id}[/]: {len(traced.rows)} graphs; rows in feature_graphs (with their "
            f"graph_id), an influence_share finding beside each audit finding of these features"
        )
        return
    result = graph_run(run_config, prompt, chat, run_id, json_out)
    summary = result.summary
    targets = ", ".join(f"{t['token']!r} {t['probability']:.2f}" for t in result.targets)
    console.print(f"targets: {escape(targets)}", soft_wrap=True)
    print_table(f"top features of graph {summary.graph_id}", *summary_rows(result))
    console.print(
        f"graph [bold]{summary.graph_id}[/] ({'stored earlier' if summary.reused else f'{summary.seconds:.1f} s'}): "
        f"{summary.n_tokens} tokens, {summary.kept_features} of {summary.n_features} feature nodes and "
        f"{summary.kept_edges} edges kept; error nodes hold {summary.error_share:.0%} of the influence"
        + ("" if result.run_id else "; pass --run to label the features")
    )
    if result.exported:
        console.print(f"circuit-tracer graph JSON: {escape(str(result.exported))}", soft_wrap=True)


@commands_app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL to run on a read-only connection.")],
    store: StoreOption = None,
    config: ConfigOption = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table, csv or json.")] = "table",
) -> None:
    """Run SQL against the store and print the result. Read-only, and sandboxed: no COPY TO files, no ATTACH,
    no reading other files (use duckdb itself to join the store with your own files)."""
    from autolabel.store import Store

    if format not in {"table", "csv", "json"}:
        raise AutolabelError(f"--format must be table, csv or json, not {format!r}")
    with Store(load_run_config(config, store).store, read_only=True, sandboxed=True) as db:
        columns, rows = db.query(sql)
    if format == "table":
        print_table("", columns, rows)
    elif format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        sys.stdout.write(buffer.getvalue())
    else:
        sys.stdout.write(
            json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str, indent=1) + "\n"
        )


@commands_app.command("config")
def show_config(config: ConfigOption = None) -> None:
    """Print the effective run config as YAML (the defaults when no --config is given)."""
    sys.stdout.write(config_yaml(load_config(config)))
