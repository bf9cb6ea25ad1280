"""circuit-tracer's layouts: a transcoder set (config.yaml + one file per layer, or the files its `transcoders`
list names, Gemma Scope ones included) and a cross-layer transcoder (W_enc_i / W_dec_i per source layer)."""

from __future__ import annotations

from pathlib import Path

import torch

from autolabel.errors import AutolabelError
from autolabel.transcoders.files import (
    K_MEANING,
    core_weights,
    hook_of,
    numbered_files,
    read_config,
    read_tensors,
    required,
    select_layers,
    setting_int,
)
from autolabel.transcoders.formats_gemma_scope import gemma_scope_layer
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


def _circuit_tracer_layer(t: dict, p: Path, layer: int, cfg: dict, cfg_path: Path) -> Transcoder:
    """circuit-tracer: pre = x @ W_enc.T + b_enc; out = acts @ W_dec + b_dec + x @ W_skip.T (W_skip is [d_out, d_in]).

    Its JumpReLU is pre * (pre > threshold), as ours; its TopK keeps the k largest values without a ReLU.
    """
    W_enc, W_dec, b_enc, b_dec, threshold, W_skip = core_weights(
        t,
        p,
        "circuit-tracer: W_enc [d_feat, d_model], W_dec [d_feat, d_model], b_enc [d_feat], b_dec [d_model], "
        "optional activation_function.threshold [d_feat], W_skip [d_model, d_model]",
        ("W_enc", "W_dec", "b_enc", "b_dec"),
        True,
        (("activation_function.threshold", "F"), ("W_skip", "OI")),
    )
    activation = "topk" if cfg.get("activation") == "topk" else "jumprelu" if threshold is not None else "relu"
    k = None
    if activation == "topk":  # k lives in config.yaml; older exports keep it as a tensor in the layer file
        if cfg.get("k") is None and "k" not in t:
            raise AutolabelError(f"{cfg_path} says activation: topk but gives no k; add e.g. `k: 64`")
        k = (
            setting_int(cfg["k"], cfg_path, "k", 1, W_enc.shape[1], K_MEANING)
            if cfg.get("k") is not None
            else setting_int(t["k"].tolist(), p, "tensor 'k'", 1, W_enc.shape[1], K_MEANING)
        )
    return Transcoder(
        layer,
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        activation,
        threshold if activation == "jumprelu" else None,
        k,
        None if W_skip is None else W_skip.T,
        origin=str(p),
    )


def load_circuit_tracer(folder: Path, layers: list[int] | None) -> TranscoderSet:
    """config.yaml names the hooks; weights are layer_<i>.safetensors, or the files its `transcoders` list names."""
    cfg_path = folder / "config.yaml"
    cfg = read_config(cfg_path, "yaml")
    if cfg.get("model_kind") == "cross_layer_transcoder":
        return load_clt(folder, layers)
    hooks = [
        hook_of(required(cfg, key, cfg_path, f"{key}: {example}"), cfg_path, key)[0]
        for key, example in (("feature_input_hook", "mlp.hook_in"), ("feature_output_hook", "mlp.hook_out"))
    ]
    listed, saved = cfg.get("transcoders"), cfg.get("layers")
    for key, value, kind in (
        ("transcoders", listed, "weight files, one per layer from 0"),
        ("layers", saved, "layer numbers"),
    ):
        if value is not None and not isinstance(value, list):
            raise AutolabelError(f"{cfg_path}: {key} is {value!r} but must be a list of {kind}; fix it in the file")
    saved = [setting_int(layer, cfg_path, "layers", 0, meaning=" (a layer number)") for layer in saved or []]
    found = dict(enumerate(listed)) if listed else numbered_files(folder, "layer_")
    if not listed and saved:  # written by save_circuit_tracer: ignore stale files of other layers
        found = {layer: f for layer, f in found.items() if layer in saved}
    expected = None if listed else saved or list(range(max(found, default=-1) + 1))
    transcoders = {}
    for layer, entry in select_layers(found, layers, folder, "layer_{i}.safetensors", expected).items():
        path = _listed_file(folder, str(entry), layer) if listed else entry
        tensors = read_tensors(path)  # a list may name Gemma Scope files; their keys tell their orientation
        transcoders[layer] = (
            gemma_scope_layer(tensors, path, layer)
            if path.suffix == ".npz" or "w_enc" in tensors
            else _circuit_tracer_layer(tensors, path, layer, cfg, cfg_path)
        )
    metadata = read_config(folder / "autolabel.json") if (folder / "autolabel.json").is_file() else {"config": cfg}
    return TranscoderSet(
        transcoders, hooks[0], hooks[1], "circuit-tracer", str(folder), cfg.get("model_name", ""), metadata
    )


