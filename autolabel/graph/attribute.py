"""Direct-effect attributions between every node of the local replacement model.

Nodes, in adjacency order (circuit-tracer's): active features [n_f] (layer, position, feature), error nodes
[n_layers * S] (layer-major), token embeddings [S], target logits [n_t]. Row = target, column = source.

A target's *input* is a feature's pre-activation (before the nonlinearity, bias included) or a logit minus the
mean logit (the unembedding row minus the mean row, on the final norm's output: softmax does not see a shift
shared by every logit). One backward pass from the input of each target through the frozen replacement gives
the gradient at every write into the residual stream; a source's edge is that gradient dotted with what the
source writes: act * W_dec[f] for a feature (each decoder slot at its own layer), the error vector, the
embedding. Since the replacement is affine in the node outputs, a target's input is exactly the sum of its
incoming edges plus what the biases alone give (a replay with every node removed).

Targets share one forward pass of `batch` identical rows: row b carries target b's objective, and rows never
mix, so one backward pass yields `batch` rows of the adjacency matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autolabel.graph.prune import influence_on_targets
from autolabel.graph.replacement import Layout, Prompt, decoder_slots, replay
from autolabel.models import SubjectModel
from autolabel.transcoders.transcoder import TranscoderSet


@dataclass
class Targets:
    """The output logits a graph explains: the most likely next tokens."""

    token_ids: torch.Tensor  # [n_t] int64
    probabilities: torch.Tensor  # [n_t]
    vectors: torch.Tensor  # [n_t, d] unembedding row minus the mean row


def salient_logits(subject: SubjectModel, logits: torch.Tensor, max_logits: int, mass: float) -> Targets:
    """The fewest most likely tokens whose probability reaches `mass`, at most `max_logits` (logits [V])."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    top, ids = probabilities.topk(min(max_logits, probabilities.numel()))
    n = min(int(torch.searchsorted(top.cumsum(0), torch.tensor(mass))) + 1, len(ids))
    unembedding = subject.model.get_output_embeddings().weight.detach().float()  # [V, d]
    return Targets(ids[:n], top[:n], unembedding[ids[:n]] - unembedding.mean(0))


@dataclass
class Features:
    """Active features, ordered by (layer, position, feature)."""

    layers: torch.Tensor  # [n_f] int64
    positions: torch.Tensor  # [n_f]
    features: torch.Tensor  # [n_f]
    activations: torch.Tensor  # [n_f]

    def __len__(self) -> int:
        return len(self.layers)

    def subset(self, keep: torch.Tensor) -> Features:
        return Features(self.layers[keep], self.positions[keep], self.features[keep], self.activations[keep])


def active_features(prompt: Prompt) -> Features:
    parts = []
    for layer in sorted(prompt.sources.acts):
        acts = prompt.sources.acts[layer]  # [S, d_feat]
        positions, features = acts.nonzero(as_tuple=True)
        parts.append((torch.full_like(positions, layer), positions, features, acts[positions, features]))
    return (
        Features(*(torch.cat(column) for column in zip(*parts, strict=True)))
        if parts
        else Features(*(torch.zeros(0, dtype=torch.long),) * 3, torch.zeros(0))
    )


@dataclass
class Attribution:
    """The full adjacency of visited targets, before pruning."""

    features: Features  # the feature nodes (those whose incoming edges were computed)
    targets: Targets
    adjacency: torch.Tensor  # [N, N] rows target, columns source, N = n_f + n_layers * S + S + n_t
    n_layers: int
    n_pos: int


class _Edges:
    """Turns the gradient at every residual write into one adjacency row per batch row."""

    def __init__(self, subject: SubjectModel, tset: TranscoderSet, prompt: Prompt, features: Features):
        self.prompt, self.activations = prompt, features.activations
        # (target layer, position, the features' columns, their decoder rows [n, d] into that layer there):
        # a feature's edge reads the gradient at its own position only, so each group is one [B, d] @ [d, n].
        self.groups = []
        for layer in sorted(set(features.layers.tolist())):
            W_dec, _ = decoder_slots(tset[layer])  # [d_feat, n_out, d]
            for position in sorted(set(features.positions[features.layers == layer].tolist())):
                index = ((features.layers == layer) & (features.positions == position)).nonzero(as_tuple=True)[0]
                rows = W_dec.detach()[features.features[index]]  # [n, n_out, d]
                self.groups += [
                    (layer + slot, position, index, rows[:, slot, :])
                    for slot in range(rows.shape[1])
                    if layer + slot in tset.transcoders and layer + slot < subject.n_layers
                ]

    def rows(self, gradients: list[torch.Tensor]) -> torch.Tensor:
        """gradients, n_layers + 1 of [B, S, d] -> [B, n_f + n_layers * S + S] edges from every source."""
        batch = gradients[0].shape[0]
        from_features = torch.zeros(batch, len(self.activations))
        for target, position, index, rows in self.groups:
            from_features[:, index] += gradients[1 + target][:, position] @ rows.T  # [B, n]
        from_features *= self.activations
        from_errors = torch.stack(
            [
                torch.einsum("bsd,sd->bs", gradient, error)
                for gradient, error in zip(gradients[1:], self.prompt.sources.errors, strict=True)
            ],
            dim=1,
        ).reshape(batch, -1)  # [B, n_layers * S], layer-major
        from_embeddings = torch.einsum("bsd,sd->bs", gradients[0], self.prompt.sources.embeddings)
        return torch.cat([from_features, from_errors, from_embeddings], dim=1)


