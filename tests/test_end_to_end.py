"""The default pipeline on the real SmolLM2 over every default source, at reduced size."""

from __future__ import annotations

import json

import yaml
from test_cli import run_cli

from autolabel.config import RunConfig


def test_default_run_at_reduced_size(monkeypatch, capsys, tmp_path, cache_dir, prefect_api):
    config = RunConfig().model_dump(mode="json")
    for source in config["corpus"]["sources"]:
        source["limit"] = 2
    config["corpus"]["generation"].update(max_new_tokens=12, batch_size=8)
    config.update(cache_dir=str(cache_dir), store=str(tmp_path / "run.duckdb"))
    config["report"]["out_dir"] = str(tmp_path / "reports")
    config["audit"]["label_flagged"] = 2  # the best two flagged features, through the local llama.cpp server
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")

    def query(fmt: str, sql: str) -> str:
        code, out, err = run_cli(monkeypatch, capsys, "query", "-f", fmt, "--store", str(tmp_path / "run.duckdb"), sql)
        assert code == 0, err
        return out

    code, out, err = run_cli(monkeypatch, capsys, "run", "-c", str(path), "-q")
    assert code == 0, err
    assert "run " in out and "complete" in out
    report = out.split("report: ", 1)[1].split()[0]  # the run ends by printing its report's path
    assert report.startswith(str(tmp_path / "reports")) and report.endswith("index.html")
    assert "assistant_pervasiveness" in open(report, encoding="utf-8").read()

    out = query("csv", "select role, count(*) from tokens group by role order by role")
    roles = dict(line.split(",") for line in out.strip().splitlines()[1:])
    assert set(roles) == {"system", "user", "assistant", "template", "text"}
    assert all(int(n) > 0 for n in roles.values())

    out = query("csv", "select r.status, c.status, c.n_docs from runs r join corpora c using (corpus_id)")
    status, corpus_status, n_docs = out.strip().splitlines()[1].split(",")
    # 2 per built-in source (rho_refusal: 2 pairs), 2 per prompt category
    assert (status, corpus_status) == ("complete", "complete") and int(n_docs) == 2 * 7 + 2 + 2 * 6
    out = query(
        "csv", "select count(*) from documents where kind = 'chat' and messages_json->>'$[-1].role' <> 'assistant'"
    )
    assert out.strip().splitlines()[1] == "0"  # every chat got the subject model's reply

    # The embedded transcoders were checked against the model and recorded with the run.
    out = query(
        "json",
        "select t.layers, map_values(t.fvu_by_layer) as fvu from runs r join transcoders t using (transcoder_id)",
    )
    (row,) = json.loads(out)
    assert row["layers"] == [6, 15, 24] and all(0 < v < 0.5 for v in row["fvu"])

    # Collection: every feature of every layer has a row; examples and role statistics exist.
    out = query(
        "json",
        "select layer, count(*) as n, sum(n_active) as fired, count(distinct n_tokens) as sizes "
        "from features group by layer order by layer",
    )
    assert [(r["layer"], r["n"], r["sizes"]) for r in json.loads(out)] == [(6, 2048, 1), (15, 2048, 1), (24, 2048, 1)]
    assert all(r["fired"] > 0 for r in json.loads(out))
    out = query(
        "json",
        "select kind, count(*) as n, min(len(tokens)) as shortest, bool_and(len(tokens) = len(acts)) "
        "as aligned from examples group by kind order by kind",
    )
    by_kind = {r["kind"]: r for r in json.loads(out)}
    assert set(by_kind) == {"quantile", "random", "top"} and all(r["aligned"] for r in by_kind.values())
    out = query("csv", "select count(distinct role), sum(n_turns_active) > 0 from role_stats")
    assert out.strip().splitlines()[1] == "5,True"

    # The assistant-pervasiveness audit ranked the features, every metric with its interval.
    out = query(
        "json",
        "select section, count(distinct (layer, feature)) as n, count(distinct metric) as metrics, "
        "bool_and(ci_low <= value and value <= ci_high) as inside from audit_findings "
        "where metric not in ('breadth', 'ablation_kl') group by section order by section",
    )
    sections = {r["section"]: r for r in json.loads(out)}
    assert sections["pervasive"]["n"] >= 200 and sections["pervasive"]["metrics"] == 3
    assert all(r["inside"] for r in sections.values())

    # The two best-ranked flagged features were labeled and scored in the run: detection, fuzzing, embedding,
    # and steering (the judge of their steered continuations).
    out = query(
        "json",
        "select l.layer, l.feature, l.status, a.rank, count(s.scorer) as scores from labels l "
        "join audit_findings a using (run_id, layer, feature) left join scores s "
        "using (run_id, layer, feature) where a.metric = 'breadth' group by all order by a.rank",
    )
    labeled = json.loads(out)
    assert [r["rank"] for r in labeled] == [1, 2] and all(r["status"] == "ok" and r["scores"] == 4 for r in labeled)

    # The same two were ablated and steered, and their findings carry the ablation effect with its interval.
    out = query(
        "json",
        "select a.rank, count(distinct i.setting || i.multiple) as settings, "
        "any_value(a.details_json->>'causal') as causal from audit_findings a join interventions i "
        "using (run_id, layer, feature) where a.metric = 'ablation_kl' group by a.rank order by a.rank",
    )
    assert [(r["rank"], r["settings"]) for r in json.loads(out)] == [(1, 4), (2, 4)]  # ablate + 3 strengths
    assert all(r["causal"] in ("true", "false") for r in json.loads(out))

    # Every feature that fired is on the map; the audit ran again after labeling, so its findings carry the labels.
    out = query(
        "json",
        "select (select count(*) from feature_map) as mapped, "
        "(select count(*) from features where status <> 'dead') as fired, "
        "(select count(distinct (layer, feature)) from audit_findings where label is not null) "
        "as labeled_findings, (select count(*) from labels where status = 'ok') as labels",
    )
    (counts,) = json.loads(out)
    assert counts["mapped"] == counts["fired"] > 0 and counts["labeled_findings"] == counts["labels"] == 2