def _listed_file(folder: Path, entry: str, layer: int) -> Path:
    """Local copy of one `transcoders` entry: a path (relative to the folder) or hf://org/repo/path mirrored in the
    folder."""
    if entry.startswith("hf://"):
        parts = entry[5:].split("?")[0].split("/")
        inside = "/".join(parts[2:])
        candidates = [folder / inside, folder / parts[1] / inside, folder / Path(inside).name]
    else:
        candidates = [Path(entry) if Path(entry).is_absolute() else folder / entry]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise AutolabelError(
        f"config.yaml lists {entry} for layer {layer}, but it is not at "
        f"{' or '.join(map(str, candidates))}; download it to the first of these paths"
    )


def load_clt(folder: Path, layers: list[int] | None) -> TranscoderSet:
    """circuit-tracer CLT: W_enc_i.safetensors holds W_enc_i [d_feat, d_model], b_enc_i, b_dec_i (the bias of output
    layer i) and optional threshold_i; W_dec_i.safetensors holds W_dec_i [d_feat, n_layers - i, d_model], slot j writing
    layer i + j. b_dec_i goes into slot 0 of source i only, so TranscoderSet.reconstruct adds each bias exactly once."""
    found = numbered_files(folder, "W_enc_")
    n_layers = max(found, default=-1) + 1
    cfg = read_config(folder / "config.yaml", "yaml") if (folder / "config.yaml").is_file() else {}
    hooks = [
        hook_of(cfg.get(key, default), folder / "config.yaml", key)[0]  # defaults: circuit-tracer's load_clt
        for key, default in (("feature_input_hook", "hook_resid_mid"), ("feature_output_hook", "hook_mlp_out"))
    ]
    layout = (
        "circuit-tracer CLT: W_enc_i [d_feat, d_model], b_enc_i [d_feat], b_dec_i [d_model], optional threshold_i "
        "[d_feat] in W_enc_i.safetensors; W_dec_i [d_feat, n_layers - i, d_model] in W_dec_i.safetensors"
    )
    transcoders = {}
    for i, enc_path in select_layers(found, layers, folder, "W_enc_{i}.safetensors", list(range(n_layers))).items():
        tensors = {**read_tensors(enc_path), **read_tensors(folder / f"W_dec_{i}.safetensors")}
        files = folder / f"W_enc_{i}.safetensors + W_dec_{i}.safetensors"
        W_enc, W_dec, b_enc, b_dec, threshold = core_weights(
            tensors,
            files,
            layout,
            (f"W_enc_{i}", f"W_dec_{i}", f"b_enc_{i}", f"b_dec_{i}"),
            True,
            ((f"threshold_{i}", "F"),),
            "FLO",
            L=n_layers - i,
        )
        bias = torch.zeros(n_layers - i, b_dec.shape[0])
        bias[0] = b_dec
        transcoders[i] = Transcoder(
            i, W_enc, b_enc, W_dec, bias, "relu" if threshold is None else "jumprelu", threshold, origin=str(files)
        )
    return TranscoderSet(
        transcoders,
        hooks[0],
        hooks[1],
        "circuit-tracer-clt",
        str(folder),
        cfg.get("model_name", ""),
        {"config": cfg, "n_layers": n_layers},
    )
