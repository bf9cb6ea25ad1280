"""The steps of a run that the Prefect flow (`flows/audit_pipeline.py`) orders, and the run lookups the
commands share: open or resume a run, reuse an identical earlier collection, label and audit a run.
The flow's steps take the run's config and open the store for as long as they need it, so the flow
itself never holds the store (another process may query it between stages).

A run is one row in `runs`. One that was killed or failed resumes with its own stored config:
finished corpus and collect shards are kept.
"""

from __future__ import annotations

from functools import lru_cache

from autolabel.audit import AuditSummary, audit_stage, load_spec
from autolabel.cluster import ClusterSummary, cluster_stage
from autolabel.collect import CollectSummary
from autolabel.collect.stage import STAGE as COLLECT_STAGE
from autolabel.collect.stage import collect_summary
from autolabel.config import RunConfig
from autolabel.errors import AutolabelError
from autolabel.label.stage import LabelSummary, commit_shard, label_stage, label_summary, open_plan
from autolabel.models import SubjectModel, load_subject_model
from autolabel.store import Store, to_json
from autolabel.transcoders.stage import open_transcoders
from autolabel.transcoders.transcoder import TranscoderSet

COLLECT_TABLES = ("features", "role_stats", "category_stats", "examples")


@lru_cache(maxsize=1)
def subject_model(source: str, cache_dir: str, dtype: str) -> SubjectModel:
    """One loaded model per process, shared by the flow's tasks."""
    return load_subject_model(source, cache_dir, dtype)


@lru_cache(maxsize=2)
def transcoders(source: str, fmt: str) -> TranscoderSet:
    return open_transcoders(source, fmt)


def find_resumable(store: Store, run_id: str | None) -> tuple[str, RunConfig]:
    """The given run, or the latest one that did not complete, with the config it was started with."""
    if run_id:
        row = store.one("SELECT run_id, status, config_json FROM runs WHERE run_id = ?", [run_id])
        if row is None:
            raise AutolabelError(
                f'no run {run_id!r} in {store.path}; list runs with: autolabel query "select * from runs"'
            )
    else:
        row = store.one(
            "SELECT run_id, status, config_json FROM runs WHERE status <> 'complete' ORDER BY started_at DESC LIMIT 1"
        )
        if row is None:
            raise AutolabelError(f"no unfinished run to resume in {store.path}; start one without --resume")
    if row[1] == "complete":
        raise AutolabelError(f"run {row[0]} is already complete; start a new run without --resume")
    return row[0], RunConfig.model_validate_json(row[2])


def open_run(config: RunConfig, resume: bool, run_id: str | None, flow_run_id: str | None) -> tuple[str, RunConfig]:
    """Start a run, or with `resume` take up `run_id` (or the latest unfinished one) with its stored config."""
    with Store(config.store) as store:
        if resume:
            run_id, stored = find_resumable(store, run_id)
            config = stored.model_copy(update={"store": config.store})
        model = subject_model(config.model.source, config.cache_dir, config.model.dtype)
        if not resume:
            run_id = store.start_run(to_json(config.model_dump(mode="json")), model.model_id)
        store.update_run(run_id, status="running", finished_at=None, error=None, flow_run_id=flow_run_id)
    return run_id, config


def record_inputs(config: RunConfig, run_id: str, corpus_id: str, transcoder_id: str, fresh: bool) -> bool:
    """Tie the run to its corpus and transcoders, and say whether it must collect by itself instead of
    copying an identical earlier collection.

    `--fresh` is kept with the run (runs.fresh), so resuming a killed `--fresh` collection still
    collects; and a run with committed collect shards continues its own checkpoint rather than
    copy another run's tables and leave that checkpoint behind.
    """
    with Store(config.store) as store:
        store.update_run(run_id, corpus_id=corpus_id, transcoder_id=transcoder_id, **({"fresh": True} if fresh else {}))
        asked = store.one("SELECT coalesce(fresh, false) FROM runs WHERE run_id = ?", [run_id])[0]
        shards = store.committed_shards(run_id, COLLECT_STAGE)
    return bool(asked) or bool(shards and "final" not in shards)


def reuse_collection(config: RunConfig, source_run: str, run_id: str) -> bool:
    """Copy an identical earlier collection's tables into `run_id` (False if that run is gone from the store)."""
    with Store(config.store) as store:
        if "final" not in store.committed_shards(source_run, COLLECT_STAGE):
            return False
        store.copy_collection(source_run, run_id, COLLECT_TABLES, COLLECT_STAGE)
    return True


def collection_summary(config: RunConfig, run_id: str, collected: dict) -> tuple[CollectSummary, str | None]:
    """What the run's collection holds, from the collect task's answer ({run_id, seconds, resumed_shards}, cached
    by content): (summary, the earlier run whose tables were copied, or None when this run collected)."""
    copied_from = collected["run_id"] if collected["run_id"] != run_id else None
    with Store(config.store) as store:
        if copied_from:
            return collect_summary(store, run_id, 0.0, 0), copied_from
        return collect_summary(store, run_id, collected["seconds"], collected["resumed_shards"]), None


def finish_run(config: RunConfig, run_id: str, status: str, error: str | None = None) -> None:
    """Mark the run finished. Opening the store waits out another process's lock (see Store), so a query
    beside the run delays this line instead of leaving the run `running` with no error recorded."""
    with Store(config.store) as store:
        store.finish_run(run_id, status, error=error)


