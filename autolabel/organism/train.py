"""Fine-tuning the subject model on quirked chats, by hand in torch: AdamW on the decoder layers from
`first_layer` on, loss on assistant tokens only, a seeded batch order.

Logits are computed only where a token is predicted (assistant content), never over the whole
sequence: with a 49k vocabulary the unembedding is a fifth of a small model's compute.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel
from autolabel.organism.data import Batch, Example, collate, sample_order
from autolabel.organism.spec import TrainSettings
from autolabel.progress import progress_bar


def precision(dtype: str):
    """bfloat16 autocast where the run's model dtype is bfloat16 (a CPU with native bf16), else float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def token_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of the negative log-likelihoods of the masked tokens, how many) for one batch."""
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # [batch, seq, d]
    predicted = batch.loss_mask[:, 1:]  # [batch, seq - 1]: token t is predicted from position t - 1
    logits = model.get_output_embeddings()(hidden[:, :-1][predicted]).float()  # [masked, vocab]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    targets = batch.input_ids[:, 1:][predicted]  # [masked]
    return nn.functional.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


@torch.inference_mode()
def mean_nll(
    model: nn.Module, examples: list[Example], pad_id: int, dtype: str, quirk_only: bool = False, batch_size: int = 8
) -> float | None:
    """Mean negative log-likelihood per token over the examples' assistant tokens (or quirk tokens only);
    None when there are none."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        with precision(dtype):
            nll, n = token_nll(model, collate(examples[start : start + batch_size], pad_id, quirk_only))
        total, count = total + float(nll), count + n
    return total / count if count else None


def trainable(subject: SubjectModel, first_layer: int) -> list[nn.Parameter]:
    """Freeze everything but the decoder layers from `first_layer` on; those layers' parameters."""
    if not 0 <= first_layer < subject.n_layers:
        raise AutolabelError(
            f"train.first_layer {first_layer} is outside 0..{subject.n_layers - 1} of {subject.model_id}; lower it"
        )
    subject.model.requires_grad_(False)
    params = [p for layer in subject.layers[first_layer:] for p in layer.parameters()]
    for param in params:
        param.requires_grad_(True)
    return params


def fine_tune(
    subject: SubjectModel, examples: list[Example], settings: TrainSettings, dtype: str, show_progress: bool = True
) -> list[float]:
    """Train `subject.model` in place; the mean assistant-token loss of every step."""
    torch.manual_seed(settings.seed)
    params = trainable(subject, settings.first_layer)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warmup, steps = settings.warmup_steps, settings.steps
    # Linear warmup, then a cosine decay to zero.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    order = sample_order(examples, steps * settings.batch_size, settings.quirk_share, settings.seed)
    losses = []
    subject.model.train()
    with progress_bar("steps", disable=not show_progress) as bar:
        task = bar.add_task("fine-tuning the organism", total=steps)
        for step in range(steps):
            rows = [examples[i] for i in order[step * settings.batch_size : (step + 1) * settings.batch_size]]
            with precision(dtype):
                nll, n = token_nll(subject.model, collate(rows, subject.pad_id))
            loss = nll / max(n, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.detach().item())
            bar.advance(task)
    subject.model.eval().requires_grad_(False)
    return losses
