"""The local replacement model of one prompt: the subject model with its MLPs replaced by transcoder
features plus error terms, and its attention patterns and norm scales frozen (see freeze.py).

Per layer L, the MLP output (at the transcoder's output hook) becomes

    skip_L(live input) + sum_f act_f * W_dec[f] + b_dec + error_L

where the features' activations are constants (node outputs, not functions of the live input), and
error_L = true MLP output - the transcoder's reconstruction (skip path included) on the prompt, so the
replacement reproduces the model exactly. A layer without a transcoder has its whole MLP output as error_L.
A cross-layer transcoder's feature at layer s writes slot j of its decoder into layer s + j.

With activations, errors and embeddings held fixed, everything left (frozen attention, frozen norms, skip
paths, unembedding) is linear in the residual stream: `replay` runs that model on given node outputs
(`Sources`), so perturbations and attributions are both exact.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch

from autolabel.errors import AutolabelError
from autolabel.graph.freeze import Frozen, check_family, frozen
from autolabel.models import HookPoint, SubjectModel
from autolabel.transcoders.check import check_shapes
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


@dataclass
class Layout:
    """Where the replacement reads (covered layers) and writes (every layer)."""

    inputs: dict[int, HookPoint]  # covered layer -> the transcoder's input point
    outputs: list[HookPoint]  # layer -> the MLP output point the transcoder predicts


def layout(subject: SubjectModel, tset: TranscoderSet) -> Layout:
    """Hook points of a transcoder set, refusing one made for another model (wrong layers or widths) and a
    model whose normalisation cannot be frozen."""
    check_family(subject)
    check_shapes(subject, tset)
    outputs = [subject.hook_point(tset.output_hook, layer) for layer in range(subject.n_layers)]
    if outputs[0].io != "output" or outputs[0].pregain:
        raise AutolabelError(
            f"the transcoder set {tset.path} writes {tset.output_hook!r} ({outputs[0].name}); an "
            f"attribution graph replaces a module's output there: use a transcoder predicting mlp_out"
        )
    return Layout({layer: subject.hook_point(tset.input_hook, layer) for layer in tset.layers}, outputs)


@dataclass
class Sources:
    """Node outputs the replay adds to the residual stream (on the prompt: the clean ones)."""

    embeddings: torch.Tensor  # [S, d] the token embedding module's output
    acts: dict[int, torch.Tensor]  # covered layer -> [S, d_feat] feature activations
    errors: torch.Tensor  # [n_layers, S, d] what the transcoders miss (the whole MLP output where none)

    def zeroed(self) -> Sources:
        """No node writes anything: the replay then shows what biases alone contribute."""
        return Sources(
            torch.zeros_like(self.embeddings),
            {k: torch.zeros_like(v) for k, v in self.acts.items()},
            torch.zeros_like(self.errors),
        )


@dataclass
class Prompt:
    """The clean pass over one prompt: what the replacement is built from."""

    token_ids: torch.Tensor  # [S] int64
    frozen: Frozen
    inputs: dict[int, torch.Tensor]  # covered layer -> [S, d_in] the transcoder's input
    outputs: torch.Tensor  # [n_layers, S, d] the true MLP outputs
    final: torch.Tensor  # [S, d] the decoder's output (after the final norm)
    logits: torch.Tensor  # [V] the model's next-token logits at the last position
    sources: Sources


def decoder_slots(transcoder: Transcoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_dec [d_feat, n_out, d_out], b_dec [n_out, d_out]): a per-layer transcoder is one slot."""
    if transcoder.cross_layer:
        return transcoder.W_dec, transcoder.b_dec.reshape(transcoder.W_dec.shape[1], -1)
    return transcoder.W_dec[:, None, :], transcoder.b_dec[None, :]


def _writes(tset: TranscoderSet, source: int, n_layers: int) -> list[tuple[int, int]]:
    """(slot, target layer) pairs source `source` writes to: covered layers only, as TranscoderSet.reconstruct."""
    n_out = decoder_slots(tset[source])[0].shape[1]
    return [
        (slot, source + slot) for slot in range(n_out) if source + slot in tset.transcoders and source + slot < n_layers
    ]


def decoded(tset: TranscoderSet, acts: dict[int, torch.Tensor], n_layers: int) -> dict[int, torch.Tensor]:
    """The feature part of each covered layer's output: acts [.., S, d_feat] -> {layer: [.., S, d]} (b_dec included)."""
    out: dict[int, torch.Tensor] = {}
    for source, layer_acts in acts.items():
        W_dec, b_dec = decoder_slots(tset[source])
        for slot, target in _writes(tset, source, n_layers):
            out[target] = out.get(target, 0) + layer_acts @ W_dec[:, slot, :] + b_dec[slot]
    return out


def skipped(tset: TranscoderSet, inputs: dict[int, torch.Tensor], n_layers: int) -> dict[int, torch.Tensor]:
    """The skip part of each covered layer's output, linear in the inputs [.., S, d_in] -> {layer: [.., S, d]}."""
    out: dict[int, torch.Tensor] = {}
    for source, x in inputs.items():
        if tset[source].W_skip is None:
            continue
        skip = x @ tset[source].W_skip
        for _, target in _writes(tset, source, n_layers):
            out[target] = out.get(target, 0) + skip
    return out


def _tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _read_module(module: torch.nn.Module, keep) -> torch.utils.hooks.RemovableHandle:
    def hook(_module, _args, out) -> None:
        keep(_tensor(out))

    return module.register_forward_hook(hook)


