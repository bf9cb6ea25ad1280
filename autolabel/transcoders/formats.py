"""Read published transcoder layouts into autolabel's one Transcoder convention.

Each tool stores the same maths in its own orientation (circuit-tracer and sparsify keep W_enc as [d_feat, d_in],
SAELens and Gemma Scope as [d_in, d_feat]; skip matrices differ again), so each format gets one small loader that
transposes to W_enc [d_in, d_feat], W_dec [d_feat, d_out], W_skip [d_in, d_out] and checks every shape against the
others: a wrong orientation would otherwise load silently and yield garbage features. Weights are read only from
safetensors or pickle-free .npz, never torch.load, so a downloaded checkpoint cannot run code on load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from autolabel.errors import AutolabelError
from autolabel.models import HOOK_ALIASES
from autolabel.transcoders.files import (
    EXPECTED_FILES,
    coder_folders,
    core_weights,
    hook_of,
    numbered_files,
    read_config,
    read_tensors,
    required,
    same_hooks,
    select_layers,
    setting_int,
)
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

FORMATS = ("circuit-tracer", "circuit-tracer-clt", "gemma-scope", "gemma-scope-2", "saelens", "sparsify")
# Gemma Scope 2 names its sites by HF module; these are the ones autolabel's hooks cover.
_HF_SITES = {
    "pre_feedforward_layernorm.output": "mlp_in",
    "mlp.input": "mlp_in",
    "pre_feedforward_layernorm.input": "resid_mid",
    "post_feedforward_layernorm.output": "mlp_out",
}
K_MEANING = " (the number of features each token keeps, at most the transcoder's width d_feat)"


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


def _gemma_scope(t: dict, p: Path, layer: int) -> Transcoder:
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


def _load_circuit_tracer(folder: Path, layers: list[int] | None) -> TranscoderSet:
    """config.yaml names the hooks; weights are layer_<i>.safetensors, or the files its `transcoders` list names."""
    cfg_path = folder / "config.yaml"
    cfg = read_config(cfg_path, "yaml")
    if cfg.get("model_kind") == "cross_layer_transcoder":
        return _load_clt(folder, layers)
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
            _gemma_scope(tensors, path, layer)
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


def _load_clt(folder: Path, layers: list[int] | None) -> TranscoderSet:
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


def _load_gemma_scope(folder: Path, layers: list[int] | None) -> TranscoderSet:
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
        transcoders[layer] = _gemma_scope(read_tensors(path), path, layer)
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


def _load_saelens(folder: Path, layers: list[int] | None) -> TranscoderSet:
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


def _load_sparsify(folder: Path, layers: list[int] | None) -> TranscoderSet:
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


LOADERS = {
    "circuit-tracer": _load_circuit_tracer,
    "circuit-tracer-clt": _load_clt,
    "gemma-scope": _load_gemma_scope,
    "gemma-scope-2": _load_gemma_scope,
    "saelens": _load_saelens,
    "sparsify": _load_sparsify,
}


def detect_format(folder: Path) -> str:
    """The format whose signature files are in `folder`; config files first, since they are what each tool reads."""
    for fmt, found in (
        ("circuit-tracer", (folder / "config.yaml").is_file()),
        ("circuit-tracer-clt", any(folder.glob("W_enc_*.safetensors"))),
        ("saelens", coder_folders(folder, "sae_weights.safetensors")),
        ("sparsify", coder_folders(folder, "sae.safetensors")),
        ("gemma-scope", any(folder.rglob("params.npz"))),
        ("gemma-scope-2", any(folder.rglob("params.safetensors"))),
    ):
        if found:
            return fmt
    if any(folder.glob("layer_*.safetensors")):
        raise AutolabelError(
            f"{folder} has circuit-tracer layer files but no config.yaml; add one with model_name, "
            f"model_kind: transcoder_set, feature_input_hook and feature_output_hook"
        )
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    raise AutolabelError(f"unknown transcoder format in {folder} (found: {present}); expected one of: {EXPECTED_FILES}")


def load_transcoders(path: str | Path, fmt: str = "auto", layers: list[int] | None = None) -> TranscoderSet:
    """Load a local transcoder release (a folder, or a file inside one) into autolabel's convention."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AutolabelError(f"transcoder path {path} does not exist; download the release there or fix the path")
    folder = path if path.is_dir() else path.parent
    fmt = fmt.lower().replace("_", "-")
    if fmt == "auto":
        fmt = detect_format(folder)
    if fmt not in LOADERS:
        raise AutolabelError(f"unknown transcoder format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    return LOADERS[fmt](folder, layers)


# autolabel's hook -> the name circuit-tracer's model bridge knows it by (it reads nothing else).
CIRCUIT_TRACER_HOOKS = {
    "mlp_in": "mlp.hook_in",
    "mlp_out": "hook_mlp_out",
    "resid_mid": "hook_resid_mid",
    "ln2_normalized": "ln2.hook_normalized",
}


def save_circuit_tracer(tset: TranscoderSet, folder: Path, model_name: str, dtype: torch.dtype = torch.float32) -> None:
    """Write a per-layer set in circuit-tracer's transcoder-set layout (config.yaml + layer_<i>.safetensors).

    circuit-tracer reads k from config.yaml (a `k` tensor in a layer file would fail its strict state-dict load), has
    no input bias (b_in is folded into b_enc: (x - b_in) @ W + b = x @ W + (b - b_in @ W)) and needs layers 0..N-1;
    the extra `layers:` key lets autolabel reload other layer sets. `dtype` float16 halves the files (the
    embedded default ships that way); loading always returns float32.
    """
    if tset.cross_layer:
        raise AutolabelError("save_circuit_tracer writes per-layer transcoder sets; this set is cross-layer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for layer, tc in tset.transcoders.items():
        b_enc = tc.b_enc if tc.b_in is None else tc.b_enc - tc.b_in @ tc.W_enc
        tensors = {
            "W_enc": tc.W_enc.T,
            "W_dec": tc.W_dec,
            "b_enc": b_enc,
            "b_dec": tc.b_dec,
            "activation_function.threshold": tc.threshold if tc.activation == "jumprelu" else None,
            "W_skip": None if tc.W_skip is None else tc.W_skip.T,
        }
        save_file(
            {key: value.detach().to(dtype).cpu().contiguous() for key, value in tensors.items() if value is not None},
            str(folder / f"layer_{layer}.safetensors"),
        )
    config = {
        "model_name": model_name,
        "model_kind": "transcoder_set",
        "feature_input_hook": CIRCUIT_TRACER_HOOKS[HOOK_ALIASES[tset.input_hook]],
        "feature_output_hook": CIRCUIT_TRACER_HOOKS[HOOK_ALIASES[tset.output_hook]],
        "activation": tset.activation,
        "layers": tset.layers,
    }
    if tset.activation == "topk":
        config["k"] = int(next(iter(tset.transcoders.values())).k)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "autolabel.json").write_text(json.dumps(tset.metadata, indent=2, default=str))
