"""The tensors collection keeps per layer, as one typed record: what a checkpoint saves, a merge
combines and the tables are read from (autolabel/collect/state.py updates them)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from autolabel.collect.orders import EMPTY_KEY, N_ROLES, UNSET

# Activations across example contexts (for display and for marking tokens) keep 3 significant
# digits, which halves the largest part of the state; peak values stay float32.
CONTEXT_DTYPE = torch.bfloat16


@dataclass
class LayerTensors:
    """Every tensor collection keeps for one layer: what a checkpoint saves and a merge combines.

    F features, G histogram bins, K top contexts, P reservoir samples per bin, T context tokens, R random
    contexts, n_groups (category, role) pairs. Built by `empty`; `items()` walks them by name.
    """

    # token and turn counts per (category, role)
    group_tokens: torch.Tensor  # [n_groups]
    group_active: torch.Tensor  # [n_groups, F]
    group_sum: torch.Tensor  # [n_groups, F] float64
    group_turns: torch.Tensor  # [n_groups]
    group_turns_active: torch.Tensor  # [n_groups, F]
    role_max: torch.Tensor  # [N_ROLES, F]
    # histograms: of every active token, and of each window's peak
    exponent: torch.Tensor  # [F] each feature's histogram ceiling (UNSET: none yet)
    hist_tokens: torch.Tensor  # [G, F]
    hist_peaks: torch.Tensor  # [G, F]
    # top-k contexts in unordered slots (top_order() ranks them)
    top_value: torch.Tensor  # [K, F]
    top_key: torch.Tensor  # [K, F]
    top_hash: torch.Tensor  # [K, F] of the context's tokens: shown contexts are distinct
    top_ctx: torch.Tensor  # [K, F] token key of the context's first token
    top_len: torch.Tensor  # [K, F]
    top_acts: torch.Tensor  # [K, F, T] bfloat16
    # reservoir per histogram bin of window peaks: the P smallest priorities
    res_prio: torch.Tensor  # [G, P, F]
    res_value: torch.Tensor  # [G, P, F]
    res_key: torch.Tensor  # [G, P, F]
    res_ctx: torch.Tensor  # [G, P, F]
    res_len: torch.Tensor  # [G, P, F]
    res_acts: torch.Tensor  # [G, P, F, T] bfloat16
    # non-activating contexts: the smallest priorities among chunks where the feature is silent
    neg_prio: torch.Tensor  # [R, F]
    neg_ctx: torch.Tensor  # [R, F]
    neg_len: torch.Tensor  # [R, F]

    @classmethod
    def empty(cls, F: int, n_groups: int, G: int, K: int, P: int, T: int, R: int) -> LayerTensors:
        return cls(
            group_tokens=torch.zeros(n_groups, dtype=torch.long),
            group_active=torch.zeros(n_groups, F, dtype=torch.long),
            group_sum=torch.zeros(n_groups, F, dtype=torch.float64),
            group_turns=torch.zeros(n_groups, dtype=torch.long),
            group_turns_active=torch.zeros(n_groups, F, dtype=torch.long),
            role_max=torch.zeros(N_ROLES, F),
            exponent=torch.full((F,), UNSET, dtype=torch.long),
            hist_tokens=torch.zeros(G, F, dtype=torch.long),
            hist_peaks=torch.zeros(G, F, dtype=torch.long),
            top_value=torch.full((K, F), float("-inf")),
            top_key=torch.full((K, F), EMPTY_KEY, dtype=torch.long),
            top_hash=torch.zeros(K, F, dtype=torch.long),
            top_ctx=torch.zeros(K, F, dtype=torch.long),
            top_len=torch.zeros(K, F, dtype=torch.long),
            top_acts=torch.zeros(K, F, T, dtype=CONTEXT_DTYPE),
            res_prio=torch.full((G, P, F), EMPTY_KEY, dtype=torch.long),
            res_value=torch.zeros(G, P, F),
            res_key=torch.zeros(G, P, F, dtype=torch.long),
            res_ctx=torch.zeros(G, P, F, dtype=torch.long),
            res_len=torch.zeros(G, P, F, dtype=torch.long),
            res_acts=torch.zeros(G, P, F, T, dtype=CONTEXT_DTYPE),
            neg_prio=torch.full((R, F), EMPTY_KEY, dtype=torch.long),
            neg_ctx=torch.zeros(R, F, dtype=torch.long),
            neg_len=torch.zeros(R, F, dtype=torch.long),
        )

    def names(self) -> list[str]:
        return [f.name for f in fields(self)]

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, getattr(self, name)) for name in self.names()]
