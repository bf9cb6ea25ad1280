"""Gemma Scope 1 (.npz) and 2 (.safetensors): one params file per layer_<L>... folder, JumpReLU transcoders."""

from __future__ import annotations

import re
from pathlib import Path

from autolabel.errors import AutolabelError
from autolabel.transcoders.files import core_weights, read_config, read_tensors, same_hooks, select_layers
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

# Gemma Scope 2 names its sites by HF module; these are the ones autolabel's hooks cover.
_HF_SITES = {
    "pre_feedforward_layernorm.output": "mlp_in",
    "mlp.input": "mlp_in",
    "pre_feedforward_layernorm.input": "resid_mid",
    "post_feedforward_layernorm.output": "mlp_out",
}


def gemma_scope_layer(t: dict, p: Path, layer: int) -> Transcoder:
    """Gemma Scope 1 (.npz, W_enc) and 2 (.safetensors, w_enc): pre = x @ W_enc + b_enc; acts = relu(pre) * (pre > thr).

    relu(pre) * (pre > thr) equals pre * (pre > max(thr, 0)), so clamping the threshold makes it exact in our jumprelu.
    Gemma Scope 2's affine_skip_connection is applied as x @ A, i.e. it already is [d_in, d_out].
    """
    enc, dec = ("W_enc", "W_dec") if "W_enc" in t else ("w_enc", "w_dec")  # version 1 / version 2 spelling
    W_enc, W_dec, b_enc, b_dec, threshold, W_skip = core_weights(
        t,
        p,
        "Gemma Scope: W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc [d_sae], b_dec [d_model], threshold "
        "[d_sae], optional affine_skip_connection [d_model, d_model]",
        (enc, dec, "b_enc", "b_dec"),
        False,
        (("threshold", "F"), ("affine_skip_connection", "IO")),
    )
    if threshold is None:
        raise AutolabelError(f"{p} has no tensor 'threshold'; Gemma Scope JumpReLU transcoders need one per feature")
    return Transcoder(
        layer, W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold.clamp(min=0), W_skip=W_skip, origin=str(p)
    )


def load_gemma_scope(folder: Path, layers: list[int] | None) -> TranscoderSet:
    """One params file per layer_<L>... folder. Gemma Scope 1 reads inside the pre-MLP RMSNorm (normalised, before its
    gain: ln2.hook_normalized) and writes the MLP output after the post-MLP norm; version 2 names its sites in
    config.json."""
    by_layer: dict[int, list[Path]] = {}
    for f in sorted(folder.rglob("params.npz")) + sorted(folder.rglob("params.safetensors")):
        texts = [str(f.relative_to(folder)), *reversed(folder.resolve().parts)]
        layer = next((int(m[-1]) for text in texts if (m := re.findall(r"layer_(\d+)", text))), None)
        if layer is None:
            raise AutolabelError(
                f"cannot tell which layer {f} belongs to; keep the release's layer_<L>/... folder names"
            )
        by_layer.setdefault(layer, []).append(f)
    for layer, paths in by_layer.items():
        if len(paths) > 1:
            raise AutolabelError(
                f"several Gemma Scope transcoders for layer {layer} under {folder}: "
                f"{', '.join(str(p.relative_to(folder)) for p in paths)}; point at a folder with one "
                f"width/L0 per layer, or write a circuit-tracer config.yaml listing one file per layer"
            )
    chosen = select_layers(
        {layer: paths[0] for layer, paths in by_layer.items()}, layers, folder, "layer_{i}/.../params.*"
    )
    transcoders, pairs, model_name = {}, [], ""
    for layer, path in chosen.items():
        transcoders[layer] = gemma_scope_layer(read_tensors(path), path, layer)
        site = read_config(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
        model_name = site.get("model_name", model_name)
        if path.suffix == ".npz":
            pairs.append(("ln2.hook_normalized", "hook_mlp_out"))
            continue
        pair = []
        for key, default in (("hf_hook_point_in", "mlp_in"), ("hf_hook_point_out", "mlp_out")):
            name = re.sub(r"^.*layers\.\d+\.", "", site.get(key, "")) or None
            if name is not None and name not in _HF_SITES:
                raise AutolabelError(
                    f"{path.parent / 'config.json'}: {key} {site[key]!r} is not a site autolabel can "
                    f"capture (known: {', '.join(_HF_SITES)})"
                )
            pair.append(_HF_SITES[name] if name else default)
        pairs.append(tuple(pair))
    hooks = same_hooks(pairs, folder)
    fmt = "gemma-scope-2" if any(p.suffix == ".safetensors" for p in chosen.values()) else "gemma-scope"
    return TranscoderSet(
        transcoders,
        hooks[0],
        hooks[1],
        fmt,
        str(folder),
        model_name,
        {"files": {str(layer): str(p) for layer, p in chosen.items()}},
    )
