"""The index page's data: one query per section, each returning plain dicts and lists.

A section whose tables hold nothing for the run (its stage has not run yet)
returns an empty value, and the template shows "not run" for it; nothing here
assumes a later stage exists.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from autolabel.store import Store

SCORE_BINS = 10  # label-score histogram: ten bins over [0, 1]


@dataclass
class FeatureLabel:
    """The label shown for a feature, with the scores that say how far to trust it."""

    label: str | None = None
    explanation: str | None = None
    labeler: str | None = None
    status: str | None = None
    scores: dict[str, dict] = field(default_factory=dict)  # scorer -> {value, n, status, unreliable}

    @property
    def score(self) -> float | None:
        """The mean of the scorers that ran: one number for tables (the page shows each)."""
        values = [s["value"] for s in self.scores.values() if s["value"] is not None]
        return sum(values) / len(values) if values else None

    @property
    def unreliable(self) -> bool:
        return any(s["unreliable"] for s in self.scores.values())


def run_info(store: Store, run_id: str) -> dict:
    (info,) = store.dicts(
        "SELECT run_id, status, started_at, finished_at, model_id, transcoder_id, corpus_id, "
        "parent_run_id, error FROM runs WHERE run_id = ?",
        [run_id],
    )
    transcoder = store.dicts("SELECT * FROM transcoders WHERE transcoder_id = ?", [info["transcoder_id"]])
    info["transcoder"] = transcoder[0] if transcoder else None
    if info["transcoder"]:
        t = info["transcoder"]
        t["quality"] = [
            {
                "layer": layer,
                "fvu": (t["fvu_by_layer"] or {}).get(layer),
                "l0": (t["l0_by_layer"] or {}).get(layer),
                "dead": (t["dead_by_layer"] or {}).get(layer),
            }
            for layer in t["layers"] or []
        ]
    return info


def corpus_tokens(store: Store, corpus_id: str | None) -> dict:
    """Corpus tokens by role and by category (the tokens view, one pass each)."""
    if corpus_id is None:
        return {"by_role": [], "by_category": []}
    by_role = store.dicts(
        "SELECT role::VARCHAR AS name, count(*) AS tokens FROM tokens WHERE corpus_id = ? GROUP BY 1 ORDER BY 2 DESC",
        [corpus_id],
    )
    by_category = store.dicts(
        "SELECT category AS name, count(*) AS tokens FROM tokens WHERE corpus_id = ? GROUP BY 1 ORDER BY 2 DESC",
        [corpus_id],
    )
    return {"by_role": by_role, "by_category": by_category}


def llm_ledger(store: Store, run_id: str) -> list[dict]:
    return store.dicts(
        "SELECT stage, model, count(*) AS calls, count(*) FILTER (cached) AS cached, "
        "count(*) FILTER (status <> 'ok') AS failed, sum(tokens_in) AS tokens_in, "
        "sum(tokens_out) AS tokens_out, sum(cost_usd) AS cost_usd FROM llm_calls WHERE run_id = ? "
        "GROUP BY ALL ORDER BY 1, 2",
        [run_id],
    )


def feature_status(store: Store, run_id: str) -> dict:
    """Features by collection status (active / rare / dead) and by label status (ok / skipped / ...)."""
    collected = dict(store.rows("SELECT status, count(*) FROM features WHERE run_id = ? GROUP BY 1", [run_id]))
    labeled = dict(
        store.rows("SELECT status, count(DISTINCT (layer, feature)) FROM labels WHERE run_id = ? GROUP BY 1", [run_id])
    )
    return {"total": sum(collected.values()), "collected": collected, "labeled": labeled}


def feature_labels(store: Store, run_id: str) -> dict[tuple[int, int], FeatureLabel]:
    """One label per feature (a valid one first, then the newest) with every score of the feature."""
    labels: dict[tuple[int, int], FeatureLabel] = {}
    for layer, feature, label, explanation, labeler, status in store.rows(
        "SELECT layer, feature, label, explanation, labeler, status FROM labels WHERE run_id = ? "
        "QUALIFY row_number() OVER (PARTITION BY layer, feature ORDER BY status = 'ok' DESC, created_at DESC) = 1",
        [run_id],
    ):
        labels[(layer, feature)] = FeatureLabel(label, explanation, labeler, status)
    for layer, feature, labeler, scorer, value, n, status, unreliable, ci_low, ci_high, accuracy in store.rows(
        "SELECT layer, feature, labeler, scorer, value, n, status, unreliable, ci_low, ci_high, accuracy "
        "FROM scores WHERE run_id = ?",
        [run_id],
    ):
        entry = labels.get((layer, feature))
        if entry is None or entry.labeler != labeler:
            continue  # the score of another labeler's label
        entry.scores[scorer] = {
            "value": value,
            "n": n,
            "status": status,
            "unreliable": bool(unreliable),
            "ci_low": ci_low,
            "ci_high": ci_high,
            "accuracy": accuracy,
        }
    return labels


def score_distribution(labels: dict[tuple[int, int], FeatureLabel]) -> list[dict]:
    """Per scorer: counts in ten bins over [0, 1], how many failed and how many are unreliable."""
    by_scorer: dict[str, dict] = {}
    for entry in labels.values():
        for scorer, score in entry.scores.items():
            row = by_scorer.setdefault(
                scorer, {"scorer": scorer, "bins": [0] * SCORE_BINS, "failed": 0, "unreliable": 0, "n": 0}
            )
            row["n"] += 1
            row["unreliable"] += score["unreliable"]
            if score["value"] is None:
                row["failed"] += 1
            else:
                row["bins"][max(0, min(SCORE_BINS - 1, int(score["value"] * SCORE_BINS)))] += 1
    return [by_scorer[s] for s in sorted(by_scorer)]


EVIDENCE = ("ablation_kl", "influence_share")  # findings beside the audit's metrics, shown in their own columns


def audits(store: Store, run_id: str) -> list[dict]:
    """Per audit and section, one row per feature with its metrics pivoted, in the audit's rank order; `columns`
    are the audit's lift and breadth metrics (a category-restricted audit has its own)."""
    features: dict[tuple, dict] = {}
    columns: dict[str, list[str]] = defaultdict(list)
    for row in store.dicts(
        "SELECT audit, section, layer, feature, metric, value, ci_low, ci_high, flagged, rank, "
        "group_name, label, details_json->>'causal' AS causal FROM audit_findings WHERE run_id = ? "
        "ORDER BY audit, section, rank, "
        "layer, feature",
        [run_id],
    ):
        key = (row["audit"], row["section"] or "pervasive", row["layer"], row["feature"])
        entry = features.setdefault(
            key,
            {
                "layer": row["layer"],
                "feature": row["feature"],
                "rank": row["rank"],
                "group_name": row["group_name"],
                "label": row["label"],
                "flagged": False,
                "metrics": {},
            },
        )
        entry["metrics"][row["metric"]] = {
            "value": row["value"],
            "ci_low": row["ci_low"],
            "ci_high": row["ci_high"],
            "causal": row["causal"] == "true",
        }  # ablation_kl rows only
        entry["flagged"] |= bool(row["flagged"])
        if row["metric"] not in (*EVIDENCE, "assistant_turn_share") and row["metric"] not in columns[row["audit"]]:
            columns[row["audit"]].append(row["metric"])
    grouped: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (audit, section, _, _), entry in features.items():
        grouped[audit][section].append(entry)
    return [
        {"audit": audit, "sections": dict(sections), "columns": sorted(columns[audit], key=_column_order)}
        for audit, sections in grouped.items()
    ]


