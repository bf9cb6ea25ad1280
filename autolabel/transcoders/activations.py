"""Streams of (MLP input, MLP output) activations for training and checking transcoders.

Windows are batched with right padding (causal attention keeps real tokens
unaffected), run through the early-exit forward pass, and flattened to the real
tokens. The first token of every window is dropped: its activations are outliers
orders of magnitude larger than the rest (an attention sink) and would dominate
any squared-error measure.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from autolabel.corpus.windows import Window
from autolabel.models import HookPoint, SubjectModel


def batch_windows(windows: Iterable[Window], batch_size: int) -> Iterator[list[Window]]:
    batch: list[Window] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def pad_batch(batch: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [batch, max_len], right-padded."""
    length = max(len(w.token_ids) for w in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, window in enumerate(batch):
        input_ids[row, : len(window.token_ids)] = torch.from_numpy(window.token_ids.astype("int64"))
        mask[row, : len(window.token_ids)] = 1
    return input_ids, mask


def activation_pairs(
    subject: SubjectModel,
    windows: Iterable[Window],
    layers: list[int],
    input_hook: str,
    output_hook: str,
    batch_size: int = 16,
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch of windows: layer -> (inputs [n_tokens, d_in], outputs [n_tokens, d_out])."""
    hooks: dict[int, tuple[HookPoint, HookPoint]] = {
        layer: (subject.hook_point(input_hook, layer), subject.hook_point(output_hook, layer)) for layer in layers
    }
    points = [p for pair in hooks.values() for p in pair]
    for batch in batch_windows(windows, batch_size):
        input_ids, mask = pad_batch(batch, subject.pad_id)
        keep = mask.bool()
        keep[:, 0] = False
        captured = subject.capture(input_ids, mask, points)
        yield {layer: (captured[i][keep].float(), captured[o][keep].float()) for layer, (i, o) in hooks.items()}
