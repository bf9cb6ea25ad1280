"""The audit_pipeline Prefect flow on the tiny model, under Prefect's test harness: runs are linked to
their flow runs, an unchanged re-run reuses the collection by content, and a changed input collects again."""

from __future__ import annotations

import os

import pytest
from test_collect import TABLES, table

from autolabel.config import RunConfig
from autolabel.store import Store


def test_rerun_reuses_the_identical_collection_and_changed_inputs_collect_again(config, prefect_api):
    from prefect.client.orchestration import get_client

    from flows.audit_pipeline import audit_pipeline

    first = audit_pipeline(config, show_progress=False)
    second = audit_pipeline(config, show_progress=False)
    changed = config.model_copy(deep=True)
    changed.collect.top_k = 3
    third = audit_pipeline(changed, show_progress=False)

    assert first.reused_from is None and second.reused_from == first.run_id and third.reused_from is None
    for summary in (first, second, third):  # each run ends with its own report
        assert summary.report == os.path.join(config.report.out_dir, summary.run_id, "index.html")
        assert os.path.isfile(summary.report)
    assert second.collect.status_by_layer == first.collect.status_by_layer
    with Store(config.store) as store:
        for name in TABLES:
            assert table(store, name, second.run_id) == table(store, name, first.run_id), name
        runs = store.query("SELECT run_id, status, parent_run_id, flow_run_id FROM runs ORDER BY started_at")[1]
        top = store.one("SELECT max(rank) FROM examples WHERE run_id = ? AND kind = 'top'", [third.run_id])[0]
        audited = store.query("SELECT run_id, count(*) FROM audit_findings GROUP BY 1 ORDER BY 1")[1]
        diffs = store.query("SELECT run_id, against_run_id FROM audit_diffs")[1]
        diffed = store.rows("SELECT run_id, shard FROM shards WHERE stage = 'audit' AND shard LIKE '%:%'")
    assert [(r, s, p) for r, s, p, _ in runs] == [
        (first.run_id, "complete", None),
        (second.run_id, "complete", first.run_id),
        (third.run_id, "complete", None),
    ]
    assert top == 2  # ranks from 0: the changed setting really collected again
    assert [r for r, n in audited if n > 0] == sorted([first.run_id, second.run_id, third.run_id])
    # Each run after the first diffed against the run before it: the diff's shard is committed, and its rows
    # (only where something changed) are none for the identical second run.
    assert (first.audit.against, second.audit.against, third.audit.against) == (None, first.run_id, second.run_id)
    audits = [result.audit for result in first.audit.results]
    assert audits and sorted(diffed) == sorted(
        [(second.run_id, f"{name}:{first.run_id}") for name in audits]
        + [(third.run_id, f"{name}:{second.run_id}") for name in audits]
    )
    assert {(r, a) for r, a in diffs} <= {(third.run_id, second.run_id)}

    # Every run names its flow run, and that flow run is in Prefect's API, completed.
    async def flow_states():
        async with get_client() as client:
            return [(await client.read_flow_run(flow_run_id)).state.type.value for *_, flow_run_id in runs]

    import asyncio

    assert asyncio.run(flow_states()) == ["COMPLETED"] * 3


def test_fresh_collects_again_and_bad_input_fails_the_run_without_retries(config, prefect_api, tmp_path):
    from autolabel.errors import AutolabelError
    from flows.audit_pipeline import audit_pipeline

    first = audit_pipeline(config, until="collect", show_progress=False)
    again = audit_pipeline(config, until="collect", fresh=True, show_progress=False)
    assert again.reused_from is None and again.collect.seconds > 0 and again.audit is None
    assert again.run_id != first.run_id and first.audit is None

    broken = config.model_copy(deep=True)
    broken.transcoder.source = str(tmp_path / "missing")
    with pytest.raises(AutolabelError, match="missing"):
        audit_pipeline(broken, show_progress=False)
    with Store(config.store) as store:
        status, error, flow_run_id = store.one(
            "SELECT status, error, flow_run_id FROM runs ORDER BY started_at DESC LIMIT 1"
        )
    assert status == "failed" and "missing" in error

    async def check_attempts():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {run.name.rsplit("-", 1)[0]: (run.run_count, run.state.type.value) for run in runs}

    import asyncio

    # Bad input is not transient: the check ran once and failed; nothing after it ran.
    assert asyncio.run(check_attempts()) == {"corpus": (1, "COMPLETED"), "transcoder check": (1, "FAILED")}


def test_schedule_builds_a_cron_deployment_and_rejects_a_bad_cron(config, prefect_api, monkeypatch, capsys):
    from test_cli import run_cli

    from flows.audit_pipeline import scheduled

    deployment = scheduled(config, "0 3 * * *")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *" and deployment.name == "nightly-audit"
    assert RunConfig.model_validate(deployment.parameters["config"]) == config  # the whole config travels
    code, _, err = run_cli(monkeypatch, capsys, "schedule", "--cron", "61 * * *", "--store", config.store)
    assert code == 2 and "'61 * * *' is not a cron expression" in err


