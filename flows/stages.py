"""One-stage flows for the deployments in prefect.yaml (`relabel`, `rereport`): label or report a run that
is already collected, without collecting again. Without `run_id` they take the latest collected run.

The report flow is the same task `audit_pipeline` ends with, so its retries are the same.
"""

from __future__ import annotations

from prefect import flow

from autolabel import pipeline
from autolabel.config import RunConfig
from autolabel.label.stage import LabelSummary
from autolabel.store import Store
from flows.audit_pipeline import report_task


def latest(config: RunConfig, run_id: str | None) -> str:
    with Store(config.store, read_only=True) as store:
        return pipeline.collected_run(store, run_id)[0]


@flow(name="label")
def label_flow(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> LabelSummary:
    """The features `config.label` selects (all that fired, a layer, a list, or an audit's candidates)."""
    return pipeline.label_run(config, latest(config, run_id), show_progress)


@flow(name="report")
def report_flow(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> str:
    return report_task(config, latest(config, run_id), show_progress)
