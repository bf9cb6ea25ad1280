"""The end of collection: per-layer states -> rows of `features`, `role_stats`,
`category_stats` and `examples`.

Example contexts were kept as (first token key, length, activations); their
tokens, roles and turns are read back from the stored corpus here, a bounded
number of documents at a time, so collection never held token text.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from autolabel.collect.orders import EMPTY_KEY, N_ROLES, POS_BITS, UNSET, quantile_bins
from autolabel.collect.state import LayerState
from autolabel.config import ROLES
from autolabel.store import Store


def quantile_samples(state: LayerState) -> tuple[torch.Tensor, ...]:
    """The `per_bin` smallest reservoir priorities in each quantile bin: (bin, rank, g, p, f) of each kept sample.

    Ranks count on across a feature's bins, so (feature, kind, rank) stays a key.
    """
    G, P, F = state.tensors.res_prio.shape
    qbin = quantile_bins(state.tensors.hist_peaks, state.config.quantile_bins)  # [G, F]
    groups = qbin[:, None, :].expand(G, P, F).reshape(G * P, F)
    prio = state.tensors.res_prio.reshape(G * P, F)
    order = prio.argsort(dim=0, stable=True)
    order = order.gather(0, groups.gather(0, order).argsort(dim=0, stable=True))  # by (bin, priority)
    sorted_groups = groups.gather(0, order)
    position = torch.arange(G * P)[:, None].expand(G * P, F)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    rank = position - torch.where(starts, position, 0).cummax(0).values
    keep = (rank < state.config.per_bin) & (prio.gather(0, order) != EMPTY_KEY)
    overall_rank = keep.long().cumsum(0) - 1  # ranks run on across bins, in (bin, priority) order
    slot, feature = keep.nonzero(as_tuple=True)
    flat = order[slot, feature]
    return sorted_groups[slot, feature], overall_rank[slot, feature], flat // P, flat % P, feature


def quantile_edges(state: LayerState, edges: torch.Tensor) -> torch.Tensor:
    """[Q + 1, F] activation edges of the quantile bins (equal edges mark an empty bin)."""
    Q = state.config.quantile_bins
    qbin = quantile_bins(state.tensors.hist_peaks, Q)  # [G, F]
    reached = qbin[None, :, :] >= torch.arange(Q + 1)[:, None, None]  # [Q + 1, G, F]
    first = torch.where(reached.any(1), reached.int().argmax(1), state.bins.n)  # [Q + 1, F]
    return edges.gather(0, first.clamp_max(state.bins.n))


def _list_column(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))


def feature_rows(run_id: str, layer: int, state: LayerState, n_layer_tokens: int) -> pa.Table:
    n_active = state.tensors.group_active.sum(0)
    sums = state.tensors.group_sum.sum(0)
    fired = state.tensors.exponent != UNSET
    edges = state.bins.edges(torch.where(fired, state.tensors.exponent, 0))  # [G + 1, F]
    q_edges = quantile_edges(state, edges)
    density = n_active.double() / max(n_layer_tokens, 1)
    status = np.where(
        n_active.numpy() == 0, "dead", np.where(density.numpy() < state.config.rare_density, "rare", "active")
    )
    F, G = state.d_feat, state.bins.n
    return pa.table(
        {
            "run_id": pa.array([run_id] * F),
            "layer": pa.array(np.full(F, layer, dtype=np.int32)),
            "feature": pa.array(np.arange(F, dtype=np.int32)),
            "n_tokens": pa.array(np.full(F, n_layer_tokens, dtype=np.int64)),
            "n_active": n_active.numpy(),
            "density": density.numpy(),
            "max_act": state.tensors.role_max.amax(0).double().numpy(),
            "mean_act": pa.array((sums / n_active.clamp_min(1)).numpy(), mask=~fired.numpy()),
            "quantile_edges": pa.array(list(q_edges.T.numpy()), type=pa.list_(pa.float64()), mask=~fired.numpy()),
            "histogram": _list_column(state.tensors.hist_tokens.T.reshape(-1).numpy(), np.full(F, G), pa.int64()),
            "histogram_edges": pa.array(list(edges.T.numpy()), type=pa.list_(pa.float64()), mask=~fired.numpy()),
            "status": pa.array(status),
        }
    )


def role_rows(run_id: str, layer: int, state: LayerState, categories: list[str]) -> tuple[pa.Table, pa.Table]:
    """(role_stats, category_stats): per role over all categories, and per (category, role) present."""
    C, F = len(categories), state.d_feat

    def by_group(name: str) -> torch.Tensor:
        counts = getattr(state.tensors, name)  # [n_groups, ...], category-major
        return counts.reshape(C, N_ROLES, *counts.shape[1:])

    per_role = {
        name: by_group(name).sum(0)
        for name in ("group_tokens", "group_active", "group_sum", "group_turns", "group_turns_active")
    }
    role_table = pa.table(
        {
            "run_id": pa.array([run_id] * (N_ROLES * F)),
            "layer": pa.array(np.full(N_ROLES * F, layer, dtype=np.int32)),
            "feature": pa.array(np.tile(np.arange(F, dtype=np.int32), N_ROLES)),
            "role": pa.array(np.repeat(np.array(ROLES), F)),
            "n_tokens": np.repeat(per_role["group_tokens"].numpy(), F),
            "n_active": per_role["group_active"].reshape(-1).numpy(),
            "sum_act": per_role["group_sum"].reshape(-1).numpy(),
            "max_act": state.tensors.role_max.reshape(-1).double().numpy(),
            "n_turns": np.repeat(per_role["group_turns"].numpy(), F),
            "n_turns_active": per_role["group_turns_active"].reshape(-1).numpy(),
        }
    )
    present = (state.tensors.group_tokens > 0).nonzero().squeeze(1).numpy()  # groups with tokens
    n = len(present) * F
    category_table = pa.table(
        {
            "run_id": pa.array([run_id] * n),
            "layer": pa.array(np.full(n, layer, dtype=np.int32)),
            "feature": pa.array(np.tile(np.arange(F, dtype=np.int32), len(present))),
            "category": pa.array(np.repeat(np.array(categories, dtype=object)[present // N_ROLES], F)),
            "role": pa.array(np.repeat(np.array(ROLES)[present % N_ROLES], F)),
            "n_tokens": np.repeat(state.tensors.group_tokens[present].numpy(), F),
            "n_active": state.tensors.group_active[present].reshape(-1).numpy(),
            "sum_act": state.tensors.group_sum[present].reshape(-1).numpy(),
            "n_turns": np.repeat(state.tensors.group_turns[present].numpy(), F),
            "n_turns_active": state.tensors.group_turns_active[present].reshape(-1).numpy(),
        }
    )
    return role_table, category_table


def example_rows(
    store: Store,
    corpus_id: str,
    doc_ids: list[str],
    run_id: str,
    layer: int,
    state: LayerState,
    docs_per_read: int = 256,
) -> pa.Table:
    """Top, quantile and random examples of every feature, with their tokens read back from the corpus."""
    T = state.config.example_tokens
    kind, rank, bins, feature, ctx, length, acts, max_act = _kept_examples(state)
    ordinal, start = ctx >> POS_BITS, ctx & ((1 << POS_BITS) - 1)
    peak = np.where(kind == "random", 0, acts.argmax(1))
    tokens, role, turn = _read_contexts(store, corpus_id, doc_ids, ordinal, start, peak, T, docs_per_read)
    inside = np.arange(T)[None, :] < length[:, None]
    n = len(ctx)
    return pa.table(
        {
            "run_id": pa.array([run_id] * n),
            "layer": pa.array(np.full(n, layer, dtype=np.int32)),
            "feature": pa.array(feature.astype(np.int32)),
            "kind": pa.array(kind),
            "rank": pa.array(rank.astype(np.int32)),
            "bin": pa.array(bins.astype(np.int32), mask=bins < 0),
            "doc_id": pa.array([doc_ids[i] for i in ordinal], type=pa.string()),
            "turn": pa.array(turn.astype(np.int32)),
            "role": pa.array(np.array(ROLES)[role]),
            "start": pa.array(start.astype(np.int32)),
            "tokens": _list_column(tokens[inside], length, pa.int32()),
            "acts": _list_column(acts[inside].astype(np.float32), length, pa.float32()),
            "max_act": max_act,
        }
    )


def _kept_examples(state: LayerState) -> tuple[np.ndarray, ...]:
    """Every kept example of the layer, top then quantile then random, as parallel arrays [n]: kind, rank, bin
    (-1: none), feature, context key, context length, activations [n, T], peak activation."""
    T = state.config.example_tokens
    tensors = state.tensors
    order = state.top_order()  # [K, F] slots best first
    top_rank, top_feature = (tensors.top_value.gather(0, order) > float("-inf")).nonzero(as_tuple=True)
    top_slot = order[top_rank, top_feature]
    q_bin, q_rank, g, p, q_feature = quantile_samples(state)
    neg_slot, neg_feature = (tensors.neg_prio != EMPTY_KEY).nonzero(as_tuple=True)
    top_value, q_value = tensors.top_value[top_slot, top_feature], tensors.res_value[g, p, q_feature]
    parts = [  # kind, rank, bin, feature, context key, context length, activations [n, T]
        (
            "top",
            top_rank,
            None,
            top_feature,
            tensors.top_ctx[top_slot, top_feature],
            tensors.top_len[top_slot, top_feature],
            tensors.top_acts[top_slot, top_feature],
        ),
        (
            "quantile",
            q_rank,
            q_bin,
            q_feature,
            tensors.res_ctx[g, p, q_feature],
            tensors.res_len[g, p, q_feature],
            tensors.res_acts[g, p, q_feature],
        ),
        (
            "random",
            neg_slot,
            None,
            neg_feature,
            tensors.neg_ctx[neg_slot, neg_feature],
            tensors.neg_len[neg_slot, neg_feature],
            torch.zeros(len(neg_slot), T),
        ),
    ]
    return (
        np.concatenate([np.full(len(part[1]), part[0]) for part in parts]),
        torch.cat([part[1] for part in parts]).numpy(),
        np.concatenate([part[2].numpy() if part[2] is not None else np.full(len(part[1]), -1) for part in parts]),
        torch.cat([part[3] for part in parts]).numpy(),
        torch.cat([part[4] for part in parts]).numpy(),
        torch.cat([part[5] for part in parts]).numpy(),
        torch.cat([part[6].float() for part in parts]).numpy(),  # [n, T]
        torch.cat([top_value, q_value, torch.zeros(len(neg_slot))]).double().numpy(),
    )


def _read_contexts(
    store: Store,
    corpus_id: str,
    doc_ids: list[str],
    ordinal: np.ndarray,
    start: np.ndarray,
    peak: np.ndarray,
    T: int,
    docs_per_read: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [n, T], role code at the peak [n], turn at the peak [n]) of each example, read from the corpus a
    few documents at a time (positions past a document's end repeat its last token)."""
    tokens = np.zeros((len(ordinal), T), dtype=np.int32)
    role = np.zeros(len(ordinal), dtype=np.int64)
    turn = np.zeros(len(ordinal), dtype=np.int64)
    order = np.argsort(ordinal, kind="stable")
    sorted_ordinals = ordinal[order]
    wanted = np.unique(ordinal)
    for chunk in range(0, len(wanted), docs_per_read):
        ordinals = wanted[chunk : chunk + docs_per_read]
        rows = store.rows(
            "SELECT doc_id, token_ids, list_transform(roles, lambda r: enum_code(r)), turns FROM doc_tokens "
            "WHERE corpus_id = ? AND doc_id IN (SELECT unnest(?))",
            [corpus_id, [doc_ids[i] for i in ordinals]],
        )
        by_doc = {doc_id: (np.asarray(ids), np.asarray(codes), np.asarray(turns)) for doc_id, ids, codes, turns in rows}
        for doc_ordinal in ordinals:
            ids, codes, turns = by_doc[doc_ids[doc_ordinal]]
            here = order[
                np.searchsorted(sorted_ordinals, doc_ordinal) : np.searchsorted(sorted_ordinals, doc_ordinal, "right")
            ]
            positions = np.minimum(start[here, None] + np.arange(T)[None, :], len(ids) - 1)
            tokens[here] = ids[positions]
            role[here], turn[here] = codes[start[here] + peak[here]], turns[start[here] + peak[here]]
    return tokens, role, turn
