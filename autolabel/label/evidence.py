"""What the labeler sees of each feature besides the prompt's fixed parts: its examples with the role at
each peak and its document's category, its role and category statistics, and the tokens its decoder row
promotes and suppresses. label.stage reads these once per shard; the benchmarks read examples the same way."""

from __future__ import annotations

from autolabel.config import LabelConfig
from autolabel.label.prompts import Evidence, by_category, where_it_fires
from autolabel.label.scorers import Example
from autolabel.models import SubjectModel
from autolabel.store import Store
from autolabel.transcoders.outputs import output_token_ids
from autolabel.transcoders.transcoder import TranscoderSet

Key = tuple[int, int]  # (layer, feature)


def output_tokens(
    subject: SubjectModel, tset: TranscoderSet, features: list[Key], n: int
) -> dict[Key, tuple[list[str], list[str]]]:
    """The text of the tokens each feature promotes and suppresses (transcoders.outputs, as the report shows)."""
    result = {}
    for layer in sorted({layer for layer, _ in features}):
        ids = output_token_ids(subject, tset, layer, [feature for at, feature in features if at == layer], n)
        for feature, (promoted, suppressed) in ids.items():
            result[(layer, feature)] = (
                [subject.tokenizer.decode([t]) for t in promoted],
                [subject.tokenizer.decode([t]) for t in suppressed],
            )
    return result


def read_examples(store: Store, run_id: str, layer: int, feature: int, tokenizer) -> dict[str, list[Example]]:
    """top / quantile / random examples, each with the role at its peak and its document's category."""
    rows = store.rows(
        "SELECT e.kind, e.tokens, e.acts, e.role, d.category FROM examples e JOIN runs r USING (run_id) "
        "LEFT JOIN documents d ON d.corpus_id = r.corpus_id AND d.doc_id = e.doc_id "
        "WHERE e.run_id = ? AND e.layer = ? AND e.feature = ? ORDER BY e.kind, e.rank",
        [run_id, layer, feature],
    )
    examples: dict[str, list[Example]] = {"top": [], "quantile": [], "random": []}
    for kind, tokens, acts, role, category in rows:
        examples[kind].append(Example(tokenizer.batch_decode([[t] for t in tokens]), list(acts), role, category))
    return examples


def feature_evidence(
    store: Store, run_id: str, keys: list[Key], outputs: dict[Key, tuple[list[str], list[str]]], settings: LabelConfig
) -> dict[Key, Evidence]:
    """Each feature's role and category statistics (with `role_evidence`) and output tokens, as the prompt
    shows them."""
    active: dict[Key, dict[str, int]] = {key: {} for key in keys}
    turns: dict[Key, dict[str, tuple[int, int]]] = {key: {} for key in keys}
    categories: dict[Key, str] = {}
    if settings.role_evidence:
        for layer, feature, role, n_active, n_turns_active, n_turns in keyed_rows(
            store,
            "SELECT layer, feature, role::VARCHAR, n_active, n_turns_active, n_turns FROM role_stats",
            run_id,
            keys,
        ):
            active[(layer, feature)][role] = n_active
            turns[(layer, feature)][role] = (n_turns_active, n_turns)
        categories = category_evidence(store, run_id, keys)
    return {
        key: Evidence(where_it_fires(active[key], turns[key]), *outputs[key], categories.get(key, "")) for key in keys
    }


def category_evidence(store: Store, run_id: str, keys: list[Key]) -> dict[Key, str]:
    """Each feature's by_category line from category_stats (summed over roles)."""
    active: dict[Key, dict[str, int]] = {key: {} for key in keys}
    tokens: dict[Key, dict[str, int]] = {key: {} for key in keys}
    for layer, feature, category, n_active, n_tokens in keyed_rows(
        store,
        "SELECT layer, feature, category, sum(n_active), sum(n_tokens) FROM category_stats",
        run_id,
        keys,
        "GROUP BY ALL",
    ):
        active[(layer, feature)][category] = int(n_active)
        tokens[(layer, feature)][category] = int(n_tokens)
    return {key: by_category(active[key], tokens[key]) for key in keys}


def keyed_rows(store: Store, select: str, run_id: str, keys: list[Key], tail: str = "") -> list[tuple]:
    """The rows of `select` (a statistics table's columns, layer and feature first) for the run's features
    `keys` only: filtered in SQL by their layers and feature ids, then to the exact pairs."""
    if not keys:
        return []
    rows = store.rows(
        f"{select} WHERE run_id = ? AND layer IN (SELECT unnest(?)) AND feature IN (SELECT unnest(?)) {tail}",
        [run_id, sorted({layer for layer, _ in keys}), sorted({feature for _, feature in keys})],
    )
    wanted = set(keys)
    return [row for row in rows if (row[0], row[1]) in wanted]
