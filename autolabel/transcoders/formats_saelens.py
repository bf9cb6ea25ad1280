"""SAELens: one folder per layer with cfg.json + sae_weights.safetensors, SAEs and transcoders of its
architectures, configs of 6.x (hook names under metadata) and before."""

from __future__ import annotations

from pathlib import Path

from autolabel.errors import AutolabelError
from autolabel.transcoders.files import (
    K_MEANING,
    coder_folders,
    core_weights,
    hook_of,
    read_config,
    read_tensors,
    same_hooks,
    select_layers,
    setting_int,
)
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

_SAELENS_ARCHS = (
    "standard",
    "topk",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)


def _saelens(t: dict, p: Path, layer: int, cfg: dict) -> Transcoder:
    """SAELens: pre = (x - b_dec if apply_b_dec_to_input) @ W_enc + b_enc; skip variants add x @ W_skip.T.

    Its JumpReLU is relu(pre) * (pre > thr) (exact here with the threshold clamped at 0); its TopK is ours.
    """
    arch, act = cfg.get("architecture", "standard"), cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if arch not in _SAELENS_ARCHS or act not in ("relu", "topk"):
        raise AutolabelError(
            f"{p.parent / 'cfg.json'}: SAELens architecture {arch!r} with activation {act!r} is not "
            f"supported; supported architectures: {', '.join(_SAELENS_ARCHS)}"
        )
    topk, jump, transcoder = arch == "topk" or act == "topk", arch.startswith("jumprelu"), "transcoder" in arch
    if cfg.get("normalize_activations") not in (None, "none", False) or cfg.get("reshape_activations") == "hook_z":
        raise AutolabelError(
            f"{p.parent / 'cfg.json'}: normalize_activations/reshape_activations change the input at "
            f"run time; fold them into the weights with SAELens before exporting"
        )
    W_enc, W_dec, b_enc, b_dec, threshold, W_skip, scale = core_weights(
        t,
        p,
        f"SAELens {arch}: W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], threshold "
        "[d_sae], W_skip [d_out, d_in]",
        ("W_enc", "W_dec", "b_enc", "b_dec"),
        False,
        (("threshold", "F"), ("W_skip", "OI"), ("scaling_factor", "F")),
    )
    for name, tensor, needed in (("threshold", threshold, jump), ("W_skip", W_skip, "skip" in arch)):
        if needed and tensor is None:
            raise AutolabelError(f"{p} has no tensor {name!r}, which SAELens architecture {arch!r} needs; re-export it")
    if scale is not None:  # pre-6.0 finetuning scale multiplies the activations before decoding
        W_dec = W_dec * scale[:, None]
    kwargs = cfg.get("activation_fn_kwargs")
    k_field, k = (
        ("k", cfg["k"])
        if cfg.get("k") is not None
        else ("activation_fn_kwargs.k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    )
    if topk and k is None:
        raise AutolabelError(f'{p.parent / "cfg.json"} describes a topk SAE but gives no k; add `"k": <int>`')
    if topk:
        k = setting_int(k, p.parent / "cfg.json", k_field, 1, W_enc.shape[1], K_MEANING)
    if topk and cfg.get("rescale_acts_by_decoder_norm"):  # SAELens: topk(pre * |d_j|), decode acts / |d_j|; fold it
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    b_in = (
        None if transcoder or not cfg.get("apply_b_dec_to_input", True) else b_dec
    )  # SAELens forbids it for transcoders
    if b_in is not None and b_in.shape[0] != W_enc.shape[0]:
        raise AutolabelError(
            f"{p}: apply_b_dec_to_input needs b_dec of width d_in={W_enc.shape[0]}, not {b_in.shape[0]}"
        )
    return Transcoder(
        layer,
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        "topk" if topk else "jumprelu" if jump else "relu",
        None if threshold is None else threshold.clamp(min=0),
        k if topk else None,
        None if W_skip is None else W_skip.T,
        b_in,
        origin=str(p),
    )


def load_saelens(folder: Path, layers: list[int] | None) -> TranscoderSet:
    found, info = {}, {}
    for d in coder_folders(folder, "sae_weights.safetensors"):
        cfg = read_config(d / "cfg.json")
        meta = {**cfg, **(cfg.get("metadata") or {})}  # 6.x nests hook names in metadata; pre-6.0 configs are flat
        if not (meta.get("hook_name") or meta.get("hook_point")):
            raise AutolabelError(
                f"{d / 'cfg.json'} lacks the required key 'hook_name' (metadata.hook_name in SAELens "
                f'6, hook_point before); add e.g. "hook_name": "blocks.3.ln2.hook_normalized"'
            )
        hook_in, layer = hook_of(meta.get("hook_name") or meta["hook_point"], d / "cfg.json", "hook_name")
        hook_out = (
            hook_of(meta["hook_name_out"], d / "cfg.json", "hook_name_out")[0] if meta.get("hook_name_out") else hook_in
        )
        layer_key = next((key for key in ("hook_layer", "hook_point_layer") if meta.get(key) is not None), "hook_name")
        layer = layer if layer_key == "hook_name" else meta[layer_key]
        if layer is None:
            raise AutolabelError(
                f"{d / 'cfg.json'} names no layer; use hook_name blocks.<L>.{hook_in} or add hook_layer"
            )
        layer = setting_int(layer, d / "cfg.json", layer_key, 0, meaning=" (the layer the SAE reads)")
        if layer in found:
            raise AutolabelError(f"{folder}: both {found[layer]} and {d} are for layer {layer}; keep one per layer")
        found[layer], info[layer] = d, (cfg, (hook_in, hook_out))
    chosen = select_layers(found, layers, folder, "a folder with cfg.json + sae_weights.safetensors")
    transcoders = {
        layer: _saelens(
            read_tensors(d / "sae_weights.safetensors"), d / "sae_weights.safetensors", layer, info[layer][0]
        )
        for layer, d in chosen.items()
    }
    hooks = same_hooks([info[layer][1] for layer in chosen], folder)
    first = info[next(iter(chosen))][0]
    return TranscoderSet(
        transcoders,
        hooks[0],
        hooks[1],
        "saelens",
        str(folder),
        (first.get("metadata") or first).get("model_name", ""),
        {"configs": {str(layer): info[layer][0] for layer in chosen}},
    )
