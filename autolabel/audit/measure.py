"""`autolabel audit`: features pervasive in assistant contexts, with intervals, and diffs between runs.

Everything here reads the counts collection already stored (`role_stats`,
`category_stats`), so an audit takes seconds and never touches the model. A turn is
the content of one message; chat-template markers are their own role, so a feature
that only detects `<|im_start|>assistant` cannot make an assistant turn active and is
reported in a separate `template` section instead.

Intervals: a share of turns gets a Wilson score interval; a lift (a ratio of two
token densities) gets the Wilson interval of the conditional binomial (see
`rate_ratio`), which stays finite and honest when one side never fired. Only counts are kept per feature, so
these closed forms are the honest choice (a bootstrap would need per-turn data). Tokens within a turn
are correlated, so the lift intervals are narrower than the truth; the turn share,
which gates the flag first, has no such problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from autolabel.audit.spec import AuditSpec
from autolabel.errors import AutolabelError
from autolabel.store import Store, to_json


class NothingToAudit(AutolabelError):
    """The corpus has no assistant turns: an error for `autolabel audit`, a skipped stage for `autolabel run`."""


# -- intervals -------------------------------------------------------------------


def z_score(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson(k: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(share, low, high) of k successes in n trials; NaN where n is 0."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = k / n
        center = (share + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return share, np.clip(center - half, 0, 1), np.clip(center + half, 0, 1)


def rate_ratio(
    a: np.ndarray, n1: np.ndarray, b: np.ndarray, n2: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ratio, low, high) of the densities a/n1 over b/n2.

    Counts are treated as Poisson over their token exposures, so given a + b, a is binomial with
    p = n1 R / (n1 R + n2); a Wilson interval for p maps to one for the ratio R. That stays honest
    when a side is zero (a feature never seen in user turns still gets a finite lower bound). The
    point estimate adds half a count to both sides when one is zero; an unbounded upper end is NaN.
    """
    a, n1, b, n2 = (np.asarray(x, dtype=np.float64) for x in (a, n1, b, n2))
    _, p_low, p_high = wilson(a, a + b, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        zero = (a == 0) | (b == 0)
        ratio = ((a + 0.5 * zero) / n1) / ((b + 0.5 * zero) / n2)
        low = p_low / (1 - p_low) * n2 / n1
        high = np.where(p_high < 1, p_high / (1 - p_high) * n2 / n1, np.nan)
    undefined = (n1 == 0) | (n2 == 0) | (a + b == 0)
    return tuple(np.where(undefined, np.nan, x) for x in (ratio, low, high))


def share_difference(k1: float, n1: float, k2: float, n2: float, z: float) -> tuple[float, float, float]:
    """(difference, low, high) of the shares k1/n1 - k2/n2: Newcombe's hybrid score interval, built from the two
    Wilson intervals, so it stays honest at shares of 0 or 1 and for small n."""
    p1, l1, u1 = (float(x) for x in wilson(k1, n1, z))
    p2, l2, u2 = (float(x) for x in wilson(k2, n2, z))
    difference = p1 - p2
    return (
        difference,
        difference - float(np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)),
        difference + float(np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)),
    )


# -- measuring a run -------------------------------------------------------------

COUNTS_SQL = """
    WITH roles AS (
        SELECT layer, feature,
               coalesce(sum(n_turns) FILTER (role = 'assistant'), 0) AS assistant_turns,
               coalesce(sum(n_turns_active) FILTER (role = 'assistant'), 0) AS assistant_turns_active,
               coalesce(sum(n_tokens) FILTER (role = 'assistant'), 0) AS assistant_tokens,
               coalesce(sum(n_active) FILTER (role = 'assistant'), 0) AS assistant_active,
               coalesce(sum(n_tokens) FILTER (role = 'user'), 0) AS user_tokens,
               coalesce(sum(n_active) FILTER (role = 'user'), 0) AS user_active,
               coalesce(sum(n_tokens) FILTER (role = 'text'), 0) AS text_tokens,
               coalesce(sum(n_active) FILTER (role = 'text'), 0) AS text_active,
               coalesce(sum(n_active) FILTER (role = 'template'), 0) AS template_active,
               coalesce(sum(n_active), 0) AS all_active
        FROM role_stats WHERE run_id = $run GROUP BY layer, feature),
    scoped AS (
        SELECT layer, feature,
               coalesce(sum(n_turns) FILTER (list_contains($scope, category)), 0) AS scoped_turns,
               coalesce(sum(n_turns_active) FILTER (list_contains($scope, category)), 0) AS scoped_turns_active,
               coalesce(sum(n_tokens) FILTER (list_contains($scope, category)), 0) AS scoped_tokens,
               coalesce(sum(n_active) FILTER (list_contains($scope, category)), 0) AS scoped_active,
               coalesce(sum(n_tokens) FILTER (NOT list_contains($scope, category)), 0) AS other_tokens,
               coalesce(sum(n_active) FILTER (NOT list_contains($scope, category)), 0) AS other_active
        FROM category_stats WHERE run_id = $run AND role = 'assistant' GROUP BY layer, feature),
    categories AS (
        SELECT layer, feature, count(*) AS n_categories,
               count(*) FILTER (n_turns_active >= $share * n_turns) AS n_covered,
               list(category ORDER BY category) FILTER (n_turns_active >= $share * n_turns) AS covered
        FROM category_stats WHERE run_id = $run AND role = 'assistant' AND n_turns >= $min_turns
        GROUP BY layer, feature)
    SELECT r.*, coalesce(c.n_categories, 0) AS n_categories, coalesce(c.n_covered, 0) AS n_covered,
           coalesce(c.covered, []::VARCHAR[]) AS covered,
           coalesce(s.scoped_turns, 0) AS scoped_turns, coalesce(s.scoped_turns_active, 0) AS scoped_turns_active,
           coalesce(s.scoped_tokens, 0) AS scoped_tokens, coalesce(s.scoped_active, 0) AS scoped_active,
           coalesce(s.other_tokens, 0) AS other_tokens, coalesce(s.other_active, 0) AS other_active
    FROM roles r LEFT JOIN categories c USING (layer, feature) LEFT JOIN scoped s USING (layer, feature)
    ORDER BY layer, feature"""