def test_prefect_yaml_deploys_the_flow_with_a_valid_schedule():
    import yaml
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    from autolabel.config import PROJECT_ROOT

    spec = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    flows = {}
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(PROJECT_ROOT / deployment["entrypoint"]))
        flows[deployment["name"]] = flow.name
        flow.validate_parameters(deployment["parameters"])  # {} is a valid RunConfig
        for schedule in deployment["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert flows == {"nightly-audit": "audit_pipeline", "relabel": "label", "rereport": "report"}


def test_two_dask_workers_give_the_single_process_tables(config, prefect_api):
    import torch

    from flows.audit_pipeline import audit_pipeline, on_dask

    # Float sums are bit-identical only at equal thread counts (BLAS splits them by thread): each of the
    # two workers gets half the cores, and so does the single-process run.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        local = audit_pipeline(config, until="collect", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    scattered = on_dask(workers=2)(config, until="collect", fresh=True, n_slices=2, show_progress=False)
    cached = on_dask(workers=2)(config, until="collect", n_slices=2, show_progress=False)
    assert scattered.reused_from is None and cached.reused_from in {local.run_id, scattered.run_id}
    with Store(config.store) as store:
        for name in TABLES:
            assert table(store, name, scattered.run_id) == table(store, name, local.run_id), name
        flow_run_id = store.one("SELECT flow_run_id FROM runs WHERE run_id = ?", [scattered.run_id])[0]

    async def slice_runs():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return sorted(run.state.type.value for run in runs if run.name.startswith("collect slice"))

    import asyncio

    assert asyncio.run(slice_runs()) == ["COMPLETED", "COMPLETED"]  # two slices, each on a worker


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task-runner", "spark"], "--task-runner must be local or dask"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_scale_out_options_exit_2(monkeypatch, capsys, tmp_path, args, message):
    from test_cli import run_cli

    code, _, err = run_cli(monkeypatch, capsys, "collect", "--store", str(tmp_path / "s.duckdb"), *args)
    assert code == 2 and message in err and not (tmp_path / "s.duckdb").exists()


def test_the_deployed_stage_flows_work_on_the_latest_collected_run(config, prefect_api):
    """prefect.yaml's relabel and rereport deployments: label_flow and report_flow without a run id."""
    from autolabel.config import LabelConfig, LLMConfig
    from flows.audit_pipeline import audit_pipeline
    from flows.stages import label_flow, report_flow

    older = audit_pipeline(config, until="collect", show_progress=False)
    collected = audit_pipeline(config, until="collect", show_progress=False)  # the same tables, copied
    settings = config.model_copy(
        update={
            "label": LabelConfig(
                layers=[1],
                features=[0, 1],
                min_examples=2,
                explain_top=3,
                explain_quantile=1,
                score_examples=6,
                output_tokens=3,
                scorers=["detection"],
            ),
            "llm": LLMConfig(max_tokens=160, concurrency=1),
        }
    )
    labels = label_flow(settings, show_progress=False)
    report = report_flow(config, show_progress=False)
    assert older.run_id != collected.run_id == labels.run_id
    assert report == os.path.join(config.report.out_dir, collected.run_id, "index.html") and os.path.isfile(report)
    with Store(config.store) as store:
        labeled = store.rows("SELECT run_id, layer, feature FROM labels ORDER BY ALL")
    assert labeled == [(collected.run_id, 1, 0), (collected.run_id, 1, 1)] and sum(labels.by_status.values()) == 2


def test_labeling_on_two_dask_workers_merges_rows_cache_and_ledger(config, prefect_api):
    """Shards labeled on workers that only read the store; the flow writes their rows. The single-process
    labeler then finds every answer in the merged cache and writes the same labels and scores."""
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from autolabel.config import LabelConfig, LLMConfig
    from autolabel.pipeline import label_run
    from flows.audit_pipeline import audit_pipeline, scatter_labels

    run_id = audit_pipeline(config, until="collect", show_progress=False).run_id
    settings = config.model_copy(
        update={
            "label": LabelConfig(
                layers=[1],
                features=list(range(6)),
                min_examples=2,
                explain_top=3,
                explain_quantile=1,
                score_examples=6,
                output_tokens=3,
                features_per_shard=2,
                scorers=["detection"],
            ),
            "llm": LLMConfig(max_tokens=160, concurrency=1),
        }
    )

    @flow(task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True}))
    def label_on_dask():
        return scatter_labels(settings, run_id)

    scattered = label_on_dask()
    with Store(config.store) as store:
        labels = store.query("SELECT feature, status, label FROM labels WHERE run_id = ? ORDER BY feature", [run_id])[1]
        scores = store.query("SELECT feature, scorer, value, status FROM scores WHERE run_id = ? ORDER BY 1", [run_id])[
            1
        ]
        shards = store.committed_shards(run_id, "label")
        requests = store.one("SELECT count(*) FROM llm_calls WHERE run_id = ? AND NOT cached", [run_id])[0]
    assert len(shards) == 3 and scattered.calls == requests > 0
    assert [f for f, *_ in labels] == list(range(6)) and all(status == "ok" for _, status, _ in labels)
    assert len(scores) == 6

    with Store(config.store) as store:  # keep only the merged LLM cache, and label again in one process
        for table in ("labels", "scores"):
            store.con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        store.con.execute("DELETE FROM shards WHERE run_id = ? AND stage = 'label'", [run_id])
    local = label_run(settings, run_id, show_progress=False)
    with Store(config.store) as store:
        assert (
            store.query("SELECT feature, status, label FROM labels WHERE run_id = ? ORDER BY feature", [run_id])[1]
            == labels
        )
        assert (
            store.query("SELECT feature, scorer, value, status FROM scores WHERE run_id = ? ORDER BY 1", [run_id])[1]
            == scores
        )
    assert local.calls == 0  # every answer came from the cache the workers' rows filled
