"""The audit of an organism as a Prefect flow: the base model's run (only when the store has none with the
same corpus sources, transcoders and settings), then audit_pipeline on the organism folder with
`audit.against` set to that run and the organism spec's own audits added, then the organism run's report.
Nothing here analyses anything."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from autolabel.config import RunConfig
from autolabel.errors import AutolabelError
from autolabel.organism import audit as organism
from autolabel.organism.spec import OrganismSpec
from autolabel.pipeline import subject_model, transcoders
from autolabel.report.stage import report_run
from autolabel.store import Store
from flows.audit_pipeline import audit_pipeline


@flow(name="organism_audit", log_prints=True)
def organism_audit(
    config: RunConfig,
    spec: OrganismSpec,
    folder: Path,
    against: str = "base",
    report: bool = True,
    show_progress: bool = True,
) -> organism.OrganismAudit:
    seconds = {}
    with Store(config.store) as store:
        base_run = organism.base_run(store, config, against)
    started = time.perf_counter()
    if base_run is None:
        base_run = audit_pipeline(organism.base_config(config), until="audit", show_progress=show_progress).run_id
        seconds["base"] = time.perf_counter() - started
    started = time.perf_counter()
    settings = organism.organism_config(config, folder, base_run, spec)
    run = audit_pipeline(settings, until="audit", show_progress=show_progress)
    seconds["organism"] = time.perf_counter() - started
    audits = [result.audit for result in run.audit.results] if run.audit else []
    if not audits:
        raise AutolabelError(f"the organism run {run.run_id} was not audited: {run.audit.skipped if run.audit else ''}")
    subject = subject_model(settings.model.source, settings.cache_dir, settings.model.dtype)
    tset = transcoders(settings.transcoder.source, settings.transcoder.format)
    with Store(config.store, read_only=True) as store:
        changes = organism.findings(store, spec, run.run_id, base_run, subject, tset, audits)
    index = None
    if report:
        started = time.perf_counter()
        index = str(report_run(settings, run.run_id, show_progress=show_progress).index.resolve())
        seconds["report"] = time.perf_counter() - started
    return organism.OrganismAudit(
        spec.name, str(folder), run.run_id, base_run, "base" in seconds, changes, index, seconds
    )
