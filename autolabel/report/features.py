"""The feature pages' data: statistics, examples with per-token roles, nearest features, interventions.

Everything is read in bulk, one layer at a time (a few queries per layer, not
per feature), because a report has one page per feature and a run has tens of
thousands of them. Examples stay Arrow columns (render.example_lists turns a
whole layer of them into markup at once); token ids are decoded once per distinct id.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch

from autolabel.config import ReportConfig
from autolabel.intervene.evidence import ablation_effects
from autolabel.store import Store
from autolabel.transcoders.transcoder import TranscoderSet

SHOWN_PROMPTS = 4  # intervened prompts per kind on a page (intervene.prompts' default: all of a default run's)


def feature_rows(store: Store, run_id: str) -> list[dict]:
    return store.dicts(
        "SELECT layer, feature, n_tokens, n_active, density, max_act, mean_act, histogram, "
        "histogram_edges, status FROM features WHERE run_id = ? ORDER BY layer, feature",
        [run_id],
    )


def role_density(store: Store, run_id: str) -> dict[tuple[int, int], list[dict]]:
    """Per feature and role: the share of tokens and of turns on which it fires."""
    result: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for layer, feature, role, n_tokens, n_active, max_act, n_turns, n_turns_active in store.rows(
        "SELECT layer, feature, role::VARCHAR, n_tokens, n_active, max_act, n_turns, n_turns_active "
        "FROM role_stats WHERE run_id = ? ORDER BY layer, feature, role",
        [run_id],
    ):
        result[(layer, feature)].append(
            {
                "role": role,
                "n_tokens": n_tokens,
                "n_active": n_active,
                "max_act": max_act,
                "density": n_active / n_tokens if n_tokens else None,
                "turn_share": n_turns_active / n_turns if n_turns else None,
            }
        )
    return result


def interventions(store: Store, run_id: str, per_kind: int = SHOWN_PROMPTS) -> dict[tuple[int, int], dict]:
    """Feature -> what `autolabel intervene` stored for it: the ablation effect where it fires (over all its
    prompts, and over those peaking in assistant turns, the audit's measure) and its first prompts of each kind
    (active first), each with the clean continuation and one entry per setting (ablation, then steering by
    multiple). Only intervened features have an entry; the rows of the whole run are one query."""
    pages: dict[tuple[int, int], dict] = {}
    for row in store.dicts(
        "SELECT layer, feature, prompt_kind, prompt_index, doc_id, role::VARCHAR AS role, prompt_text, act, "
        "clean_text, setting, multiple, new_act, kl, kl_firing, n_firing, top_up, top_down, intervened_text "
        "FROM interventions WHERE run_id = ? AND prompt_index < ? "
        "ORDER BY layer, feature, prompt_kind, prompt_index, setting, multiple",
        [run_id, per_kind],
    ):
        page = pages.setdefault((row["layer"], row["feature"]), {"prompts": []})
        prompts = page["prompts"]
        if not prompts or (prompts[-1]["kind"], prompts[-1]["index"]) != (row["prompt_kind"], row["prompt_index"]):
            prompts.append(
                {
                    "kind": row["prompt_kind"],
                    "index": row["prompt_index"],
                    "doc_id": row["doc_id"],
                    "role": row["role"],
                    "text": row["prompt_text"],
                    "act": row["act"],
                    "clean": row["clean_text"],
                    "settings": [],
                }
            )
        prompts[-1]["settings"].append(
            {
                "setting": row["setting"],
                "multiple": row["multiple"],
                "new_act": row["new_act"],
                "kl": row["kl"],
                "kl_firing": row["kl_firing"],
                "n_firing": row["n_firing"],
                "text": row["intervened_text"],
                "up": json.loads(row["top_up"] or "[]"),
                "down": json.loads(row["top_down"] or "[]"),
            }
        )
    for role, name in ((None, "effect"), ("assistant", "assistant_effect")):
        for key, effect in ablation_effects(store, run_id, role).items():
            if key in pages:
                pages[key][name] = effect
    return pages


def examples_table(store: Store, run_id: str, corpus_id: str | None, layer: int, settings: ReportConfig) -> pa.Table:
    """One layer's shown examples (top ones by rank, then a few per quantile bin) with each token's role code."""
    return store.arrow(
        "SELECT e.feature, e.kind, e.rank, e.bin, e.doc_id, e.role::VARCHAR AS role, e.max_act, e.tokens, e.acts, "
        "       list_transform(list_slice(d.roles, e.start + 1, e.start + len(e.tokens)), "
        "                      lambda r: enum_code(r)) AS codes "
        "FROM examples e LEFT JOIN doc_tokens d ON d.corpus_id = $corpus AND d.doc_id = e.doc_id "
        "WHERE e.run_id = $run AND e.layer = $layer AND e.kind IN ('top', 'quantile') "
        "QUALIFY row_number() OVER (PARTITION BY e.feature, e.kind, e.bin ORDER BY e.rank) "
        "        <= CASE e.kind WHEN 'top' THEN $top ELSE $per_bin END "
        "ORDER BY e.feature, e.kind DESC, e.rank",
        {
            "corpus": corpus_id,
            "run": run_id,
            "layer": layer,
            "top": settings.top_examples,
            "per_bin": settings.quantile_per_bin,
        },
    )


def distinct_tokens(table: pa.Table) -> set[int]:
    return set(np.unique(table.column("tokens").combine_chunks().values.to_numpy()).tolist())


@torch.inference_mode()
def nearest_features(tset: TranscoderSet, layer: int, k: int, chunk: int = 4096) -> dict[int, list[tuple[int, float]]]:
    """Feature -> the k other features of its layer whose decoder directions are closest (cosine)."""
    directions = torch.nn.functional.normalize(tset[layer].decoder_rows(), dim=1)
    n = directions.shape[0]
    k = min(k, n - 1)
    result = {}
    for start in range(0, n, chunk):
        sims = directions[start : start + chunk] @ directions.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -2.0  # not itself
        values, indices = sims.topk(k, dim=1)
        for row, (vals, ids) in enumerate(zip(values.tolist(), indices.tolist(), strict=False)):
            result[start + row] = list(zip(ids, vals, strict=False))
    return result
