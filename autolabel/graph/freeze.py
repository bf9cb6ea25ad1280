"""Attention patterns and normalisation scales: recorded on the prompt, then replayed as constants.

The local replacement model is linear in the residual stream only once every nonlinearity other than the
transcoder features is frozen at its value on the prompt: each attention head's softmax pattern, and each
RMSNorm's 1 / rms scale (the input norms, Llama's post-attention norm, Gemma-2/3's pre- and post-feedforward
norms, the final norm). Recording runs the family's own eager attention (Gemma-2's logit softcap and sliding
window included) and keeps its pattern; replaying multiplies the kept pattern with the live values, and a
norm's gain with its live input times the kept scale. Queries and keys then no longer matter, so rotary
embeddings and Qwen3/Gemma-3's query/key norms need no special case.

The model's attention implementation is switched to this one inside `frozen(...)` only, and restored after.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from autolabel.errors import AutolabelError
from autolabel.models import GEMMA_LIKE, LLAMA_LIKE, SubjectModel

IMPLEMENTATION = "autolabel_frozen"  # the name registered with transformers' attention interfaces


@dataclass
class Frozen:
    """What `record` kept on the prompt (batch 1); replay broadcasts it over any batch."""

    patterns: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, heads, S, S] softmax weights
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # norm module name -> [1, S, 1] float32 1/rms


def check_family(subject: SubjectModel) -> None:
    if subject.family not in LLAMA_LIKE | GEMMA_LIKE:
        raise AutolabelError(
            f"attribution graphs support the Llama, Qwen2/3 and Gemma-2/3 families; {subject.model_id} "
            f"is {subject.family!r}, whose normalisation autolabel cannot freeze"
        )


def rms_norms(subject: SubjectModel) -> list[tuple[str, nn.Module]]:
    """Every RMSNorm in the model, by module name (the families autolabel reads use RMSNorm only)."""
    check_family(subject)
    return [
        (name, module) for name, module in subject.model.named_modules() if type(module).__name__.endswith("RMSNorm")
    ]


def _epsilon(module: nn.Module) -> float:
    return getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))


def _gain(module: nn.Module, family: str) -> torch.Tensor:
    """[d] float32: Gemma parametrises its norms as 1 + weight (as SubjectModel._norm_gain)."""
    weight = module.weight.float()
    return 1.0 + weight if family in GEMMA_LIKE else weight


def _family_function(module: nn.Module, name: str):
    """`eager_attention_forward` or `repeat_kv` from the modeling file of this attention module."""
    function = getattr(sys.modules[type(module).__module__], name, None)
    if function is None:
        raise AutolabelError(
            f"{type(module).__name__} has no {name} in its modeling file, so its attention pattern "
            f"cannot be frozen; attribution graphs support Llama, Qwen2/3 and Gemma-2/3"
        )
    return function


def _register(attention) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # the additive float mask eager attention reads


@contextmanager
def frozen(subject: SubjectModel, state: Frozen, replay: bool) -> Iterator[Frozen]:
    """Inside: the model records patterns and scales into `state` (replay=False) or replays them (replay=True)."""
    family = subject.family

    def attention(module, query, key, value, attention_mask, **kwargs):
        if not replay:  # query, key, value: [B, heads (kv heads), S, d_head]
            output, weights = _family_function(module, "eager_attention_forward")(
                module, query, key, value, attention_mask, **kwargs
            )
            state.patterns[module.layer_idx] = weights.detach()
            return output, weights
        pattern = state.patterns[module.layer_idx]  # [1, heads, S, S]
        values = _family_function(module, "repeat_kv")(value, module.num_key_value_groups)  # [B, heads, S, d_head]
        return torch.matmul(pattern.to(values.dtype), values).transpose(1, 2).contiguous(), pattern

    def norm_hook(name: str, module: nn.Module):
        epsilon, gain = _epsilon(module), _gain(module, family)

        def hook(_module, args, output):
            x = args[0].float()  # [B, S, d]
            if not replay:
                state.scales[name] = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon).detach()
                return None
            return (x * state.scales[name] * gain).to(args[0].dtype)

        return hook

    _register(attention)
    config = subject.model.config
    previous = config._attn_implementation
    handles = [module.register_forward_hook(norm_hook(name, module)) for name, module in rms_norms(subject)]
    config._attn_implementation = IMPLEMENTATION
    try:
        yield state
    finally:
        config._attn_implementation = previous
        for handle in handles:
            handle.remove()
