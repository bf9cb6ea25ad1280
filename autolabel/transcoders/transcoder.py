"""One Transcoder type for every format autolabel reads or trains.

Internal convention (loaders convert to it; nothing else ever transposes):
  W_enc [d_in, d_feat], b_enc [d_feat]
  W_dec [d_feat, d_out]               per-layer transcoder
  W_dec [d_feat, n_out_layers, d_out] cross-layer transcoder: one source layer writing
                                      to itself and every later layer
  b_dec [d_out] (or [n_out_layers, d_out]), optional W_skip [d_in, d_out]
  optional b_in [d_in], subtracted from the input before encoding (SAELens'
  apply_b_dec_to_input; zero for most transcoders)
Activations: relu, jumprelu (per-feature threshold), topk (k largest, then ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from autolabel.errors import AutolabelError

Activation = Literal["relu", "jumprelu", "topk"]


class Transcoder(nn.Module):
    """Reads one layer's MLP input and predicts its MLP output (or, cross-layer, later layers' outputs).

    `origin` (the file the weights came from, where known) only serves error messages.
    """

    def __init__(
        self,
        layer: int,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        activation: Activation = "relu",
        threshold: torch.Tensor | None = None,
        k: int | None = None,
        W_skip: torch.Tensor | None = None,
        b_in: torch.Tensor | None = None,
        origin: str = "",
    ):
        super().__init__()
        d_in, d_feat = W_enc.shape
        if W_dec.shape[0] != d_feat:
            raise ValueError(f"W_dec has {W_dec.shape[0]} rows but W_enc has {d_feat} features")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("a jumprelu transcoder needs a threshold per feature")
        if activation == "topk" and not k:
            raise ValueError("a topk transcoder needs k")
        self.layer, self.activation, self.k = layer, activation, k
        self.W_enc = nn.Parameter(W_enc.float())
        self.b_enc = nn.Parameter(b_enc.float())
        self.W_dec = nn.Parameter(W_dec.float())
        self.b_dec = nn.Parameter(b_dec.float())
        self.threshold = None if threshold is None else nn.Parameter(threshold.float(), requires_grad=False)
        self.W_skip = None if W_skip is None else nn.Parameter(W_skip.float())
        self.b_in = None if b_in is None else nn.Parameter(b_in.float(), requires_grad=False)
        refuse_non_finite(self, origin)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_feat(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[-1]

    @property
    def cross_layer(self) -> bool:
        return self.W_dec.dim() == 3

    def decoder_rows(self, features: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """[n, d_out] float32: each feature's decoder direction (every feature, or `features`). A cross-layer
        decoder's slices are summed: the feature's total write into the residual stream over the layers it
        writes. The one convention for "a feature's direction" (labels, reports, clusters, audit diffs)."""
        rows = self.W_dec.detach()
        rows = (rows if features is None else rows[features]).float()
        return rows.sum(1) if self.cross_layer else rows

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_feat], before the nonlinearity."""
        if self.b_in is not None:
            x = x - self.b_in
        return x.float() @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)  # the scatter needs the set, not its order
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations [..., d_in] -> [..., d_feat]."""
        return self.activate(self.pre_acts(x))

    def encode_at_input_precision(self, x: torch.Tensor) -> torch.Tensor:
        """Dense float32 activations [..., d_in] -> [..., d_feat]; a bfloat16 x is multiplied by bfloat16 weights.

        Collection's encode of a bfloat16 subject model: its inputs carry bfloat16 precision already,
        and the bfloat16 product (float32 accumulation, result rounded to bfloat16) runs at about 2.5x
        the float32 one on CPUs with bfloat16 units. The bias, the threshold or top-k selection and the
        values stay float32. Any other x is encoded exactly as `encode` does.
        """
        if x.dtype != torch.bfloat16:
            return self.encode(x)
        if self.b_in is not None:
            x = (x.float() - self.b_in).bfloat16()
        return self.activate((x @ self.bfloat16_encoder()).float().add_(self.b_enc))  # [..., d_feat] float32

    def bfloat16_encoder(self) -> torch.Tensor:
        """W_enc rounded to bfloat16 [d_in, d_feat], made once per version of W_enc (training changes it in place)."""
        version = (self.W_enc.data_ptr(), self.W_enc._version)
        if getattr(self, "_bf16_version", None) != version:
            self._bf16_encoder, self._bf16_version = self.W_enc.detach().bfloat16(), version
        return self._bf16_encoder

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Feature activations [..., d_feat] -> prediction [..., d_out] (cross-layer: [..., n_out, d_out])."""
        if self.cross_layer:
            out = torch.einsum("...f,fod->...od", acts, self.W_dec) + self.b_dec
        else:
            out = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: decode needs the input x")
            skip = x.float() @ self.W_skip
            out = out + (skip.unsqueeze(-2) if self.cross_layer else skip)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)


def refuse_non_finite(transcoder: Transcoder, origin: str) -> None:
    """Every loader and the trainer build a Transcoder, so this is where NaN or infinite weights stop.

    Such weights run without error and poison what follows: TopK ranks NaN pre-activations
    first, stored statistics turn NaN, and a NaN FVU passes `fvu > max_fvu`.
    """
    for name, tensor in transcoder.named_parameters():  # float32 already: a float64 value too big for it is inf
        finite = torch.isfinite(tensor)
        if not finite.all():
            n_nan, n_inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
            first = finite.logical_not().nonzero()[0].tolist()
            raise AutolabelError(
                f"transcoder layer {transcoder.layer}: {name}{f' in {origin}' if origin else ''} holds {n_nan} NaN and "
                f"{n_inf} infinite value(s) of {tensor.numel()} (first at index {first}); the weights are damaged (a "
                f"diverged training run, a bad export or a corrupt download): export, download or train them again"
            )


@dataclass
class TranscoderSet:
    """Transcoders for several layers of one model, read at `input_hook`, predicting `output_hook`.

    For a cross-layer set, the prediction of layer L's output is the sum over source
    layers i <= L of transcoder i's decoder slice for L.
    """

    transcoders: dict[int, Transcoder]
    input_hook: str = "mlp_in"
    output_hook: str = "mlp_out"
    source_format: str = "autolabel"
    path: str = ""
    model_name: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.transcoders)

    @property
    def d_feat(self) -> int:
        return next(iter(self.transcoders.values())).d_feat

    @property
    def activation(self) -> str:
        return next(iter(self.transcoders.values())).activation

    @property
    def cross_layer(self) -> bool:
        return next(iter(self.transcoders.values())).cross_layer

    def __getitem__(self, layer: int) -> Transcoder:
        return self.transcoders[layer]

    def reconstruct(self, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Predicted outputs per layer from the inputs at every layer, [n, d_in] -> [n, d_out]."""
        if not self.cross_layer:
            return {layer: self.transcoders[layer](x) for layer, x in inputs.items()}
        first = self.layers[0]
        predictions: dict[int, torch.Tensor] = {}
        for source, x in inputs.items():
            out = self.transcoders[source](x)  # [n, n_out, d_out]; slot j is layer source + j
            for j in range(out.shape[-2]):
                target = source + j
                if target in inputs:
                    predictions[target] = predictions.get(target, 0) + out[..., j, :]
        return {layer: predictions[layer] for layer in sorted(predictions) if layer >= first}