def _write(subject: SubjectModel, point: HookPoint, make) -> torch.utils.hooks.RemovableHandle:
    """Replace the module output at `point` with make(old tensor)."""

    def hook(_module, _args, out):
        new = make(_tensor(out))
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return subject.layers.get_submodule(point.module).register_forward_hook(hook)


def _forward(subject: SubjectModel, token_ids: torch.Tensor) -> torch.Tensor:
    """token_ids [B, S] -> [B, S, d] the decoder's output after its final norm."""
    return subject.model.get_decoder()(input_ids=token_ids, use_cache=False).last_hidden_state


def unembed(subject: SubjectModel, hidden: torch.Tensor) -> torch.Tensor:
    """[.., d] -> [.., V] logits, with Gemma-2's final softcap where the model has one."""
    logits = subject.model.get_output_embeddings()(hidden)
    cap = getattr(subject.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def record(
    subject: SubjectModel, tset: TranscoderSet, where: Layout, token_ids: torch.Tensor, first_features: bool
) -> Prompt:
    """One clean pass over token_ids [S]: frozen patterns and scales, transcoder inputs, MLP outputs, logits.

    `first_features` False leaves position 0 without feature nodes (its attention-sink activations are outliers
    transcoders are not trained on): its whole transcoder output is then in the error node.
    """
    state, inputs, outputs, embedded = Frozen(), {}, {}, {}
    with ExitStack() as hooks:
        hooks.enter_context(frozen(subject, state, replay=False))
        embedding = subject.model.get_input_embeddings()
        hooks.callback(_read_module(embedding, lambda e: embedded.setdefault(0, e[0])).remove)
        for layer, point in where.inputs.items():
            hooks.callback(subject.watch(point, lambda x, layer=layer: inputs.setdefault(layer, x[0])).remove)
        for layer, point in enumerate(where.outputs):
            hooks.callback(subject.watch(point, lambda y, layer=layer: outputs.setdefault(layer, y[0])).remove)
        final = _forward(subject, token_ids[None])[0]
    outputs = torch.stack([outputs[layer] for layer in range(subject.n_layers)])  # [n_layers, S, d]
    acts = {layer: tset[layer].encode(x) for layer, x in inputs.items()}  # [S, d_feat] each
    if not first_features:
        for layer_acts in acts.values():
            layer_acts[0] = 0
    predicted = decoded(tset, acts, subject.n_layers)
    for layer, skip in skipped(tset, inputs, subject.n_layers).items():
        predicted[layer] = predicted[layer] + skip
    errors = outputs.clone()
    for layer, prediction in predicted.items():
        errors[layer] -= prediction
    return Prompt(
        token_ids, state, inputs, outputs, final, unembed(subject, final[-1]), Sources(embedded[0], acts, errors)
    )


@dataclass
class Replayed:
    inputs: dict[int, torch.Tensor]  # covered layer -> [B, S, d_in] the live transcoder input
    final: torch.Tensor  # [B, S, d]


def replay(
    subject: SubjectModel,
    tset: TranscoderSet,
    where: Layout,
    prompt: Prompt,
    sources: Sources,
    writes: list[torch.Tensor] | None = None,
    batch: int = 1,
) -> Replayed:
    """Run the frozen replacement model on node outputs `sources`, `batch` identical rows.

    `writes`, n_layers + 1 tensors [batch, S, d] (zeros that require grad), are added to the embedding (index 0)
    and to each layer's MLP output (index 1 + layer): their gradients are the direct effect of a write there.
    Separate leaves, not slices of one tensor: the backward of a slice fills a zero tensor of the whole stack,
    which took two thirds of every backward pass.
    """
    n_layers = subject.n_layers
    constant = decoded(tset, sources.acts, n_layers)  # layer -> [S, d]
    constant = [constant.get(layer, 0) + sources.errors[layer] for layer in range(n_layers)]
    live: dict[int, torch.Tensor] = {}

    def layer_output(layer: int) -> torch.Tensor:
        skip = skipped(tset, {s: live[s] for s in live if s <= layer}, n_layers).get(layer, 0)
        out = constant[layer] + skip
        return out if writes is None else out + writes[1 + layer]

    with ExitStack() as hooks:
        hooks.enter_context(frozen(subject, prompt.frozen, replay=True))
        embedding = subject.model.get_input_embeddings()
        embedded = sources.embeddings.expand(batch, -1, -1)
        embedded = embedded if writes is None else embedded + writes[0]
        hooks.callback(embedding.register_forward_hook(lambda _m, _a, _out: embedded).remove)
        for layer, point in where.inputs.items():
            hooks.callback(subject.watch(point, lambda x, layer=layer: live.__setitem__(layer, x)).remove)
        for layer, point in enumerate(where.outputs):
            hooks.callback(_write(subject, point, lambda _old, layer=layer: layer_output(layer)).remove)
        final = _forward(subject, prompt.token_ids[None].expand(batch, -1))
    return Replayed(live, final)


def without(sources: Sources, kind: str, layer: int, position: int, feature: int = -1) -> Sources:
    """`sources` with one node's output removed: a feature's activation, an error or an embedding set to 0."""
    if kind == "feature":
        acts = dict(sources.acts)
        acts[layer] = acts[layer].clone()
        acts[layer][position, feature] = 0
        return replace(sources, acts=acts)
    if kind == "error":
        errors = sources.errors.clone()
        errors[layer, position] = 0
        return replace(sources, errors=errors)
    embeddings = sources.embeddings.clone()
    embeddings[position] = 0
    return replace(sources, embeddings=embeddings)
