"""The default audit, stage after stage, recorded as one row in `runs`.

Today it reaches the corpus, the transcoder check and collection; each later
stage (label, cluster, audit, report) is appended here as it lands, and the
Prefect flow orders the same calls. A run that was killed or failed resumes
with its own stored config: finished corpus and collect shards are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from autolabel.cluster import ClusterSummary, cluster_stage
from autolabel.collect import CollectSummary, collect_stage
from autolabel.config import RunConfig
from autolabel.corpus import CorpusSummary, build_corpus
from autolabel.errors import AutolabelError
from autolabel.label.stage import LabelSummary, label_stage
from autolabel.models import load_subject_model
from autolabel.store import Store, to_json
from autolabel.transcoders.check import LayerQuality
from autolabel.transcoders.stage import check_stage, open_transcoders


@dataclass
class RunSummary:
    run_id: str
    corpus: CorpusSummary
    transcoder_id: str
    quality: dict[int, LayerQuality]
    collect: CollectSummary


def find_resumable(store: Store, run_id: str | None) -> tuple[str, RunConfig]:
    """The given run, or the latest one that did not complete, with the config it was started with."""
    if run_id:
        row = store.one("SELECT run_id, status, config_json FROM runs WHERE run_id = ?", [run_id])
        if row is None:
            raise AutolabelError(f"no run {run_id!r} in {store.path}; list runs with: autolabel query \"select * from runs\"")
    else:
        row = store.one("SELECT run_id, status, config_json FROM runs WHERE status <> 'complete' "
                        "ORDER BY started_at DESC LIMIT 1")
        if row is None:
            raise AutolabelError(f"no unfinished run to resume in {store.path}; start one without --resume")
    if row[1] == "complete":
        raise AutolabelError(f"run {row[0]} is already complete; start a new run without --resume")
    return row[0], RunConfig.model_validate_json(row[2])


def run_pipeline(config: RunConfig, show_progress: bool = True, resume: bool = False,
                 run_id: str | None = None) -> RunSummary:
    """Run every stage; with `resume`, continue `run_id` (or the latest unfinished run) instead."""
    with Store(config.store) as store:
        if resume:
            run_id, stored = find_resumable(store, run_id)
            config = stored.model_copy(update={"store": config.store})
        subject = load_subject_model(config.model.source, config.cache_dir, config.model.dtype)
        if not resume:
            run_id = store.start_run(to_json(config.model_dump(mode="json")), subject.model_id)
        store.update_run(run_id, status="running", finished_at=None, error=None)
        try:
            corpus = build_corpus(store, config.corpus, subject, show_progress)
            tset, transcoder_id, quality = check_stage(store, subject, config, show_progress)
            store.update_run(run_id, corpus_id=corpus.corpus_id, transcoder_id=transcoder_id)
            collect = collect_stage(store, subject, tset, corpus.corpus_id, transcoder_id, config.collect, run_id,
                                    show_progress)
        except BaseException as err:
            store.finish_run(run_id, "failed", error=f"{type(err).__name__}: {err}")
            raise
        store.finish_run(run_id, "complete")
    return RunSummary(run_id, corpus, transcoder_id, quality, collect)


def collected_run(store: Store, run_id: str | None) -> tuple[str, RunConfig]:
    """The given run, or the latest collected one, with the config it was collected with."""
    row = store.one("SELECT r.run_id, r.config_json FROM runs r JOIN shards s ON s.run_id = r.run_id "
                    "AND s.stage = 'collect' AND s.shard = 'final' WHERE ? IS NULL OR r.run_id = ? "
                    "ORDER BY r.started_at DESC LIMIT 1", [run_id, run_id])
    if row is None:
        raise AutolabelError(f"no collected run {run_id or ''} in {store.path}; run `autolabel collect` first")
    return row[0], RunConfig.model_validate_json(row[1])


def cluster_run(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> ClusterSummary:
    """Map, cluster, name and tag the features of a collected run (the latest by default) with `config`'s
    cluster and llm settings; the tokenizer and transcoders are the run's own."""
    with Store(config.store) as store:
        run_id, stored = collected_run(store, run_id)
        subject = load_subject_model(stored.model.source, config.cache_dir, stored.model.dtype)
        tset = None
        if config.cluster.embedding == "label+decoder":
            tset = open_transcoders(stored.transcoder.source, stored.transcoder.format)
        return cluster_stage(store, subject.tokenizer, tset, run_id, config, show_progress=show_progress)


def label_run(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> LabelSummary:
    """Label the features of a collected run (the latest one by default) with `config`'s label and llm
    settings; the model and transcoders are the run's own."""
    with Store(config.store) as store:
        run_id, stored = collected_run(store, run_id)
        subject = load_subject_model(stored.model.source, config.cache_dir, stored.model.dtype)
        tset = open_transcoders(stored.transcoder.source, stored.transcoder.format)
        labeling = stored.model_copy(update={"label": config.label, "llm": config.llm})
        return label_stage(store, subject, tset, run_id, labeling, show_progress)
