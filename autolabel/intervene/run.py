"""Run prompts clean and intervened in shared batches, and measure what each intervention did to the output.

Every prompt becomes one clean row plus one row per setting (ablation and each steering strength), all in
the same batch, so the clean run is computed once and every comparison is between rows that saw exactly
the same padding. One `generate` call per batch gives both the prompt's hidden states (captured from the
final norm during its first forward pass) and the greedy continuations, clean and intervened; hooks stay
on while tokens are generated, so a steered feature is clamped on the new tokens as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from autolabel.config import InterveneConfig
from autolabel.errors import AutolabelError
from autolabel.intervene.hooks import Edit, FeatureEdits
from autolabel.models import SubjectModel
from autolabel.transcoders.transcoder import TranscoderSet


@dataclass(frozen=True)
class Prompt:
    layer: int
    feature: int
    kind: str  # active: a top example cut at its peak token; neutral: a context where the feature is silent
    index: int  # rank among the feature's prompts of this kind
    doc_id: str
    role: str | None  # role of the token the example peaked on
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Setting:
    name: str  # ablate or steer
    multiple: float  # the new activation in units of the feature's max_act (0 for ablation)


@dataclass
class Outcome:
    """One (prompt, setting): the figures of the `interventions` table."""

    prompt: Prompt
    setting: Setting
    act: float  # the clean activation at the last prompt token
    new_act: float
    kl: float  # KL(clean || intervened) of the next token after the prompt
    kl_firing: float | None  # ablation: mean KL over the prompt tokens where the feature fires
    n_firing: int
    top_up: list[dict]  # next tokens whose probability rose most: token, id, clean, intervened
    top_down: list[dict]
    clean_text: str
    intervened_text: str


class Readout:
    """Hidden states after the final norm [n, d] -> float32 log-probabilities [n, vocab]."""

    def __init__(self, subject: SubjectModel):
        self.weight = subject.model.get_output_embeddings().weight.detach().float()  # [vocab, d]
        self.softcap = getattr(subject.model.config, "final_logit_softcapping", None)  # Gemma 2

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.float() @ self.weight.T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)


def kl_divergence(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) of log-probabilities [..., vocab] -> [...], clamped at 0 against rounding."""
    return (clean.exp() * (clean - other)).sum(-1).clamp_min(0)


# Two identical rows of one batch already differ by ~1e-7 in their logits (the kernels' rounding depends on
# the row), so a probability that moved less than this has not moved.
MIN_CHANGE = 1e-6


def token_changes(clean: torch.Tensor, other: torch.Tensor, k: int, tokenizer) -> tuple[list, list]:
    """The k tokens whose probability rose most and fell most (only those that moved), from log-probs [vocab]."""
    p_clean, p_other = clean.exp(), other.exp()
    change = p_other - p_clean

    def listed(values: torch.Tensor, ids: torch.Tensor) -> list[dict]:
        return [
            {"token": tokenizer.decode([i]), "id": i, "clean": float(p_clean[i]), "intervened": float(p_other[i])}
            for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            if v > MIN_CHANGE
        ]

    up, down = change.topk(k), (-change).topk(k)
    return listed(up.values, up.indices), listed(down.values, down.indices)


class FinalNormCapture:
    """Keeps the final norm's output of the first forward pass: the prompt's hidden states [B, S, d]."""

    def __init__(self, subject: SubjectModel):
        self.norm = getattr(subject.model.get_decoder(), "norm", None)
        if self.norm is None:
            raise AutolabelError(
                f"{subject.model_id} has no final norm module `norm`; interventions cannot read its outputs"
            )
        self.hidden: torch.Tensor | None = None

    def __enter__(self) -> FinalNormCapture:
        self.handle = self.norm.register_forward_hook(self._keep)
        return self

    def _keep(self, _module, _args, out) -> None:
        if self.hidden is None:
            self.hidden = out[0] if isinstance(out, tuple) else out

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def left_pad(prompts: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, S], padded on the left so the last prompt token is at -1 for every row."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, tokens in enumerate(prompts):
        ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens) :] = 1
    return ids, mask


@torch.inference_mode()
def run_batch(
    subject: SubjectModel,
    tset: TranscoderSet,
    prompts: list[Prompt],
    settings: list[Setting],
    max_acts: dict[tuple[int, int], float],
    config: InterveneConfig,
    readout: Readout,
) -> list[Outcome]:
    """Every prompt clean and under every setting, in one `generate` call."""
    per_prompt = 1 + len(settings)
    edits: list[Edit | None] = []
    for prompt in prompts:
        scale = max_acts[(prompt.layer, prompt.feature)]
        edits += [None] + [Edit(prompt.layer, prompt.feature, s.multiple * scale) for s in settings]
    tokenizer = subject.tokenizer
    ids, mask = left_pad([p.tokens for p in prompts for _ in range(per_prompt)], subject.pad_id)
    with FeatureEdits(subject, tset, edits) as hooks, FinalNormCapture(subject) as final:
        generated = subject.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=config.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=config.repetition_penalty,
            pad_token_id=subject.pad_id,
        )  # [B, S + new]
    texts = tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
    hidden = final.hidden  # [B, S, d]
    next_token = readout(hidden[:, -1])  # [B, vocab]
    acts = {}  # batch row -> its clean activations over the prompt [S]
    for layer, rows in hooks.rows.items():
        for i, row in enumerate(rows.tolist()):
            acts[row] = hooks.prompt_acts[layer][i]
    outcomes = []
    for p, prompt in enumerate(prompts):
        clean = p * per_prompt
        for s, setting in enumerate(settings):
            row = clean + 1 + s
            kl_firing, n_firing = None, 0
            if setting.name == "ablate":
                firing = ((acts[row] > 0) & mask[row].bool()).nonzero().squeeze(-1)  # [n] prompt positions
                n_firing = len(firing)
                if n_firing:
                    kl_firing = float(
                        kl_divergence(readout(hidden[clean, firing]), readout(hidden[row, firing])).mean()
                    )
            up, down = token_changes(next_token[clean], next_token[row], config.top_tokens, tokenizer)
            outcomes.append(
                Outcome(
                    prompt,
                    setting,
                    float(acts[row][-1]),
                    edits[row].value,
                    float(kl_divergence(next_token[clean], next_token[row])),
                    kl_firing,
                    n_firing,
                    up,
                    down,
                    texts[clean],
                    texts[row],
                )
            )
    return outcomes


def run_prompts(
    subject: SubjectModel,
    tset: TranscoderSet,
    prompts: list[Prompt],
    settings: list[Setting],
    max_acts: dict[tuple[int, int], float],
    config: InterveneConfig,
    advance: Callable[[Prompt], None] = lambda prompt: None,
) -> list[Outcome]:
    """All prompts in batches of about `batch_rows` rows, prompts of similar length together."""
    per_batch = max(1, config.batch_rows // (1 + len(settings)))
    ordered = sorted(prompts, key=lambda p: len(p.tokens))
    readout = Readout(subject)
    outcomes = []
    for start in range(0, len(ordered), per_batch):
        batch = ordered[start : start + per_batch]
        outcomes += run_batch(subject, tset, batch, settings, max_acts, config, readout)
        for prompt in batch:
            advance(prompt)
    return outcomes
