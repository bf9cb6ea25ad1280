"""Reading the files of a transcoder release: tensors, configs, hook names and layer lists.

Every failure names the file (and the tensor or field) and what was expected, so a
broken or foreign download is reported as such instead of loading as garbage.
Tensors come only from safetensors or pickle-free .npz.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from autolabel.errors import AutolabelError
from autolabel.models import HOOK_ALIASES

EXPECTED_FILES = (
    "config.yaml + layer_<i>.safetensors (circuit-tracer transcoder set); "
    "W_enc_<i>.safetensors + W_dec_<i>.safetensors (circuit-tracer cross-layer transcoder); "
    "cfg.json + sae_weights.safetensors, or one such folder per layer (SAELens); "
    "cfg.json + sae.safetensors per hookpoint folder such as layers.6.mlp (sparsify); "
    "params.npz or params.safetensors under layer_<L>... folders (Gemma Scope 1 / 2)"
)
# What a `k` setting means, for the error naming a bad one (circuit-tracer, SAELens and sparsify TopK).
K_MEANING = " (the number of features each token keeps, at most the transcoder's width d_feat)"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weights file; truncation or corruption becomes an AutolabelError naming the file."""
    if not path.is_file():
        raise AutolabelError(f"missing weights file {path}; download it again or point at the folder that holds it")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
        return load_file(str(path))
    except Exception as err:
        raise AutolabelError(
            f"cannot read {path} ({type(err).__name__}: {err}); the file is truncated or "
            f"corrupt, download or export it again"
        ) from err


def required_tensor(tensors: dict, key: str, path: Path, needed: str) -> torch.Tensor:
    if key not in tensors:
        raise AutolabelError(
            f"{path} has no tensor {key!r} (it holds {', '.join(sorted(tensors)) or 'nothing'}); "
            f"this format needs {needed}; re-export the file or pick the right format"
        )
    return tensors[key].float()


def core_weights(
    t: dict,
    p: Path,
    layout: str,
    names: tuple[str, str, str, str],
    feat_first: bool,
    optional: tuple[tuple[str, str], ...] = (),
    dec: str = "FO",
    **dims: int,
) -> list:
    """W_enc (as [d_in, d_feat]), W_dec, b_enc, b_dec and `optional` tensors (None when absent), every shape checked
    against W_enc's in the file's own orientation. Shape letters: F d_feat, I d_in, O d_out, * any, others from dims."""
    W_enc, W_dec, b_enc, b_dec = (required_tensor(t, name, p, layout) for name in names)
    if W_enc.dim() != 2:
        raise AutolabelError(f"{p}: {names[0]} has shape {list(W_enc.shape)} but must be 2-D ({layout})")
    dims = {
        **dict(zip("FI" if feat_first else "IF", W_enc.shape, strict=True)),
        "O": W_dec.shape[-1],
        "*": None,
        **dims,
    }
    extra = [None if t.get(name) is None else t[name].float() for name, _ in optional]
    specs = [(names[1], W_dec, dec), (names[2], b_enc, "F"), (names[3], b_dec, "O")]
    for name, tensor, letters in specs + [(n, v, s) for (n, s), v in zip(optional, extra, strict=True)]:
        shape = [dims[c] for c in letters]
        if tensor is not None and (
            tensor.dim() != len(shape) or any(e not in (None, s) for e, s in zip(shape, tensor.shape, strict=True))
        ):
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise AutolabelError(
                f"{p}: {name} has shape {list(tensor.shape)} but {want} was expected ({layout}); the "
                f"tensors do not fit together: the file is from another format, saved transposed, or damaged"
            )
    return [W_enc.T if feat_first else W_enc, W_dec, b_enc, b_dec, *extra]


def read_config(path: Path, kind: str = "json") -> dict:
    if not path.is_file():
        raise AutolabelError(f"missing config file {path}; it must sit beside the weights")
    try:
        data = json.loads(path.read_text()) if kind == "json" else yaml.safe_load(path.read_text())
    except Exception as err:
        raise AutolabelError(f"cannot parse {path} ({err}); fix or re-download it") from err
    if not isinstance(data, dict):
        raise AutolabelError(f"{path} does not hold a mapping of settings; fix or re-download it")
    return data


def required(cfg: dict, key: str, path: Path, example: str):
    if cfg.get(key) in (None, ""):
        raise AutolabelError(f"{path} lacks the required key {key!r}; add it, e.g. `{example}`")
    return cfg[key]


def setting_int(value, path: Path, field: str, low: int, high: int | None = None, meaning: str = "") -> int:
    """An integer setting of a release's config (k, a layer); a word, a fraction or a value out of range is an error
    naming the file and the field, where int() or torch would raise a traceback or run with nonsense."""
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    if not whole or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise AutolabelError(
            f"{path}: {field} is {value!r} but must be an integer {bound}{meaning}; fix it in the file"
        )
    return int(value)


def hook_of(name: str, path: Path, field: str) -> tuple[str, int | None]:
    """A release hook name -> (name autolabel resolves, layer in it). Release names that are aliases stay as-is."""
    match = re.fullmatch(r"(?:blocks\.(\d+)\.)?([\w.]+)", str(name))
    if not match or match[2] not in HOOK_ALIASES:
        raise AutolabelError(
            f"{path}: {field} {name!r} is not a hook autolabel can capture; transcoders must "
            f"read/write one of {', '.join(sorted(HOOK_ALIASES))} (optionally as blocks.<L>.<name>)"
        )
    return match[2], int(match[1]) if match[1] else None


def select_layers(
    found: dict[int, object], layers: list[int] | None, where: Path, pattern: str, expected: list[int] | None = None
) -> dict[int, object]:
    """The requested layers; with none requested, every layer in `expected` must be present (a gap is a failed
    download)."""
    if not found:
        raise AutolabelError(
            f"{where} holds no transcoder files ({pattern.format(i='<L>')}); expected one of: {EXPECTED_FILES}"
        )
    if layers is None:
        missing = [layer for layer in expected or [] if layer not in found]
        if missing:
            raise AutolabelError(
                f"{where} is missing {', '.join(pattern.format(i=layer) for layer in missing)}; download "
                f"the missing file(s) again, or pass layers=[...] to load only those present ({sorted(found)})"
            )
        return dict(sorted(found.items()))
    missing = sorted(set(layers) - set(found))
    if missing:
        raise AutolabelError(
            f"{where} has no transcoder for layer(s) {missing} (expected {pattern.format(i='<L>')}); "
            f"available layers: {sorted(found)}"
        )
    return {layer: found[layer] for layer in sorted(set(layers))}


def same_hooks(pairs: list[tuple[str, str]], where: Path) -> tuple[str, str]:
    if len(set(pairs)) > 1:
        raise AutolabelError(
            f"{where}: the transcoders read/write different hooks {sorted(set(pairs))}; "
            f"load each kind from its own folder"
        )
    return pairs[0]


def numbered_files(folder: Path, prefix: str) -> dict[int, Path]:
    return {
        int(m[1]): f
        for f in folder.glob(f"{prefix}*.safetensors")
        if (m := re.fullmatch(rf"{prefix}(\d+)\.safetensors", f.name))
    }


def coder_folders(folder: Path, weights: str) -> list[Path]:
    """The folder itself if it holds cfg.json + weights, else its subfolders that do (one per layer / hookpoint)."""
    if (folder / "cfg.json").is_file() and (folder / weights).is_file():
        return [folder]
    return sorted(d for d in folder.iterdir() if d.is_dir() and (d / "cfg.json").is_file() and (d / weights).is_file())
