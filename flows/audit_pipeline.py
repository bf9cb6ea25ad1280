"""The default audit as a Prefect flow: it orders the library's stages and adds retries, content
caching and the link between a flow run and its row in `runs`.

Nothing here analyses anything; each task is one call into `autolabel`. Collection, the
expensive stage, is cached by content: its key is the fingerprint its checkpoints already
carry (model, transcoder, corpus and collect settings). A scheduled re-run whose inputs did
not change copies the earlier run's tables instead of collecting again; a new corpus,
transcoder or setting misses the cache and collects. Tasks retry on transient errors
(timeouts, lost connections, I/O), and a retried collection resumes from its last
committed shard.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Literal

import duckdb
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.results import get_result_store
from prefect.runtime import flow_run

from autolabel import pipeline
from autolabel.audit import AuditSummary, NothingToAudit
from autolabel.cluster import ClusterSummary
from autolabel.collect import CollectSummary, collect_stage
from autolabel.collect.stage import collect_slice, fingerprint, merge_slices, slice_plan
from autolabel.config import RunConfig
from autolabel.corpus import CorpusSummary, build_corpus
from autolabel.errors import AutolabelError
from autolabel.intervene.command import intervene_run
from autolabel.intervene.stage import InterveneSummary
from autolabel.label.stage import LabelSummary, label_batch
from autolabel.models import SubjectModel
from autolabel.report.stage import report_run
from autolabel.store import Store
from autolabel.transcoders.check import LayerQuality
from autolabel.transcoders.stage import check_stage

TRANSIENT = (TimeoutError, ConnectionError, duckdb.IOException)
RETRY = {"retries": 2, "retry_delay_seconds": [5, 30]}


def transient(task, task_run, state) -> bool:
    """Retry only errors that another attempt can fix (never bad input, which must fail fast)."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


@dataclass
class RunSummary:
    run_id: str
    corpus: CorpusSummary
    transcoder_id: str
    quality: dict[int, LayerQuality]
    collect: CollectSummary
    reused_from: str | None  # the earlier run whose identical collection was copied
    audit: AuditSummary | None  # None when the flow stopped after collection
    labels: list[LabelSummary]  # one per audit with flagged features
    interventions: list[InterveneSummary]  # ablation and steering of the same features
    cluster: ClusterSummary | None
    report: str | None  # the report's index.html, when the flow went that far


