"""`autolabel audit`: measure every spec on a run, store its findings, and diff against an earlier run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from autolabel.audit.diff import diff_rows
from autolabel.audit.measure import feature_notes, finding_rows, measure
from autolabel.audit.spec import AuditSpec
from autolabel.graph.evidence import influence_rows, influence_shares
from autolabel.intervene.evidence import CAUSAL_KL, Effect, ablation_effects
from autolabel.store import Store, to_json

STAGE = "audit"


@dataclass
class AuditResult:
    audit: str
    n_features: int
    flagged: list[
        dict
    ]  # the flagged features by rank: layer, feature, label, group, metrics {name: (value, low, high)}
    template: list[dict]  # the top of the template section, in the same form
    notes: list[str]
    changes: dict[str, int] = field(default_factory=dict)  # diff change -> count


@dataclass
class AuditSummary:
    run_id: str
    against: str | None
    results: list[AuditResult]
    skipped: str | None = None  # why no audit ran (a corpus without chats)


def audit_stage(
    store: Store,
    run_id: str,
    specs: list[AuditSpec],
    against: str | None = None,
    decoders: Callable[[str], dict[int, torch.Tensor]] | None = None,
) -> AuditSummary:
    """Audit `run_id`; with `against`, also diff it against that earlier run.

    `decoders(run_id)` gives a run's decoder rows per layer and is used only when the two runs have
    different transcoders (features are then matched by decoder-direction cosine, not by id).
    """
    transcoder = _transcoder(store, run_id)
    same_transcoder = against is None or (transcoder is not None and transcoder == _transcoder(store, against))
    notes = feature_notes(store, run_id)  # labels, scores and groups: the same for every spec
    labels = None
    if against is not None:
        labels = (
            {key: n["label"] for key, n in notes.items() if n.get("label")},
            {key: n["label"] for key, n in feature_notes(store, against).items() if n.get("label")},
        )
    results = []
    for spec in specs:
        measured = measure(store, run_id, spec)
        findings = finding_rows(measured, spec, run_id, notes)
        tables = {
            "audit_findings": findings
            + causal_rows(findings, ablation_effects(store, run_id))
            + influence_rows(findings, influence_shares(store, run_id))
        }
        clear = {"audit_findings": {"run_id": run_id, "audit": spec.name}}
        changes: dict[str, int] = {}
        if against is not None:
            earlier = measure(store, against, spec)
            matching = (
                None
                if same_transcoder
                else (_layers(decoders(run_id), measured.keys), _layers(decoders(against), earlier.keys))
            )
            tables["audit_diffs"] = diff_rows(measured, earlier, spec, run_id, against, labels, matching)
            clear["audit_diffs"] = {"run_id": run_id, "against_run_id": against, "audit": spec.name}
            for row in tables["audit_diffs"]:
                changes[row["change"]] = changes.get(row["change"], 0) + 1
        store.write_shard(
            run_id, STAGE, spec.name if against is None else f"{spec.name}:{against}", tables, replace=True, clear=clear
        )
        features = _by_feature(tables["audit_findings"])
        results.append(
            AuditResult(
                spec.name,
                len(measured.keys),
                [f for f in features if f["section"] == "pervasive" and f["flagged"]],
                [f for f in features if f["section"] == "template"][:10],
                measured.notes,
                changes,
            )
        )
    return AuditSummary(run_id, against, results)


def causal_rows(findings: list[dict], effects: dict[tuple[int, int], Effect]) -> list[dict]:
    """An `ablation_kl` row for each finding's feature that `autolabel intervene` ablated: the mean KL on
    assistant prompts where it fires, with its 95% interval; details say whether that shows a causal
    effect or the feature is (so far) only correlational."""
    rows, seen = [], set()
    for finding in findings:
        key = (finding["layer"], finding["feature"])
        if key in seen or key not in effects:
            continue
        seen.add(key)
        effect = effects[key]
        rows.append(
            finding
            | {
                "metric": "ablation_kl",
                "value": effect.mean,
                "ci_low": effect.low,
                "ci_high": effect.high,
                "details_json": to_json({"prompts": effect.n, "causal": effect.causal, "min_kl": CAUSAL_KL}),
            }
        )
    return rows


def _transcoder(store: Store, run_id: str) -> str | None:
    row = store.one("SELECT transcoder_id FROM runs WHERE run_id = ?", [run_id])
    return row[0] if row else None


def _layers(decoders: dict[int, torch.Tensor], keys: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """Only the layers the run collected, so every match is a feature with measurements."""
    collected = {layer for layer, _ in keys}
    return {layer: rows for layer, rows in decoders.items() if layer in collected}


def _by_feature(rows: list[dict]) -> list[dict]:
    """The long findings rows folded into one dict per feature, by section and rank."""
    features: dict[tuple[int, int], dict] = {}
    for row in rows:
        entry = features.setdefault(
            (row["layer"], row["feature"]),
            {key: row[key] for key in ("layer", "feature", "section", "rank", "flagged", "label", "group_name")}
            | {"metrics": {}},
        )
        entry["metrics"][row["metric"]] = (row["value"], row["ci_low"], row["ci_high"])
    return sorted(features.values(), key=lambda f: (f["section"], f["rank"]))
