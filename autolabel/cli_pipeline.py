"""`autolabel run`, `collect` and `schedule`: the commands that start the audit_pipeline Prefect flow (commands
of autolabel.cli)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from autolabel.cli_flows import prefect_flows
from autolabel.cli_options import ConfigOption, ModelOption, QuietOption, StoreOption, load_run_config
from autolabel.config import RunConfig
from autolabel.errors import AutolabelError
from autolabel.summaries import (
    console,
    print_audit,
    print_cluster,
    print_collect,
    print_corpus_summary,
    print_labels,
    print_quality,
    print_table,
)

pipeline_app = typer.Typer()

ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue the latest unfinished run (or --run) with its own config.")
]
RunOption = Annotated[str | None, typer.Option("--run", help="The run to resume (default: the latest unfinished one).")]


FreshOption = Annotated[bool, typer.Option("--fresh", help="Collect again even if an identical collection is cached.")]
RunnerOption = Annotated[
    str, typer.Option("--task-runner", help="local, or dask: collection in slices on Dask workers.")
]
AddressOption = Annotated[
    str | None, typer.Option("--dask-address", help="A Dask scheduler (default: a local cluster).")
]
WorkersOption = Annotated[int, typer.Option("--workers", help="Slices of collection (and local Dask workers).")]


def _run_flow(
    config: RunConfig,
    quiet: bool,
    resume: bool,
    run_id: str | None,
    fresh: bool,
    until: str,
    task_runner: str,
    dask_address: str | None,
    workers: int,
):
    """The audit_pipeline Prefect flow, from this process (Prefect starts a temporary local API unless
    PREFECT_API_URL names a server)."""
    if task_runner not in {"local", "dask"}:
        raise AutolabelError(f"--task-runner must be local or dask, not {task_runner!r}")
    if workers < 1:
        raise AutolabelError(f"--workers must be at least 1, not {workers}")
    flows = prefect_flows()
    pipeline_flow = flows.on_dask(dask_address, workers) if task_runner == "dask" else flows.audit_pipeline
    return pipeline_flow(
        config,
        resume=resume or bool(run_id),
        run_id=run_id,
        until=until,
        fresh=fresh,
        n_slices=workers if task_runner == "dask" else 0,
        show_progress=not quiet,
    )


@pipeline_app.command()
def run(
    config: ConfigOption = None,
    store: StoreOption = None,
    model: ModelOption = None,
    quiet: QuietOption = False,
    resume: ResumeOption = False,
    run_id: RunOption = None,
    fresh: FreshOption = False,
    task_runner: RunnerOption = "local",
    dask_address: AddressOption = None,
    workers: WorkersOption = 2,
) -> None:
    """Run the default audit pipeline as a Prefect flow: corpus, transcoder check, collect, audit, label the
    flagged features and ablate / steer them, cluster, report."""
    from autolabel.intervene.command import TABLE_TITLE, summary_rows

    run_config = load_run_config(config, store, model)
    summary = _run_flow(run_config, quiet, resume, run_id, fresh, "report", task_runner, dask_address, workers)
    print_corpus_summary(summary.corpus)
    print_quality(summary.quality)
    print_collect(summary)
    print_audit(summary.audit)
    for labels in summary.labels:
        print_labels(labels)
    for interventions in summary.interventions:
        print_table(TABLE_TITLE, *summary_rows(interventions, run_config.intervene.multiples))
    if summary.cluster:
        print_cluster(summary.cluster)
    console.print(
        f"run [bold]{summary.run_id}[/] complete (transcoder {summary.transcoder_id}); "
        f"query it with: autolabel query \"select * from features where run_id = '{summary.run_id}'\""
    )
    console.print(f"report: {escape(str(summary.report))}", soft_wrap=True)


@pipeline_app.command()
def collect(
    config: ConfigOption = None,
    store: StoreOption = None,
    model: ModelOption = None,
    quiet: QuietOption = False,
    resume: ResumeOption = False,
    run_id: RunOption = None,
    fresh: FreshOption = False,
    task_runner: RunnerOption = "local",
    dask_address: AddressOption = None,
    workers: WorkersOption = 2,
) -> None:
    """Collect top-activating examples and role-aware statistics per feature (builds the corpus and checks the
    transcoders first when needed)."""
    summary = _run_flow(
        load_run_config(config, store, model),
        quiet,
        resume,
        run_id,
        fresh,
        "collect",
        task_runner,
        dask_address,
        workers,
    )
    print_collect(summary)
    console.print(f"run [bold]{summary.run_id}[/]: features, role_stats, category_stats and examples are in the store")


@pipeline_app.command()
def schedule(
    cron: Annotated[str, typer.Option(help='When to run, as cron: "0 3 * * *" is 03:00 daily.')],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly-audit",
    config: ConfigOption = None,
    store: StoreOption = None,
    model: ModelOption = None,
) -> None:
    """Serve the audit_pipeline deployment on a schedule until stopped (runs show in the Prefect UI)."""
    flows = prefect_flows()
    from prefect import serve

    deployment = flows.scheduled(load_run_config(config, store, model), cron, name)
    console.print(
        f"serving [bold]audit_pipeline/{name}[/] on {cron!r}; Ctrl-C stops. "
        "With `prefect server start` running and PREFECT_API_URL set, runs show at http://127.0.0.1:4200"
    )
    serve(deployment)
