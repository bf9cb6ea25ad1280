"""One Prefect flow per stage, for running (or scheduling) a single stage on a collected run.

Each is a thin shell over the same task `audit_pipeline` uses, so retries and caching are the
same; without `run_id` they take the latest collected run.
"""

from __future__ import annotations

from prefect import flow

from autolabel import pipeline
from autolabel.audit import AuditSummary
from autolabel.cluster import ClusterSummary
from autolabel.config import RunConfig
from autolabel.corpus import CorpusSummary
from autolabel.label.stage import LabelSummary
from autolabel.store import Store
from flows.audit_pipeline import (
    RunSummary,
    audit_pipeline,
    audit_task,
    cluster_task,
    corpus_task,
    report_task,
)


def latest(config: RunConfig, run_id: str | None) -> str:
    with Store(config.store, read_only=True) as store:
        return pipeline.collected_run(store, run_id)[0]


@flow(name="corpus")
def corpus_flow(config: RunConfig, show_progress: bool = True) -> CorpusSummary:
    return corpus_task(config, show_progress)


@flow(name="collect")
def collect_flow(config: RunConfig, resume: bool = False, run_id: str | None = None, fresh: bool = False,
                 show_progress: bool = True) -> RunSummary:
    """A new run up to collection (corpus and transcoder check included), or a resumed one."""
    return audit_pipeline(config, resume=resume, run_id=run_id, until="collect", fresh=fresh,
                          show_progress=show_progress)


@flow(name="label")
def label_flow(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> LabelSummary:
    """The features `config.label` selects (all that fired, a layer, a list, or an audit's candidates)."""
    return pipeline.label_run(config, latest(config, run_id), show_progress)


@flow(name="audit")
def audit_flow(config: RunConfig, run_id: str | None = None) -> AuditSummary:
    return audit_task(config, latest(config, run_id))


@flow(name="cluster")
def cluster_flow(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> ClusterSummary:
    return cluster_task(config, latest(config, run_id), show_progress)


@flow(name="report")
def report_flow(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> str:
    return report_task(config, latest(config, run_id), show_progress)
