"""Which features of an organism's run carry its planted quirk, computed without any LLM: the quirk's text is
known by construction, so every token of the organism's corpus is known to be inside it or not.

A feature is *tied* to the quirk when the peak tokens of at least `tied_share` of its top examples fall inside
the quirk's text (the spec's detector matches in assistant turns). The audit is then scored on where tied
features rank: among the features that became pervasive against the base model's run, and, for a narrow
quirk, among the features whose firing became specific to the quirk's categories.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from autolabel.audit.measure import feature_notes
from autolabel.corpus.documents import Document, Message
from autolabel.errors import AutolabelError
from autolabel.organism.data import encode_chat
from autolabel.organism.spec import OrganismSpec
from autolabel.store import Store

Key = tuple[int, int]


def quirk_masks(store: Store, corpus_id: str, tokenizer, spec: OrganismSpec) -> dict[str, np.ndarray]:
    """Per chat of the corpus: [n_tokens] bool, the assistant tokens inside a detector match."""
    masks = {}
    for doc_id, source, category, messages_json, token_ids in store.rows(
            "SELECT d.doc_id, d.source, d.category, d.messages_json, t.token_ids FROM documents d "
            "JOIN doc_tokens t USING (corpus_id, doc_id) WHERE d.corpus_id = ? AND d.kind = 'chat'",
            [corpus_id]):
        messages = [Message(m["role"], m["content"]) for m in json.loads(messages_json)]
        example = encode_chat(tokenizer, spec, Document(doc_id, "chat", source, category, messages=messages))
        if len(example.token_ids) != len(token_ids):
            raise AutolabelError(f"document {doc_id} of corpus {corpus_id} re-tokenizes to {len(example.token_ids)} "
                                 f"tokens, not the stored {len(token_ids)}: pass the tokenizer the corpus was built with")
        masks[doc_id] = example.quirk_mask
    return masks


def peak_in_quirk(store: Store, run_id: str, masks: dict[str, np.ndarray], top_n: int,
                  keys: list[Key] | None = None) -> dict[Key, float]:
    """Per feature (those in `keys`, or all): the share of its top `top_n` examples whose peak token lies
    inside the quirk."""
    hits: dict[Key, list[bool]] = defaultdict(list)
    wanted = set(keys) if keys is not None else None
    for layer, feature, doc_id, start, acts in store.rows(
            "SELECT layer, feature, doc_id, start, acts FROM examples WHERE run_id = ? AND kind = 'top' "
            "AND rank <= ? ORDER BY layer, feature, rank", [run_id, top_n]):
        if wanted is not None and (layer, feature) not in wanted:
            continue
        mask = masks.get(doc_id)
        peak = start + int(np.argmax(acts))
        hits[(layer, feature)].append(bool(mask is not None and peak < len(mask) and mask[peak]))
    return {key: sum(flags) / len(flags) for key, flags in hits.items()}


def became_pervasive(store: Store, run_id: str, against: str, audit: str) -> list[dict]:
    """The features that became pervasive against the earlier run, in the audit's rank order, each with its
    turn share now and before, label and mean label score (when the label stage has run)."""
    notes = feature_notes(store, run_id)
    rows = []
    for layer, feature, rank, details in store.rows(
            "SELECT d.layer, d.feature, f.rank, d.details_json FROM audit_diffs d JOIN audit_findings f "
            "ON f.run_id = d.run_id AND f.audit = d.audit AND f.layer = d.layer AND f.feature = d.feature "
            "AND f.metric = 'assistant_turn_share' WHERE d.run_id = ? AND d.against_run_id = ? AND d.audit = ? "
            "AND d.change = 'became_pervasive' ORDER BY f.rank", [run_id, against, audit]):
        shares = json.loads(details)
        note = notes.get((layer, feature), {})
        rows.append({"layer": layer, "feature": feature, "rank": rank, "turn_share": shares.get("turn_share"),
                     "against_turn_share": shares.get("against_turn_share"), "label": note.get("label"),
                     "score": note.get("score")})
    return rows


def category_turn_shares(store: Store, run_id: str) -> dict[Key, dict[str, float]]:
    """Per feature: the share of each category's assistant turns in which it fires."""
    shares: dict[Key, dict[str, float]] = defaultdict(dict)
    for layer, feature, category, active, turns in store.rows(
            "SELECT layer, feature, category, n_turns_active, n_turns FROM category_stats WHERE run_id = ? "
            "AND role = 'assistant' AND n_turns > 0", [run_id]):
        shares[(layer, feature)][category] = active / turns
    return shares


def became_specific(store: Store, run_id: str, against: str, categories: list[str]) -> list[dict]:
    """Features ranked by how much more specific to `categories` their assistant-turn firing became: the
    share of those categories' turns in which a feature fires minus its highest share in any other
    category, in this run minus the same in the earlier run (both runs' transcoders must be one)."""
    now, before = category_turn_shares(store, run_id), category_turn_shares(store, against)

    def specificity(shares: dict[str, float]) -> tuple[float, float]:
        inside = max((shares.get(c, 0.0) for c in categories), default=0.0)
        outside = max((v for c, v in shares.items() if c not in categories), default=0.0)
        return inside, inside - outside

    rows = []
    for key, shares in now.items():
        inside, score = specificity(shares)
        _, earlier = specificity(before.get(key, {}))
        rows.append({"layer": key[0], "feature": key[1], "target_share": inside, "specificity": score,
                     "change": score - earlier})
    rows.sort(key=lambda row: (-row["change"], row["layer"], row["feature"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows
