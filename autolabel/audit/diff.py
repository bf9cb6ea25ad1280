"""`autolabel audit --against RUN`: what changed between an earlier run and this one.

A flag is a threshold on interval bounds, so a feature near a threshold crosses it between two samples of the
same model (two corpus seeds flipped 10% of the flags). A crossing counts as a change (`became_pervasive`,
`stopped_pervasive`) only when the feature's assistant-turn share moved beyond sampling noise: the Newcombe
interval of the difference between the runs' shares, at the spec's confidence, excludes zero in the
direction of the flip. Other crossings are stored as `within_noise`, so they stay queryable but no reader
takes them for a change of behaviour.
"""

from __future__ import annotations

import numpy as np
import torch

from autolabel.audit.measure import Measured, number, share_difference, z_score
from autolabel.audit.spec import AuditSpec
from autolabel.errors import AutolabelError
from autolabel.store import to_json

Key = tuple[int, int]


def identity_matches(keys: list[Key], other: Measured) -> dict[Key, tuple[Key, float | None]]:
    present = other.index()
    return {key: (key, None) for key in keys if key in present}


@torch.inference_mode()
def cosine_matches(
    keys: list[Key], decoders: dict[int, torch.Tensor], other_decoders: dict[int, torch.Tensor], least: float
) -> dict[Key, tuple[Key, float]]:
    """Each feature's most similar decoder direction at the same layer of the other transcoder, if at least `least`."""
    matches = {}
    for layer in sorted({layer for layer, _ in keys} & set(decoders) & set(other_decoders)):
        ids = [feature for at, feature in keys if at == layer]
        rows, others = _directions(decoders[layer][ids]), _directions(other_decoders[layer])  # [n, d], [F', d]
        if rows.shape[1] != others.shape[1]:
            raise AutolabelError(
                f"layer {layer}: the decoders have {rows.shape[1]} and {others.shape[1]} output "
                "dimensions, so the runs' models differ; diff runs of one model (or its checkpoints)"
            )
        best, where = torch.zeros(len(ids)), torch.zeros(len(ids), dtype=torch.long)
        for start in range(0, len(ids), 1024):  # bounded memory for big dictionaries
            similarity = rows[start : start + 1024] @ others.T  # [chunk, F']
            best[start : start + 1024], where[start : start + 1024] = similarity.max(dim=1)
        for feature, cosine, match in zip(ids, best.tolist(), where.tolist(), strict=True):
            if cosine >= least:
                matches[(layer, feature)] = ((layer, match), cosine)
    return matches


def _directions(rows: torch.Tensor) -> torch.Tensor:
    """Unit decoder directions [n, d] of decoder rows (Transcoder.decoder_rows)."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def diff_rows(
    now: Measured,
    earlier: Measured,
    spec: AuditSpec,
    run_id: str,
    against: str,
    labels: tuple[dict[Key, str], dict[Key, str]],
    decoders: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None,
) -> list[dict]:
    """Features that became or stopped being flagged, and labels that changed, between `against` and `run_id`.

    Matched by identity when `decoders` is None (one transcoder), otherwise by decoder-direction cosine
    (another transcoder or checkpoint). A row's layer/feature is the feature in `run_id`, or the earlier
    run's when it has no match here (match = 'none').
    """
    flagged_now = [now.keys[i] for i in np.flatnonzero(now.flagged)]
    flagged_before = [earlier.keys[i] for i in np.flatnonzero(earlier.flagged)]
    labels_now, labels_before = labels
    ask_forward = sorted(set(flagged_now) | set(labels_now))
    ask_backward = sorted(set(flagged_before))
    if decoders is None:
        forward, backward, kind = (
            identity_matches(ask_forward, earlier),
            identity_matches(ask_backward, now),
            "identity",
        )
    else:
        forward = cosine_matches(ask_forward, decoders[0], decoders[1], spec.match_cosine)
        backward = cosine_matches(ask_backward, decoders[1], decoders[0], spec.match_cosine)
        kind = "decoder_cosine"
    now_index, before_index = now.index(), earlier.index()
    rows = []

    def row(change: str, key: Key, other: Key | None, cosine: float | None, details: dict) -> dict:
        layer, feature = key
        return {
            "run_id": run_id,
            "against_run_id": against,
            "audit": spec.name,
            "change": change,
            "layer": layer,
            "feature": feature,
            "against_layer": other[0] if other else None,
            "against_feature": other[1] if other else None,
            "match": kind if other else "none",
            "cosine": cosine,
            "details_json": to_json(details),
        }

    def share(measured: Measured, index: dict[Key, int], key: Key | None) -> float | None:
        if key not in index or "assistant_turn_share" not in measured.metrics:
            return None
        return number(measured.metrics["assistant_turn_share"][0][index[key]])

    def moved(key: Key | None, other: Key | None) -> tuple[float, float, float] | None:
        """The change in assistant-turn share from the earlier run's `other` to this run's `key`, with its interval."""
        if key is None or other is None:
            return None
        i, j = now_index[key], before_index[other]
        return share_difference(
            now.counts["assistant_turns_active"][i],
            now.counts["assistant_turns"][i],
            earlier.counts["assistant_turns_active"][j],
            earlier.counts["assistant_turns"][j],
            z,
        )

    z = z_score(spec.confidence)
    for key in flagged_now:
        other, cosine = forward.get(key, (None, None))
        if other is None or not earlier.flagged[before_index[other]]:
            change = moved(key, other)
            rows.append(
                row(
                    "became_pervasive" if change is None or change[1] > 0 else "within_noise",
                    key,
                    other,
                    cosine,
                    {
                        "turn_share": share(now, now_index, key),
                        "flag": "became",
                        "against_turn_share": share(earlier, before_index, other),
                        "share_change": change,
                    },
                )
            )
    for key in flagged_before:
        here, cosine = backward.get(key, (None, None))
        if here is None or not now.flagged[now_index[here]]:
            change = moved(here, key)
            entry = row(
                "stopped_pervasive" if change is None or change[2] < 0 else "within_noise",
                here or key,
                key,
                cosine,
                {
                    "turn_share": share(now, now_index, here),
                    "flag": "stopped",
                    "against_turn_share": share(earlier, before_index, key),
                    "share_change": change,
                },
            )
            rows.append(entry | {"match": kind if here else "none"})
    for key, label in labels_now.items():
        other, cosine = forward.get(key, (None, None))
        before = labels_before.get(other) if other else None
        if before is not None and _normal(before) != _normal(label):
            rows.append(row("label_changed", key, other, cosine, {"label": label, "against_label": before}))
    return rows


def _normal(label: str) -> str:
    return " ".join(label.lower().split())