def attribute(
    subject: SubjectModel,
    tset: TranscoderSet,
    where: Layout,
    prompt: Prompt,
    targets: Targets,
    max_feature_nodes: int,
    batch: int,
) -> Attribution:
    """Edges into every target logit and into up to `max_feature_nodes` features.

    With more active features than that, rows are computed in order of influence on the targets as far as
    known (circuit-tracer's order): after the logits, the next batch is always the unvisited features with the
    most influence through the rows computed so far. Features never visited are dropped from the graph.
    """
    features = active_features(prompt)
    n_f, n_t, n_pos, n_layers = len(features), len(targets.token_ids), len(prompt.token_ids), subject.n_layers
    n_sources = n_f + n_layers * n_pos + n_pos
    logit_rows, feature_rows, visited = _target_rows(
        subject, tset, where, prompt, targets, features, max_feature_nodes, batch
    )

    keep = torch.tensor(sorted(visited), dtype=torch.long)
    rank = {feature: i for i, feature in enumerate(visited)}
    target_rows = torch.cat(
        [
            torch.cat(feature_rows)[[rank[f] for f in keep.tolist()]] if visited else torch.zeros(0, n_sources),
            logit_rows,
        ]
    )  # [n_kept + n_t, n_sources]
    columns = torch.cat([keep, torch.arange(n_f, n_sources)])
    n_kept = len(keep)
    size = n_kept + n_layers * n_pos + n_pos + n_t
    adjacency = torch.zeros(size, size)
    adjacency[:n_kept, : size - n_t] = target_rows[:n_kept][:, columns]
    adjacency[size - n_t :, : size - n_t] = target_rows[n_kept:][:, columns]
    return Attribution(features.subset(keep), targets, adjacency, n_layers, n_pos)


def _target_rows(
    subject: SubjectModel,
    tset: TranscoderSet,
    where: Layout,
    prompt: Prompt,
    targets: Targets,
    features: Features,
    max_feature_nodes: int,
    batch: int,
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """(logit rows [n_t, n_sources], feature row batches, visited features in the order their rows were made).

    Its own function so that the replay and its autograd graph are freed when it returns.
    """
    n_f, n_t, n_pos, n_layers = len(features), len(targets.token_ids), len(prompt.token_ids), subject.n_layers
    edges = _Edges(subject, tset, prompt, features)
    W_enc = {layer: tset[layer].W_enc.detach() for layer in tset.layers}  # [d_in, d_feat]

    with torch.enable_grad():
        writes = [torch.zeros(batch, n_pos, subject.d_model, requires_grad=True) for _ in range(n_layers + 1)]
        replayed = replay(subject, tset, where, prompt, prompt.sources, writes, batch)

        def rows_of(logits: list[int], feature_rows: list[int]) -> torch.Tensor:
            """[len(logits) + len(feature_rows), n_sources] edges into these targets, logits first."""
            objective = torch.zeros(())
            if logits:
                vectors = targets.vectors[logits]  # [k, d]
                objective = objective + (replayed.final[: len(logits), -1] * vectors).sum()
            if feature_rows:
                chosen = torch.tensor(feature_rows)
                rows = torch.arange(len(logits), len(logits) + len(chosen))
                for layer in sorted(set(features.layers[chosen].tolist())):
                    mine = features.layers[chosen] == layer
                    x = replayed.inputs[layer][rows[mine], features.positions[chosen][mine]]  # [k, d_in]
                    objective = objective + (x * W_enc[layer][:, features.features[chosen][mine]].T).sum()
            gradients = torch.autograd.grad(objective, writes, retain_graph=True, materialize_grads=True)
            return edges.rows(list(gradients))[: len(logits) + len(feature_rows)]

        logit_rows = torch.cat([rows_of(list(range(i, min(i + batch, n_t))), []) for i in range(0, n_t, batch)])
        visited: list[int] = []
        feature_rows: list[torch.Tensor] = []
        while len(visited) < min(n_f, max_feature_nodes):
            todo = min(batch, max_feature_nodes - len(visited))
            order = (
                list(range(len(visited), min(n_f, len(visited) + todo)))
                if n_f <= max_feature_nodes
                else _next_features(logit_rows, feature_rows, visited, targets.probabilities, n_f, todo)
            )
            feature_rows.append(rows_of([], order))
            visited.extend(order)
    return logit_rows, feature_rows, visited


def _next_features(
    logit_rows: torch.Tensor,
    feature_rows: list[torch.Tensor],
    visited: list[int],
    probabilities: torch.Tensor,
    n_f: int,
    count: int,
) -> list[int]:
    """The `count` unvisited features with the most influence on the targets through the rows known so far."""
    unvisited = torch.ones(n_f, dtype=torch.bool)
    unvisited[visited] = False
    candidates = unvisited.nonzero(as_tuple=True)[0]
    if len(candidates) <= count:
        return candidates.tolist()
    rows = torch.cat([logit_rows, *feature_rows])  # [n_t + n_visited, n_sources]
    owner = torch.full((n_f,), -1, dtype=torch.long)  # feature -> its row, when it has one
    owner[visited] = torch.arange(len(logit_rows), len(logit_rows) + len(visited))
    scores = influence_on_targets(rows, probabilities, owner)[:n_f]
    return candidates[scores[candidates].topk(count).indices].tolist()