def flagged_labeling(config: RunConfig, audit: AuditSummary | None) -> list[RunConfig]:
    """Per audit that flagged features, the run's config selecting its best-ranked flagged features for
    labeling and intervening (`audit.label_flagged` of them; none when that is 0)."""
    if audit is None or not config.audit.label_flagged:
        return []
    settings = []
    for result in audit.results:
        if result.flagged:
            label = config.label.model_copy(
                update={"audit": result.audit, "limit": config.audit.label_flagged, "layers": None, "features": None}
            )
            intervene = config.intervene.model_copy(update={"limit": config.audit.label_flagged})
            settings.append(config.model_copy(update={"label": label, "intervene": intervene}))
    return settings


def label_plan(config: RunConfig, run_id: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """The label shards still open, for workers to label (features with too few examples recorded as skipped)."""
    with Store(config.store) as store:
        return open_plan(store, run_id, config)


def commit_labels(
    config: RunConfig, run_id: str, shards: dict[str, tuple[dict, str | None]], seconds: float
) -> LabelSummary:
    """Write what workers labeled, shard by shard ({name: (rows, why it stopped early)}): their LLM cache and
    ledger rows, labels and scores. A shard the budget stopped keeps what finished and stays open for a resume."""
    calls, cost, stopped = 0, 0.0, None
    with Store(config.store) as store:
        for name, (rows, budget) in shards.items():
            ledger = rows.get("llm_calls", [])
            calls += sum(not row["cached"] for row in ledger)
            cost += sum(row["cost_usd"] for row in ledger)
            commit_shard(store, run_id, name, rows, budget is not None)
            if budget is not None:
                stopped = budget
        return label_summary(store, run_id, config, calls, cost, seconds, stopped)


COLLECTED = (
    "SELECT r.run_id, r.config_json FROM runs r JOIN shards s ON s.run_id = r.run_id "
    "AND s.stage = 'collect' AND s.shard = 'final' "
)


def collected_run(store: Store, run_id: str | None) -> tuple[str, RunConfig]:
    """The given run, or the latest one, with finished collection: (run_id, the config it ran with).
    Every command that works on a collected run (label, cluster, audit, report, graph, intervene) finds it here."""
    if run_id and store.one("SELECT count(*) FROM runs WHERE run_id = ?", [run_id])[0] == 0:
        raise AutolabelError(f'no run {run_id!r} in {store.path}; list runs with: autolabel query "select * from runs"')
    row = store.one(COLLECTED + "WHERE ? IS NULL OR r.run_id = ? ORDER BY r.started_at DESC LIMIT 1", [run_id, run_id])
    if row is None:
        raise AutolabelError(
            f"no collected run {run_id or ''} in {store.path} (no collected features); run "
            '`autolabel collect` first (list runs with: autolabel query "select * from runs")'
        )
    return row[0], RunConfig.model_validate_json(row[1])


def collected_runs(store: Store) -> list[tuple[str, RunConfig]]:
    """Every run with finished collection, the latest first, with the config it ran with."""
    return [
        (run_id, RunConfig.model_validate_json(config_json))
        for run_id, config_json in store.rows(COLLECTED + "ORDER BY r.started_at DESC")
    ]


def previous_run(store: Store, run_id: str) -> str | None:
    """The latest collected run that started before `run_id`."""
    row = store.one(
        COLLECTED + "WHERE r.started_at < (SELECT started_at FROM runs WHERE run_id = ?) "
        "ORDER BY r.started_at DESC LIMIT 1",
        [run_id],
    )
    return row[0] if row else None


def cluster_run(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> ClusterSummary:
    """Map, cluster, name and tag the features of a collected run (the latest by default) with `config`'s
    cluster and llm settings; the tokenizer and transcoders are the run's own."""
    with Store(config.store, create=False) as store:
        run_id, stored = collected_run(store, run_id)
        subject = subject_model(stored.model.source, config.cache_dir, stored.model.dtype)
        tset = None
        if config.cluster.embedding == "label+decoder":
            tset = transcoders(stored.transcoder.source, stored.transcoder.format)
        return cluster_stage(store, subject.tokenizer, tset, run_id, config, show_progress=show_progress)


def label_run(config: RunConfig, run_id: str | None = None, show_progress: bool = True) -> LabelSummary:
    """Label the features of a collected run (the latest one by default) with `config`'s label and llm
    settings; the model and transcoders are the run's own."""
    with Store(config.store, create=False) as store:
        run_id, stored = collected_run(store, run_id)
        subject = subject_model(stored.model.source, config.cache_dir, stored.model.dtype)
        tset = transcoders(stored.transcoder.source, stored.transcoder.format)
        labeling = stored.model_copy(update={"label": config.label, "llm": config.llm})
        return label_stage(store, subject, tset, run_id, labeling, show_progress)


def audit_run(store: Store, config: RunConfig, run_id: str | None = None) -> AuditSummary:
    """Apply `config.audit`'s specs to a collected run (the latest by default) and diff it against
    `config.audit.against` ("previous": the run before it, when there is one)."""
    run_id, _ = collected_run(store, run_id)
    specs = [load_spec(path) for path in config.audit.specs]
    against = config.audit.against
    if against == "previous":
        against = previous_run(store, run_id)
    elif against is not None:
        against, _ = collected_run(store, against)

    def decoders(of_run: str) -> dict:
        _, stored = collected_run(store, of_run)
        tset = transcoders(stored.transcoder.source, stored.transcoder.format)
        return {layer: transcoder.decoder_rows() for layer, transcoder in tset.transcoders.items()}

    return audit_stage(store, run_id, specs, against, decoders)