@task(name="corpus", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def corpus_task(config: RunConfig, show_progress: bool) -> CorpusSummary:
    model = pipeline.subject_model(config.model.source, config.cache_dir, config.model.dtype)
    with Store(config.store) as store:
        return build_corpus(store, config.corpus, model, show_progress)


@task(name="transcoder check", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def check_task(config: RunConfig, show_progress: bool) -> tuple[str, dict[int, LayerQuality]]:
    model = pipeline.subject_model(config.model.source, config.cache_dir, config.model.dtype)
    with Store(config.store) as store:
        _, transcoder_id, quality = check_stage(store, model, config, show_progress)
    return transcoder_id, quality


def collection_key(store: str, content_key: str) -> str:
    """Collection's cache key: its content in this store (another store's cached run is not here to copy)."""
    return f"collect-{content_key}-{hashlib.sha256(str(store).encode()).hexdigest()[:8]}"


def collect_key(context, parameters: dict) -> str:
    return collection_key(parameters["config"].store, parameters["content_key"])


@task(
    name="collect",
    cache_key_fn=collect_key,
    persist_result=True,
    result_serializer="json",
    retry_condition_fn=transient,
    **RETRY,
)
def collect_task(
    config: RunConfig,
    run_id: str,
    corpus_id: str,
    transcoder_id: str,
    content_key: str,
    show_progress: bool,
    slices: list[str] | None = None,
    seconds: float = 0.0,
) -> dict:
    """Collect into `run_id`, or merge the state files of `slices` collected elsewhere:
    {run_id, seconds, resumed_shards}. A cache hit returns what an earlier run with the same content returned."""
    model = pipeline.subject_model(config.model.source, config.cache_dir, config.model.dtype)
    tset = pipeline.transcoders(config.transcoder.source, config.transcoder.format)
    with Store(config.store) as store:
        if slices is None:
            summary = collect_stage(store, model, tset, corpus_id, transcoder_id, config.collect, run_id, show_progress)
        else:
            summary = merge_slices(
                store, model, tset, corpus_id, transcoder_id, config.collect, run_id, slices, seconds
            )
    return {"run_id": run_id, "seconds": summary.seconds, "resumed_shards": summary.resumed_shards}


@task(name="collect slice", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def collect_slice_task(
    config: RunConfig, run_id: str, corpus_id: str, transcoder_id: str, first: int, last: int, threads: int
) -> str:
    """Shards [first, last) of the plan, on whichever worker runs it: the path of its state file."""
    torch.set_num_threads(threads)
    model = pipeline.subject_model(config.model.source, config.cache_dir, config.model.dtype)
    tset = pipeline.transcoders(config.transcoder.source, config.transcoder.format)
    return collect_slice(config.store, model, tset, corpus_id, transcoder_id, config.collect, run_id, first, last)


def scatter_collection(config: RunConfig, run_id: str, corpus_id: str, transcoder_id: str, n_slices: int) -> list[str]:
    """Collection split into slices of whole shards, submitted to the flow's task runner (Dask workers)."""
    with Store(config.store, read_only=True) as store:
        slices = slice_plan(store, corpus_id, config.collect, n_slices)
    threads = max(1, (os.cpu_count() or 1) // len(slices))
    futures = [
        collect_slice_task.submit(config, run_id, corpus_id, transcoder_id, first, last, threads)
        for first, last in slices
    ]
    return [future.result() for future in futures]


@task(name="audit", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def audit_task(config: RunConfig, run_id: str) -> AuditSummary:
    with Store(config.store) as store:
        try:
            return pipeline.audit_run(store, config, run_id)
        except NothingToAudit as skipped:  # a plain-text corpus: collection is still useful
            return AuditSummary(run_id, None, [], skipped=str(skipped))


@task(name="label", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def label_task(config: RunConfig, run_id: str, show_progress: bool) -> LabelSummary:
    """Answers come from the LLM cache when nothing changed."""
    return pipeline.label_run(config, run_id, show_progress)


@task(name="label shard", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def label_shard_task(config: RunConfig, run_id: str, shard: list[tuple[int, int]]) -> tuple[dict, str | None]:
    model = pipeline.subject_model(config.model.source, config.cache_dir, config.model.dtype)
    tset = pipeline.transcoders(config.transcoder.source, config.transcoder.format)
    with Store(config.store, read_only=True) as store:
        return label_batch(store, model, tset, run_id, config, [tuple(key) for key in shard])


def scatter_labels(config: RunConfig, run_id: str) -> LabelSummary:
    """Label shards on the task runner's workers, which only read the store; their rows (labels, scores,
    LLM cache and ledger) are written here once every worker has finished, shard by shard."""
    started = time.perf_counter()
    plan = pipeline.label_plan(config, run_id)  # only what is still to label
    futures = {name: label_shard_task.submit(config, run_id, shard) for name, shard in plan}
    shards = {name: future.result() for name, future in futures.items()}  # readers finish before the writer opens
    return pipeline.commit_labels(config, run_id, shards, time.perf_counter() - started)


@task(name="intervene", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def intervene_task(config: RunConfig, run_id: str, show_progress: bool) -> InterveneSummary:
    """Causal evidence for the features just labeled: ablated and steered (stored results are reused)."""
    return intervene_run(config, run_id, audit=config.label.audit, show_progress=show_progress)


@task(name="cluster", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def cluster_task(config: RunConfig, run_id: str, show_progress: bool) -> ClusterSummary:
    """Every feature on the map; text embeddings come from their cache when nothing changed."""
    return pipeline.cluster_run(config, run_id, show_progress)


@task(name="report", cache_policy=NO_CACHE, retry_condition_fn=transient, **RETRY)
def report_task(config: RunConfig, run_id: str, show_progress: bool) -> str:
    return str(report_run(config, run_id, show_progress=show_progress).index.resolve())


def collection(
    config: RunConfig,
    run_id: str,
    corpus_id: str,
    transcoder_id: str,
    model: SubjectModel,
    fresh: bool,
    n_slices: int,
    show_progress: bool,
) -> tuple[CollectSummary, str | None]:
    """Collect `run_id`, or copy an identical earlier collection: (summary, the run it was copied from)."""
    content_key = fingerprint(config.collect, corpus_id, transcoder_id, model.model_id, model.dtype)
    arguments = (config, run_id, corpus_id, transcoder_id, content_key, show_progress)
    slices, started = None, time.perf_counter()
    will_collect = fresh or not get_result_store().exists(collection_key(config.store, content_key))
    if n_slices and will_collect:  # scatter only what the collect task will not answer from its cache
        slices = scatter_collection(config, run_id, corpus_id, transcoder_id, n_slices)
    collected = collect_task.with_options(refresh_cache=fresh)(*arguments, slices, time.perf_counter() - started)
    if collected["run_id"] != run_id and not pipeline.reuse_collection(config, collected["run_id"], run_id):
        collected = collect_task.with_options(refresh_cache=True)(*arguments)  # the cached run left this store
    return pipeline.collection_summary(config, run_id, collected)


@flow(name="audit_pipeline", log_prints=True)
def audit_pipeline(
    config: RunConfig,
    resume: bool = False,
    run_id: str | None = None,
    until: Literal["collect", "audit", "report"] = "report",
    fresh: bool = False,
    n_slices: int = 0,
    show_progress: bool = True,
) -> RunSummary:
    """Corpus, transcoder check, collection, audits, labels for the audits' flagged features, the feature
    map with clusters and groups, and the HTML report for one run.

    With `resume`, continue `run_id` (or the latest unfinished run) with its stored config; with `fresh`,
    collect even when an identical collection is cached. With `n_slices`, collection is split into that
    many slices run as tasks on the flow's task runner (see `on_dask`) and merged here, and labeling
    runs a task per shard of features there too.
    """
    run_id, config = pipeline.open_run(config, resume, run_id, str(flow_run.id) if flow_run.id else None)
    try:
        corpus = corpus_task(config, show_progress)
        transcoder_id, quality = check_task(config, show_progress)
        model = pipeline.subject_model(config.model.source, config.cache_dir, config.model.dtype)
        fresh = pipeline.record_inputs(config, run_id, corpus.corpus_id, transcoder_id, fresh)
        collect, reused_from = collection(
            config, run_id, corpus.corpus_id, transcoder_id, model, fresh, n_slices, show_progress
        )
        audit = audit_task(config, run_id) if until != "collect" else None
        labeling = pipeline.flagged_labeling(config, audit)
        labels = [
            scatter_labels(settings, run_id) if n_slices else label_task(settings, run_id, show_progress)
            for settings in labeling
        ]
        interventions = [
            intervene_task(settings, run_id, show_progress) for settings in labeling if config.intervene.in_run
        ]
        cluster = cluster_task(config, run_id, show_progress) if until == "report" else None
        if labels or cluster:  # again: the findings carry the new labels, groups and ablation effects
            audit = audit_task(config, run_id)
        pipeline.finish_run(config, run_id, "complete")  # before the report, which shows the run's final state
        report = report_task(config, run_id, show_progress) if until == "report" else None
    except BaseException as err:
        pipeline.finish_run(config, run_id, "failed", f"{type(err).__name__}: {err}")
        raise
    return RunSummary(
        run_id, corpus, transcoder_id, quality, collect, reused_from, audit, labels, interventions, cluster, report
    )


def scheduled(config: RunConfig, cron: str, name: str = "nightly-audit"):
    """The audit_pipeline deployment on a cron schedule; `prefect.serve` (or `autolabel schedule`) runs it.

    Every scheduled run is a new run of the same config: an unchanged corpus is reused, collection is
    served from the content cache unless the model, transcoder, corpus or settings changed, and the
    audit diffs against the previous run.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError as err:
        raise AutolabelError(
            f'--cron {cron!r} is not a cron expression (five fields, e.g. "0 3 * * *" for '
            f"03:00 every day): {err.errors()[0]['msg']}"
        ) from err
    return audit_pipeline.to_deployment(
        name=name,
        cron=cron,
        tags=["autolabel"],
        parameters={"config": config.model_dump(mode="json"), "show_progress": True},
    )


def on_dask(address: str | None = None, workers: int = 2):
    """audit_pipeline on Dask (prefect-dask): a scheduler at `address`, or a local cluster of `workers` processes."""
    from prefect_dask import DaskTaskRunner

    runner = (
        DaskTaskRunner(address=address)
        if address
        else DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    )
    return audit_pipeline.with_options(task_runner=runner)
