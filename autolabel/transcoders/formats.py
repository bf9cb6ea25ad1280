"""Read published transcoder layouts into autolabel's one Transcoder convention.

Each tool stores the same maths in its own orientation (circuit-tracer and sparsify keep W_enc as [d_feat, d_in],
SAELens and Gemma Scope as [d_in, d_feat]; skip matrices differ again), so each format gets one small loader that
transposes to W_enc [d_in, d_feat], W_dec [d_feat, d_out], W_skip [d_in, d_out] and checks every shape against the
others: a wrong orientation would otherwise load silently and yield garbage features. Weights are read only from
safetensors or pickle-free .npz, never torch.load, so a downloaded checkpoint cannot run code on load.

Each family's loaders live in their own module (formats_circuit_tracer, formats_gemma_scope, formats_saelens,
formats_sparsify), beside the helpers they share in files.py; this one tells the format of a folder, hands it to its
loader, and writes circuit-tracer's layout, the one autolabel exports.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from autolabel.errors import AutolabelError
from autolabel.models import HOOK_ALIASES
from autolabel.transcoders.files import EXPECTED_FILES, coder_folders
from autolabel.transcoders.formats_circuit_tracer import load_circuit_tracer, load_clt
from autolabel.transcoders.formats_gemma_scope import load_gemma_scope
from autolabel.transcoders.formats_saelens import load_saelens
from autolabel.transcoders.formats_sparsify import load_sparsify
from autolabel.transcoders.transcoder import TranscoderSet

FORMATS = ("circuit-tracer", "circuit-tracer-clt", "gemma-scope", "gemma-scope-2", "saelens", "sparsify")
LOADERS = {
    "circuit-tracer": load_circuit_tracer,
    "circuit-tracer-clt": load_clt,
    "gemma-scope": load_gemma_scope,
    "gemma-scope-2": load_gemma_scope,
    "saelens": load_saelens,
    "sparsify": load_sparsify,
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
