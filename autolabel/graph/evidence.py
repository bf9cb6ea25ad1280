"""Influence evidence read back from `feature_graphs`, in the form the audit stores beside its findings.

A feature's `influence_share` finding is its mean influence share on the targets over the prompts it was
traced on (graph/feature.py), with a 95% Student-t interval over those prompts; its details say on how many
of them pruning kept it, i.e. it lay on a high-influence path to the output.
"""

from __future__ import annotations

from autolabel.intervene.evidence import Effect, mean_interval
from autolabel.store import Store, to_json

METRIC = "influence_share"
Key = tuple[int, int]


def influence_shares(store: Store, run_id: str) -> dict[Key, tuple[Effect, int]]:
    """Per traced feature: (its share over its prompts, on how many pruning kept it)."""
    rows = store.rows(
        "SELECT layer, feature, list(share ORDER BY prompt_index), count(*) FILTER (kept) "
        "FROM feature_graphs WHERE run_id = ? GROUP BY ALL ORDER BY ALL",
        [run_id],
    )
    return {(layer, feature): (mean_interval(shares), kept) for layer, feature, shares, kept in rows}


def influence_rows(findings: list[dict], shares: dict[Key, tuple[Effect, int]]) -> list[dict]:
    """An `influence_share` row beside each audit's finding of every traced feature."""
    rows, seen = [], set()
    for finding in findings:
        key = (finding["layer"], finding["feature"])
        if (finding["audit"], key) in seen or key not in shares:
            continue
        seen.add((finding["audit"], key))
        effect, kept = shares[key]
        rows.append(
            finding
            | {
                "metric": METRIC,
                "value": effect.mean,
                "ci_low": effect.low,
                "ci_high": None if effect.high is None else min(effect.high, 1.0),
                "details_json": to_json({"prompts": effect.n, "kept": kept}),
            }
        )
    return rows


def finding_rows_of(store: Store, run_id: str, key: Key, traced: list[dict]) -> list[dict]:
    """The `influence_share` rows of one feature's stored findings (every audit), from its `feature_graphs` rows."""
    findings = store.dicts(
        "SELECT * FROM audit_findings WHERE run_id = ? AND layer = ? AND feature = ? "
        "AND metric <> ? ORDER BY audit, metric",
        [run_id, *key, METRIC],
    )
    shares = {key: (mean_interval([row["share"] for row in traced]), sum(row["kept"] for row in traced))}
    return influence_rows(findings, shares)
