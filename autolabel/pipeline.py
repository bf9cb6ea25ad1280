"""The default audit, stage after stage, recorded as one row in `runs`.

Today it reaches the corpus and the transcoder check; each later stage (collect,
label, cluster, audit, report) is appended here as it lands, and the Prefect
flow orders the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from autolabel.config import RunConfig
from autolabel.corpus import CorpusSummary, build_corpus
from autolabel.models import load_subject_model
from autolabel.store import Store, to_json
from autolabel.transcoders.check import LayerQuality
from autolabel.transcoders.stage import check_stage


@dataclass
class RunSummary:
    run_id: str
    corpus: CorpusSummary
    transcoder_id: str
    quality: dict[int, LayerQuality]


def run_pipeline(config: RunConfig, show_progress: bool = True) -> RunSummary:
    subject = load_subject_model(config.model.source, config.cache_dir, config.model.dtype)
    with Store(config.store) as store:
        run_id = store.start_run(to_json(config.model_dump(mode="json")), subject.model_id)
        try:
            corpus = build_corpus(store, config.corpus, subject, show_progress)
            transcoder_id, quality = check_stage(store, subject, config, show_progress)
        except BaseException as err:
            store.finish_run(run_id, "failed", error=f"{type(err).__name__}: {err}")
            raise
        store.finish_run(run_id, "complete", corpus_id=corpus.corpus_id, transcoder_id=transcoder_id)
    return RunSummary(run_id, corpus, transcoder_id, quality)
