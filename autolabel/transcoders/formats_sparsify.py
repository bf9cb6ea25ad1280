"""sparsify: one folder per hookpoint with cfg.json + sae.safetensors; TopK transcoders and autoencoders of MLP
hookpoints."""

from __future__ import annotations

import re
from pathlib import Path

from autolabel.errors import AutolabelError
from autolabel.transcoders.files import (
    K_MEANING,
    coder_folders,
    core_weights,
    read_config,
    read_tensors,
    required,
    select_layers,
    setting_int,
)
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


def _sparsify(t: dict, p: Path, layer: int, cfg: dict) -> Transcoder:
    """sparsify: pre = relu(x @ encoder.weight.T + encoder.bias), keep top k; out = acts @ W_dec + b_dec + x @ W_skip.T.

    ReLU-then-topk gives the same dense activations as our topk-then-ReLU. Autoencoders (transcode false) subtract
    b_dec.
    """
    if cfg.get("activation", "topk") != "topk" or cfg.get("embed_skip") or cfg.get("gram_lookup"):
        raise AutolabelError(
            f"{p.parent / 'cfg.json'}: only sparsify's topk activation without embed_skip/gram_lookup "
            f"is supported (got activation={cfg.get('activation')!r})"
        )
    W_enc, W_dec, b_enc, b_dec, W_skip = core_weights(
        t,
        p,
        "sparsify: encoder.weight [d_feat, d_in], encoder.bias [d_feat], W_dec [d_feat, d_out], b_dec [d_out], "
        "optional W_skip [d_out, d_in]",
        ("encoder.weight", "W_dec", "encoder.bias", "b_dec"),
        True,
        (("W_skip", "OI"),),
    )
    k = setting_int(
        required(cfg, "k", p.parent / "cfg.json", '"k": 32'), p.parent / "cfg.json", "k", 1, W_enc.shape[1], K_MEANING
    )
    return Transcoder(
        layer,
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        "topk",
        k=k,
        W_skip=None if W_skip is None else W_skip.T,
        b_in=None if cfg.get("transcode") else b_dec,
        origin=str(p),
    )


def load_sparsify(folder: Path, layers: list[int] | None) -> TranscoderSet:
    """One folder per hookpoint; only MLP hookpoints (layers.<L>.mlp) map onto autolabel's hooks."""
    found, cfgs = {}, {}
    for d in coder_folders(folder, "sae.safetensors"):
        if not (match := re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.mlp$", d.name)):
            raise AutolabelError(
                f"sparsify hookpoint folder {d.name!r} is not an MLP hookpoint such as layers.6.mlp; "
                f"autolabel reads transcoders of MLP layers only"
            )
        found[int(match[1])], cfgs[int(match[1])] = d, read_config(d / "cfg.json")
    chosen = select_layers(found, layers, folder, "a layers.<L>.mlp folder with cfg.json + sae.safetensors")
    transcoders = {
        layer: _sparsify(read_tensors(d / "sae.safetensors"), d / "sae.safetensors", layer, cfgs[layer])
        for layer, d in chosen.items()
    }
    transcode = {bool(cfgs[layer].get("transcode")) for layer in chosen}
    if len(transcode) > 1:
        raise AutolabelError(f"{folder} mixes sparsify transcoders and autoencoders; load them separately")
    hooks = ("mlp_in", "mlp_out") if transcode.pop() else ("mlp_out", "mlp_out")  # an autoencoder reads its own output
    return TranscoderSet(
        transcoders,
        hooks[0],
        hooks[1],
        "sparsify",
        str(folder),
        "",
        {"configs": {str(layer): cfgs[layer] for layer in chosen}},
    )
