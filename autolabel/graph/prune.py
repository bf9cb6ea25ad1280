"""Influence on the targets, and pruning by it (circuit-tracer's method and default thresholds).

Each row of |adjacency| is normalised to sum to 1, so a node passes on to its sources the share of its input
each of them provides. A node's influence is the probability-weighted sum, over every path from every target
logit to the node, of the products of those shares (A + A^2 + ... with A the normalised matrix); the graph is
a DAG (edges only go to later layers or to the logits), so the series ends after at most n_layers + 2 terms.

Pruning keeps the nodes that together hold `node_threshold` of the total influence (embeddings and logits
always), then the edges that hold `edge_threshold` of the total edge influence in the graph of kept nodes,
and finally drops feature and error nodes left without an outgoing kept edge, and features left without an
incoming one, until nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autolabel.errors import AutolabelError


def normalized_abs(matrix: torch.Tensor) -> torch.Tensor:
    """|matrix| with every non-zero row scaled to sum to 1, [n, m] -> [n, m]."""
    magnitude = matrix.abs()
    return magnitude / magnitude.sum(1, keepdim=True).clamp(min=1e-10)


def _series(first: torch.Tensor, step, limit: int) -> torch.Tensor:
    """first + step(first) + step(step(first)) + ... until a term is all zeros."""
    total, term = first.clone(), first
    for _ in range(limit):
        term = step(term)
        if not term.any():
            return total
        total += term
    raise AutolabelError(
        f"influence did not converge after {limit} steps: the graph has a cycle, which a causal "
        f"model cannot make; this is a bug in autolabel"
    )


def influence(adjacency: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N] influence of each node on the weighted targets; adjacency [N, N] (row target), weights [N]."""
    normalized = normalized_abs(adjacency)
    return _series(weights @ normalized, lambda term: term @ normalized, len(adjacency) + 1)


def influence_on_targets(rows: torch.Tensor, probabilities: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """[n_sources] influence through a partial adjacency: rows [n_t + n_visited, n_sources], the target logits
    first; owner [n_f] maps a feature source to its row (-1: not computed yet, so its sources are unknown)."""
    normalized = normalized_abs(rows)
    has_row = owner >= 0

    def step(term: torch.Tensor) -> torch.Tensor:  # term [n_sources] -> the next term
        weights = torch.zeros(len(rows))
        weights[owner[has_row]] = term[: len(owner)][has_row]
        return weights @ normalized

    weights = torch.zeros(len(rows))
    weights[: len(probabilities)] = probabilities
    return _series(weights @ normalized, step, len(rows) + 1)


def _score_at(scores: torch.Tensor, share: float) -> float:
    """The smallest score among the top ones that together hold `share` of the total."""
    ranked = scores.sort(descending=True).values
    total = ranked.sum()
    if total <= 0:
        return float("inf")
    index = int(torch.searchsorted(ranked.cumsum(0) / total, torch.tensor(share, dtype=ranked.dtype)))
    return float(ranked[min(index, len(ranked) - 1)])


@dataclass
class Pruned:
    nodes: torch.Tensor  # [N] bool: kept
    edges: torch.Tensor  # [N, N] bool: kept (row target, column source)
    influence: torch.Tensor  # [N] influence on the targets, in the unpruned graph
    cumulative: torch.Tensor  # [N] share of the total influence held by this node and every more influential one


def prune(
    adjacency: torch.Tensor,
    n_features: int,
    n_fixed: int,
    probabilities: torch.Tensor,
    node_threshold: float,
    edge_threshold: float,
) -> Pruned:
    """adjacency [N, N] in attribute.py's node order; the last `n_fixed` nodes (embeddings, then the
    len(probabilities) target logits) are always kept."""
    n_t, size = len(probabilities), len(adjacency)
    weights = torch.zeros(size)
    weights[size - n_t :] = probabilities
    node_influence = influence(adjacency, weights)
    nodes = (node_influence >= _score_at(node_influence, node_threshold)) & (node_influence > 0)
    nodes[size - n_fixed :] = True

    kept = adjacency * nodes[:, None] * nodes[None, :]
    normalized = normalized_abs(kept)
    edge_scores = normalized * (influence(kept, weights) + weights)[:, None]
    edges = (edge_scores >= _score_at(edge_scores.flatten(), edge_threshold)) & (edge_scores > 0)

    inner = slice(0, size - n_fixed)  # feature and error nodes
    while True:
        before = nodes.clone()
        edges &= nodes[:, None] & nodes[None, :]
        nodes[inner] &= edges[:, inner].any(0)  # something reads it
        nodes[:n_features] &= edges[:n_features].any(1)  # something drives it
        if torch.equal(nodes, before):
            break
    edges &= nodes[:, None] & nodes[None, :]

    ranked, order = node_influence.sort(descending=True)
    cumulative = torch.zeros(size)
    total = ranked.sum()
    cumulative[order] = ranked.cumsum(0) / total if total > 0 else torch.ones(size)
    return Pruned(nodes, edges, node_influence, cumulative)