def _column_order(metric: str) -> tuple[bool, str]:
    return metric == "breadth", metric  # lifts first, breadth last


def audit_diffs(store: Store, run_id: str) -> list[dict]:
    """Per audit and change, the features, each with its turn share here and in the run it was compared with,
    its rank in this run's audit, its ablation and influence evidence where those ran, and that run's model
    (another model's run when an organism was audited against its base)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in store.dicts(
        "SELECT d.against_run_id, r.model_id AS against_model, d.audit, d.change, d.layer, d.feature, "
        "d.against_layer, d.against_feature, d.match, d.cosine, d.details_json, f.rank, "
        "k.value AS kl, k.ci_low AS kl_low, k.ci_high AS kl_high, k.details_json->>'causal' AS causal, "
        "i.value AS influence FROM audit_diffs d LEFT JOIN runs r ON r.run_id = d.against_run_id "
        "LEFT JOIN audit_findings f ON f.run_id = d.run_id AND f.audit = d.audit AND f.layer = d.layer AND "
        "f.feature = d.feature AND f.metric = 'assistant_turn_share' "
        "LEFT JOIN audit_findings k ON k.run_id = d.run_id AND k.audit = d.audit AND k.layer = d.layer AND "
        "k.feature = d.feature AND k.metric = 'ablation_kl' "
        "LEFT JOIN audit_findings i ON i.run_id = d.run_id AND i.audit = d.audit AND i.layer = d.layer AND "
        "i.feature = d.feature AND i.metric = 'influence_share' "
        "WHERE d.run_id = ? ORDER BY d.audit, d.change, f.rank NULLS LAST, d.layer, d.feature",
        [run_id],
    ):
        details = json.loads(row.pop("details_json") or "{}")
        row["turn_share"], row["against_turn_share"] = details.get("turn_share"), details.get("against_turn_share")
        kl = {
            "value": row.pop("kl"),
            "ci_low": row.pop("kl_low"),
            "ci_high": row.pop("kl_high"),
            "causal": row.pop("causal") == "true",
        }
        row["ablation"] = kl if kl["value"] is not None else None
        groups[(row["audit"], row["change"])].append(row)
    return [{"audit": audit, "change": change, "rows": rows} for (audit, change), rows in groups.items()]


def clusters(store: Store, run_id: str) -> list[dict]:
    return store.dicts(
        "SELECT cluster_id, name, description, size FROM clusters WHERE run_id = ? ORDER BY size DESC, cluster_id",
        [run_id],
    )


def group_members(store: Store, run_id: str) -> dict[str, list[dict]]:
    """Group name -> members, most similar first."""
    members: dict[str, list[dict]] = defaultdict(list)
    for row in store.dicts(
        "SELECT group_name, layer, feature, similarity, lift FROM groups WHERE run_id = ? "
        "ORDER BY group_name, similarity DESC NULLS LAST, layer, feature",
        [run_id],
    ):
        members[row["group_name"]].append(row)
    return dict(members)


def feature_map(store: Store, run_id: str) -> list[tuple]:
    """(layer, feature, x, y, cluster_id, reliable) per mapped feature (one without finite coordinates has no place)."""
    return store.rows(
        "SELECT layer, feature, umap_x, umap_y, cluster_id, reliable FROM feature_map "
        "WHERE run_id = ? AND isfinite(umap_x) AND isfinite(umap_y) ORDER BY layer, feature",
        [run_id],
    )
