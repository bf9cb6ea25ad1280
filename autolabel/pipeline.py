"""The default audit, stage after stage, recorded as one row in `runs`.

Today it reaches the corpus; each later stage (collect, label, cluster, audit,
report) is appended here as it lands, and the Prefect flow orders the same calls.
"""

from __future__ import annotations

from autolabel.config import RunConfig
from autolabel.corpus import CorpusSummary, build_corpus
from autolabel.models import load_subject_model
from autolabel.store import Store, to_json


def run_pipeline(config: RunConfig, show_progress: bool = True) -> tuple[str, CorpusSummary]:
    subject = load_subject_model(config.model.source, config.cache_dir, config.model.dtype)
    with Store(config.store) as store:
        run_id = store.start_run(to_json(config.model_dump(mode="json")), subject.model_id)
        try:
            summary = build_corpus(store, config.corpus, subject, show_progress)
        except BaseException as err:
            store.finish_run(run_id, "failed", error=f"{type(err).__name__}: {err}")
            raise
        store.finish_run(run_id, "complete", corpus_id=summary.corpus_id)
    return run_id, summary
