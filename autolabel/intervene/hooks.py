"""Forward hooks that set one transcoder feature's activation per batch row and leave the rest of the model alone.

At the feature's source layer L a hook reads the transcoder's input and encodes it, giving the feature's
clean activation `act` [b, S]; at every layer the feature writes to (L itself, or L, L+1, ... for a
cross-layer transcoder) a second hook adds (new - act) * W_dec[feature] (that layer's slice) to the
transcoder's output hook (the MLP output). Only the change of this one feature's contribution is added,
so every other feature and the transcoder's error term (what it fails to reconstruct) stay exactly as in
the clean run, and a row whose activation does not change is computed exactly as the clean row.

Activations at layer L depend only on earlier layers, so the `act` a row sees at its source layer is the
clean activation even while its own edit changes later layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel
from autolabel.transcoders.transcoder import TranscoderSet


@dataclass(frozen=True)
class Edit:
    """Clamp feature (layer, feature) of one batch row to `value` at every position (0: ablation)."""

    layer: int
    feature: int
    value: float


def _tensor_of(value) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


class FeatureEdits:
    """The hooks of one batch: `edits[i]` is row i's edit, None for a clean row. Use as a context manager.

    After the first forward pass (the prompt), `prompt_acts[layer]` holds the clean activations
    [b, S] of the rows `rows[layer]` edit at that source layer.
    """

    def __init__(self, subject: SubjectModel, tset: TranscoderSet, edits: list[Edit | None]):
        self.subject, self.tset = subject, tset
        self.rows: dict[int, torch.Tensor] = {}  # source layer -> [b] batch rows it edits
        self.features: dict[int, torch.Tensor] = {}  # source layer -> [b] feature of each of those rows
        self.values: dict[int, torch.Tensor] = {}  # source layer -> [b] new activation
        self.decoders: dict[int, torch.Tensor] = {}  # source layer -> [b, n_out, d_out] decoder rows
        for layer in sorted({edit.layer for edit in edits if edit is not None}):
            rows = [i for i, edit in enumerate(edits) if edit is not None and edit.layer == layer]
            features = torch.tensor([edits[i].feature for i in rows])
            self.rows[layer] = torch.tensor(rows)
            self.features[layer] = features
            self.values[layer] = torch.tensor([edits[i].value for i in rows], dtype=torch.float32)
            W_dec = tset[layer].W_dec.detach()
            self.decoders[layer] = W_dec[features] if tset[layer].cross_layer else W_dec[features][:, None, :]
        self.deltas: dict[int, torch.Tensor] = {}  # source layer -> [b, S] new - act, of the latest forward
        self.prompt_acts: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def targets(self) -> dict[int, list[tuple[int, int]]]:
        """Target layer -> (source layer, decoder slot) of every edited feature that writes to it."""
        writers: dict[int, list[tuple[int, int]]] = {}
        for source, decoders in self.decoders.items():
            for slot in range(decoders.shape[1]):
                if source + slot < self.subject.n_layers:
                    writers.setdefault(source + slot, []).append((source, slot))
        return writers

    def __enter__(self) -> FeatureEdits:
        for source in self.rows:
            point = self.subject.hook_point(self.tset.input_hook, source)
            self.handles.append(self.subject.watch(point, lambda x, source=source: self._read(source, x)))
        for target, writers in self.targets().items():
            point = self.subject.hook_point(self.tset.output_hook, target)
            if point.io != "output" or point.pregain:
                raise AutolabelError(
                    f"cannot add to the transcoder's output hook {self.tset.output_hook!r} "
                    f"({point.name}): interventions need a module output such as mlp_out"
                )
            module = self.subject.layers.get_submodule(point.module)
            self.handles.append(
                module.register_forward_hook(lambda _m, _args, out, writers=writers: self._write(writers, out))
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _read(self, source: int, x: torch.Tensor) -> None:
        """x [B, S, d_in] -> the clean activation of each edited row's feature, and its change."""
        rows, features = self.rows[source], self.features[source]
        acts = self.tset[source].encode(x[rows])  # [b, S, d_feat]
        act = acts.gather(-1, features[:, None, None].expand(-1, x.shape[1], 1)).squeeze(-1)  # [b, S]
        self.deltas[source] = self.values[source][:, None] - act
        self.prompt_acts.setdefault(source, act)

    def _write(self, writers: list[tuple[int, int]], out):
        tensor = _tensor_of(out)  # [B, S, d_out]
        for source, slot in writers:
            change = self.deltas[source][..., None] * self.decoders[source][:, None, slot, :]  # [b, S, d_out]
            tensor = tensor.index_add(0, self.rows[source], change.to(tensor.dtype))
        return (tensor, *out[1:]) if isinstance(out, tuple) else tensor
