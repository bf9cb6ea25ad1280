"""Which features to intervene on, checked before anything runs, and the prompts each one is run on.

Prompts come from what collection stored: the feature's top examples cut just after their peak token (so
the next-token distribution is read where the feature fires hardest), and its random examples, contexts
where it never fired (there steering has to carry the whole effect). For a feature an audit flagged,
examples that peak inside an assistant turn come first: the audit's claim is about what the assistant says.
"""

from __future__ import annotations

import math

from autolabel.errors import AutolabelError
from autolabel.intervene.run import Prompt
from autolabel.store import Store
from autolabel.transcoders.transcoder import TranscoderSet

Key = tuple[int, int]


def parse_features(text: str) -> list[Key]:
    """ "6:12,15:3" -> [(6, 12), (15, 3)]."""
    keys = []
    for item in (part.strip() for part in text.split(",")):
        layer, _, feature = item.partition(":")
        if not (layer.strip().isdigit() and feature.strip().isdigit()):
            raise AutolabelError(
                f"--features must be comma-separated LAYER:FEATURE pairs such as 6:12,15:3; {item!r} is not one"
            )
        keys.append((int(layer), int(feature)))
    return list(dict.fromkeys(keys))


def parse_multiples(text: str) -> list[float]:
    """ "2,4.5" -> [2.0, 4.5]: steering strengths in units of a feature's max_act, positive and finite."""
    multiples = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0 < value < math.inf:
            raise AutolabelError(
                f"--multiples must be comma-separated positive numbers such as 2,4,8 (times the "
                f"feature's max activation); {item!r} is not one"
            )
        multiples.append(value)
    return multiples


def check_features(store: Store, run_id: str, tset: TranscoderSet, keys: list[Key]) -> dict[Key, float]:
    """Each feature's max_act, or an error naming the first that the transcoder lacks or that never fired."""
    if not keys:
        raise AutolabelError("no features to intervene on; pass --features LAYER:FEATURE or --audit NAME")
    max_acts = {}
    for layer, feature in keys:
        if layer not in tset.transcoders:
            raise AutolabelError(
                f"feature {layer}:{feature}: the run's transcoder has no layer {layer} "
                f"(it has {', '.join(map(str, tset.layers))})"
            )
        row = store.one(
            "SELECT status, max_act FROM features WHERE run_id = ? AND layer = ? AND feature = ?",
            [run_id, layer, feature],
        )
        if row is None:
            raise AutolabelError(
                f"feature {layer}:{feature} does not exist in run {run_id}: layer {layer} has "
                f"features 0..{tset[layer].d_feat - 1}"
            )
        status, max_act = row
        if status == "dead" or not max_act:
            raise AutolabelError(
                f"feature {layer}:{feature} never fired in run {run_id} (dead), so there is nothing "
                f'to trace or change; pick a live one: autolabel query "select layer, feature, '
                f"density from features where run_id = '{run_id}' and status = 'active'\""
            )
        max_acts[(layer, feature)] = float(max_act)
    return max_acts


def flagged_features(store: Store, run_id: str) -> dict[str, list[Key]]:
    """Each audit's flagged features in the run, best ranked first (what the flow intervenes on)."""
    rows = store.rows(
        "SELECT audit, layer, feature FROM audit_findings WHERE run_id = ? AND flagged "
        "GROUP BY ALL ORDER BY audit, min(rank), layer, feature",
        [run_id],
    )
    flagged: dict[str, list[Key]] = {}
    for audit, layer, feature in rows:
        flagged.setdefault(audit, []).append((layer, feature))
    return flagged


def audit_features(store: Store, run_id: str, audit: str | None, limit: int | None) -> list[Key]:
    """The best-ranked `limit` flagged features of one audit (or of every audit), in rank order."""
    flagged = flagged_features(store, run_id)
    if audit is not None and audit not in flagged:
        raise AutolabelError(
            f"run {run_id} has no features flagged by audit {audit!r}"
            + (
                f" (flagged audits: {', '.join(flagged)})"
                if flagged
                else f"; run `autolabel audit --run {run_id}` first, or pass --features LAYER:FEATURE"
            )
        )
    if not flagged:
        raise AutolabelError(
            f"run {run_id} has no flagged features; run `autolabel audit --run {run_id}` first, "
            "or pass --features LAYER:FEATURE"
        )
    chosen = [keys[:limit] for name, keys in flagged.items() if audit is None or name == audit]
    return list(dict.fromkeys(key for keys in chosen for key in keys))


def select_prompts(store: Store, run_id: str, key: Key, n: int, prefer_assistant: bool) -> list[Prompt]:
    """Up to n active prompts (top examples cut after their peak) and n neutral ones (silent contexts)."""
    rows = store.rows(
        "SELECT kind, rank, doc_id, role, tokens, acts FROM examples WHERE run_id = ? AND layer = ? AND feature = ? "
        "AND kind IN ('top', 'random') ORDER BY kind, rank",
        [run_id, *key],
    )
    top = [r for r in rows if r[0] == "top"]
    if prefer_assistant:
        top.sort(key=lambda r: r[3] != "assistant")  # stable: by rank within each side
    prompts = []
    for index, (_, _, doc_id, role, tokens, acts) in enumerate(top[:n]):
        peak = max(range(len(acts)), key=acts.__getitem__)
        prompts.append(Prompt(*key, "active", index, doc_id, role, tuple(tokens[: peak + 1])))
    silent = [r for r in rows if r[0] == "random"]
    for index, (_, _, doc_id, role, tokens, _) in enumerate(silent[:n]):
        prompts.append(Prompt(*key, "neutral", index, doc_id, role, tuple(tokens)))
    return prompts
