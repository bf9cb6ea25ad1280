"""The feature pages' data: statistics, examples with per-token roles, output tokens, nearest features.

Everything is read in bulk, one layer at a time (a few queries per layer, not
per feature), because a report has one page per feature and a run has tens of
thousands of them. Examples come back as Arrow columns and are cut into plain
Python lists per example; token ids are decoded later, once per distinct id.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from autolabel.config import ROLES, ReportConfig
from autolabel.label.stage import output_tokens
from autolabel.models import SubjectModel
from autolabel.store import Store
from autolabel.transcoders.transcoder import TranscoderSet

OUTPUT_CHUNK = 256  # features per unembedding product: [256, vocab] floats at a time


@dataclass
class Example:
    kind: str  # top / quantile
    rank: int
    bin: int | None
    doc_id: str
    role: str  # at the peak
    max_act: float
    tokens: list[int]
    acts: list[float]
    roles: list[str]  # per token, from the corpus


def feature_rows(store: Store, run_id: str) -> list[dict]:
    cursor = store.con.execute("SELECT layer, feature, n_tokens, n_active, density, max_act, mean_act, histogram, "
                               "histogram_edges, status FROM features WHERE run_id = ? ORDER BY layer, feature", [run_id])
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def role_density(store: Store, run_id: str) -> dict[tuple[int, int], list[dict]]:
    """Per feature and role: the share of tokens and of turns on which it fires."""
    result: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for layer, feature, role, n_tokens, n_active, max_act, n_turns, n_turns_active in store.con.execute(
            "SELECT layer, feature, role::VARCHAR, n_tokens, n_active, max_act, n_turns, n_turns_active "
            "FROM role_stats WHERE run_id = ? ORDER BY layer, feature, role", [run_id]).fetchall():
        result[(layer, feature)].append({
            "role": role, "n_tokens": n_tokens, "n_active": n_active, "max_act": max_act,
            "density": n_active / n_tokens if n_tokens else None,
            "turn_share": n_turns_active / n_turns if n_turns else None})
    return result


def examples_table(store: Store, run_id: str, corpus_id: str | None, layer: int, settings: ReportConfig) -> pa.Table:
    """One layer's shown examples (top ones by rank, then a few per quantile bin) with each token's role code."""
    return store.con.sql(
        "SELECT e.feature, e.kind, e.rank, e.bin, e.doc_id, e.role::VARCHAR AS role, e.max_act, e.tokens, e.acts, "
        "       list_transform(list_slice(d.roles, e.start + 1, e.start + len(e.tokens)), lambda r: enum_code(r)) AS codes "
        "FROM examples e LEFT JOIN doc_tokens d ON d.corpus_id = $corpus AND d.doc_id = e.doc_id "
        "WHERE e.run_id = $run AND e.layer = $layer AND e.kind IN ('top', 'quantile') "
        "QUALIFY row_number() OVER (PARTITION BY e.feature, e.kind, e.bin ORDER BY e.rank) "
        "        <= CASE e.kind WHEN 'top' THEN $top ELSE $per_bin END "
        "ORDER BY e.feature, e.kind DESC, e.rank",
        params={"corpus": corpus_id, "run": run_id, "layer": layer, "top": settings.top_examples,
                "per_bin": settings.quantile_per_bin}).to_arrow_table()


def split_examples(table: pa.Table) -> dict[int, list[Example]]:
    """Feature -> its examples, cut from the Arrow columns (flat numpy buffers, one slice per example)."""
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    tokens, offsets = columns["tokens"].values.to_numpy(), columns["tokens"].offsets.to_numpy()
    acts = columns["acts"].values.to_numpy(zero_copy_only=False)
    role_names = np.array(ROLES, dtype=object)
    codes, code_offsets = columns["codes"].values.to_numpy(zero_copy_only=False), columns["codes"].offsets.to_numpy()
    has_roles = columns["codes"].is_valid().to_numpy(zero_copy_only=False)  # False: document not in the store
    scalars = {name: columns[name].to_pylist() for name in ("feature", "kind", "rank", "bin", "doc_id", "role", "max_act")}
    by_feature: dict[int, list[Example]] = defaultdict(list)
    for i in range(table.num_rows):
        a, b = offsets[i], offsets[i + 1]
        roles = (role_names[codes[code_offsets[i]:code_offsets[i + 1]]].tolist() if has_roles[i]
                 else [scalars["role"][i]] * int(b - a))
        by_feature[scalars["feature"][i]].append(Example(
            scalars["kind"][i], scalars["rank"][i], scalars["bin"][i], scalars["doc_id"][i], scalars["role"][i],
            scalars["max_act"][i], tokens[a:b].tolist(), acts[a:b].tolist(), roles))
    return by_feature


def distinct_tokens(table: pa.Table) -> set[int]:
    return set(np.unique(table.column("tokens").combine_chunks().values.to_numpy()).tolist())


def decoder_rows(tset: TranscoderSet, layer: int) -> torch.Tensor:
    """[d_feat, d_out] decoder directions (a cross-layer decoder's slices summed)."""
    rows = tset[layer].W_dec.detach().float()
    return rows.sum(1) if rows.dim() == 3 else rows


@torch.inference_mode()
def nearest_features(tset: TranscoderSet, layer: int, k: int, chunk: int = 4096) -> dict[int, list[tuple[int, float]]]:
    """Feature -> the k other features of its layer whose decoder directions are closest (cosine)."""
    if k == 0 or layer not in tset.layers:
        return {}
    directions = torch.nn.functional.normalize(decoder_rows(tset, layer), dim=1)
    n = directions.shape[0]
    k = min(k, n - 1)
    result = {}
    for start in range(0, n, chunk):
        sims = directions[start:start + chunk] @ directions.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -2.0  # not itself
        values, indices = sims.topk(k, dim=1)
        for row, (vals, ids) in enumerate(zip(values.tolist(), indices.tolist())):
            result[start + row] = list(zip(ids, vals))
    return result


def layer_output_tokens(subject: SubjectModel, tset: TranscoderSet, layer: int, features: list[int],
                        n: int) -> dict[int, tuple[list[str], list[str]]]:
    """Feature -> (promoted, suppressed) tokens, computed a chunk of features at a time to bound memory."""
    if n == 0 or layer not in tset.layers:
        return {}
    result = {}
    for start in range(0, len(features), OUTPUT_CHUNK):
        keys = [(layer, f) for f in features[start:start + OUTPUT_CHUNK]]
        result.update({f: tokens for (_, f), tokens in output_tokens(subject, tset, keys, n).items()})
    return result


def histogram_bars(histogram: list[int] | None, edges: list[float] | None) -> list[dict]:
    """Bars for the activation histogram, heights on a log scale (counts span orders of magnitude)."""
    if not histogram or not edges or not any(histogram):
        return []
    counts = np.asarray(histogram, dtype=float)
    heights = np.log1p(counts) / np.log1p(counts.max())
    return [{"low": edges[i], "high": edges[i + 1], "count": int(counts[i]), "height": float(heights[i])}
            for i in range(len(counts))]