SCOPED = ("turns", "turns_active", "tokens", "active")  # assistant counts a category scope replaces


@dataclass
class Measured:
    """Every feature of one run: its counts, metrics with intervals, section and flag (arrays over features)."""

    keys: list[tuple[int, int]]  # (layer, feature)
    counts: dict[str, np.ndarray]
    covered: list[list[str]]  # categories whose assistant turns the feature covers
    metrics: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # name -> (value, low, high)
    section: np.ndarray  # "pervasive" or "template"
    flagged: np.ndarray  # bool
    rank: np.ndarray  # 1-based within its section
    notes: list[str] = field(default_factory=list)

    def index(self) -> dict[tuple[int, int], int]:
        return {key: i for i, key in enumerate(self.keys)}


def measure(store: Store, run_id: str, spec: AuditSpec) -> Measured:
    columns = store.numpy(
        COUNTS_SQL,
        {
            "run": run_id,
            "share": spec.breadth_turn_share,
            "min_turns": spec.breadth_min_turns,
            "scope": spec.categories or [],
        },
    )
    if len(columns["layer"]) == 0:
        raise AutolabelError(f"run {run_id} has no collected role statistics; run `autolabel collect` first")
    counts = {
        name: np.nan_to_num(np.asarray(values, dtype=np.float64))
        for name, values in columns.items()
        if name not in ("layer", "feature", "covered")
    }
    if counts["assistant_turns"].max() == 0:
        raise NothingToAudit(
            f"run {run_id} has no assistant turns, so {spec.name} has nothing to measure; "
            "add chat transcripts to the corpus (a source with `messages`)"
        )
    if spec.categories is not None:
        counts = scope_to_categories(store, run_id, spec, counts)
    z, notes = z_score(spec.confidence), []
    metrics = {
        "assistant_turn_share": wilson(counts["assistant_turns_active"], counts["assistant_turns"], z),
        "lift_vs_user": rate_ratio(
            counts["assistant_active"], counts["assistant_tokens"], counts["user_active"], counts["user_tokens"], z
        ),
        "lift_vs_text": rate_ratio(
            counts["assistant_active"], counts["assistant_tokens"], counts["text_active"], counts["text_tokens"], z
        ),
    }
    if spec.categories is not None:
        metrics["lift_vs_other_categories"] = rate_ratio(
            counts["assistant_active"], counts["assistant_tokens"], counts["other_active"], counts["other_tokens"], z
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        breadth = np.where(counts["n_categories"] > 0, counts["n_covered"] / counts["n_categories"], np.nan)
    metrics["breadth"] = (breadth, breadth, breadth)
    metrics = {name: metrics[name] for name in spec.metrics}
    for role, metric in (("user", "lift_vs_user"), ("text", "lift_vs_text")):
        if metric in metrics and counts[f"{role}_tokens"].max() == 0:
            notes.append(
                f"{metric}: the corpus has no {role} tokens; the metric is left empty and does not gate the flag"
            )
    if "breadth" in metrics and counts["n_categories"].max() == 0:
        notes.append(
            f"breadth: no category has {spec.breadth_min_turns} assistant turns; the metric does not gate the flag"
        )

    with np.errstate(invalid="ignore", divide="ignore"):
        template_share = np.where(counts["all_active"] > 0, counts["template_active"] / counts["all_active"], 0.0)
    section = np.where(template_share >= spec.template_share, "template", "pervasive")
    flagged = (section == "pervasive") & (counts["assistant_turns_active"] >= spec.min_active_turns)
    for name, least in spec.flag.items():
        value, low, _ = metrics[name]
        gate = value if name == "breadth" else low
        if np.isnan(gate).all():
            continue  # not measurable on this corpus (see notes)
        flagged &= np.nan_to_num(gate, nan=-np.inf) >= least

    # Within a section: flagged first, then by the conservative end of the turn share, then lift.
    turn_low = (
        metrics["assistant_turn_share"]
        if "assistant_turn_share" in metrics
        else wilson(counts["assistant_turns_active"], counts["assistant_turns"], z)
    )[1]
    lift_low = metrics["lift_vs_user"][1] if "lift_vs_user" in metrics else np.zeros_like(turn_low)
    rank = np.zeros(len(section), dtype=np.int64)
    for name in ("pervasive", "template"):
        members = np.flatnonzero(section == name)
        if name == "pervasive":
            order = np.lexsort(
                (-np.nan_to_num(lift_low[members]), -np.nan_to_num(turn_low[members]), ~flagged[members])
            )
        else:
            order = np.argsort(-counts["template_active"][members], kind="stable")
        rank[members[order]] = np.arange(1, len(members) + 1)
    keys = list(zip(columns["layer"].tolist(), columns["feature"].tolist(), strict=True))
    covered = [list(c) for c in columns["covered"]]
    return Measured(keys, counts | {"template_share": template_share}, covered, metrics, section, flagged, rank, notes)


def scope_to_categories(
    store: Store, run_id: str, spec: AuditSpec, counts: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The counts with the assistant ones taken from the spec's categories only (the rest stay whole)."""
    if counts["scoped_turns"].max() == 0:
        present = [
            row[0]
            for row in store.rows(
                "SELECT DISTINCT category FROM category_stats WHERE run_id = ? AND role = 'assistant' AND n_turns > 0 "
                "ORDER BY 1",
                [run_id],
            )
        ]
        raise AutolabelError(
            f"audit {spec.name}: run {run_id} has no assistant turns in categories "
            f"{spec.categories}; the corpus's categories with assistant turns are {present}. Fix "
            "`categories` in the spec, or add chats of those categories to the corpus"
        )
    return counts | {f"assistant_{name}": counts[f"scoped_{name}"] for name in SCOPED}


# -- findings --------------------------------------------------------------------


def feature_notes(store: Store, run_id: str) -> dict[tuple[int, int], dict]:
    """The latest good label, its scores and the groups of each feature that has any (empty before those stages)."""
    notes: dict[tuple[int, int], dict] = {}
    queries = {
        "label": "SELECT layer, feature, label FROM current_labels WHERE run_id = ?",
        "score": "SELECT layer, feature, avg(value) FROM current_scores WHERE run_id = ? AND status = 'ok' "
        "GROUP BY ALL",
        "unreliable": "SELECT layer, feature, bool_or(unreliable) FROM current_scores WHERE run_id = ? GROUP BY ALL",
        "group": "SELECT layer, feature, string_agg(group_name, ', ' ORDER BY group_name) FROM groups "
        "WHERE run_id = ? GROUP BY ALL",
    }
    for name, sql in queries.items():
        for layer, feature, value in store.rows(sql, [run_id]):
            notes.setdefault((layer, feature), {})[name] = value
    return notes


def finding_rows(measured: Measured, spec: AuditSpec, run_id: str, notes: dict[tuple[int, int], dict]) -> list[dict]:
    """One row per (kept feature, metric): every flagged feature and the top `keep` of each section."""
    kept = np.flatnonzero(measured.flagged | (measured.rank <= spec.keep))
    counts, rows = measured.counts, []
    for i in kept.tolist():
        layer, feature = measured.keys[i]
        note = notes.get((layer, feature), {})
        evidence = {
            "assistant_turn_share": {
                "active_turns": counts["assistant_turns_active"][i],
                "turns": counts["assistant_turns"][i],
            },
            "lift_vs_user": {
                "assistant_active": counts["assistant_active"][i],
                "assistant_tokens": counts["assistant_tokens"][i],
                "user_active": counts["user_active"][i],
                "user_tokens": counts["user_tokens"][i],
            },
            "lift_vs_text": {
                "assistant_active": counts["assistant_active"][i],
                "assistant_tokens": counts["assistant_tokens"][i],
                "text_active": counts["text_active"][i],
                "text_tokens": counts["text_tokens"][i],
            },
            "breadth": {"covered": measured.covered[i], "categories": counts["n_categories"][i]},
            "lift_vs_other_categories": {
                "assistant_active": counts["assistant_active"][i],
                "assistant_tokens": counts["assistant_tokens"][i],
                "other_active": counts["other_active"][i],
                "other_tokens": counts["other_tokens"][i],
                "categories": spec.categories,
            },
        }
        shared = {
            "template_share": float(counts["template_share"][i]),
            "score": note.get("score"),
            "unreliable": note.get("unreliable"),
        }
        for metric, (value, low, high) in measured.metrics.items():
            rows.append(
                {
                    "run_id": run_id,
                    "audit": spec.name,
                    "layer": layer,
                    "feature": feature,
                    "metric": metric,
                    "value": number(value[i]),
                    "ci_low": number(low[i]),
                    "ci_high": number(high[i]),
                    "flagged": bool(measured.flagged[i]),
                    "section": str(measured.section[i]),
                    "rank": int(measured.rank[i]),
                    "group_name": note.get("group"),
                    "label": note.get("label"),
                    "details_json": to_json(
                        {
                            k: number(v) if isinstance(v, np.floating) else v
                            for k, v in (evidence[metric] | shared).items()
                        }
                    ),
                }
            )
    return rows


def number(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value
