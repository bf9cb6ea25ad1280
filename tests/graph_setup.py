"""What the graph tests share: tiny transcoder sets on the tiny random models (conftest.tiny_model), the
tiny models themselves, and a labeled run. The test modules wrap these in their own fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from conftest import tiny_model

from autolabel.config import RunConfig
from autolabel.models import SubjectModel
from autolabel.store import Store, now
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

D, F, N_LAYERS = 32, 16, 4
TEXT = "the cat sat on a mat while rain fell"
FAMILIES = ["llama", "qwen2", "gemma2"]


def per_layer_set(seed: int = 0) -> TranscoderSet:
    """ReLU skip transcoders at layers 1 and 2 (0 and 3 uncovered); layer 2 subtracts an input bias."""
    g = torch.Generator().manual_seed(seed)
    transcoders = {}
    for layer in (1, 2):
        transcoders[layer] = Transcoder(
            layer,
            torch.randn(D, F, generator=g) / D**0.5,
            0.1 * torch.randn(F, generator=g),
            torch.randn(F, D, generator=g) / F**0.5,
            0.1 * torch.randn(D, generator=g),
            W_skip=torch.randn(D, D, generator=g) / D,
            b_in=0.1 * torch.randn(D, generator=g) if layer == 2 else None,
        )
    return TranscoderSet(transcoders)


def cross_layer_set(seed: int = 1) -> TranscoderSet:
    """Cross-layer transcoders read at layers 0 and 2: source 0's slots for 1 and 3 write uncovered layers."""
    g = torch.Generator().manual_seed(seed)
    transcoders = {}
    for layer in (0, 2):
        n_out = N_LAYERS - layer
        transcoders[layer] = Transcoder(
            layer,
            torch.randn(D, F, generator=g) / D**0.5,
            0.1 * torch.randn(F, generator=g),
            torch.randn(F, n_out, D, generator=g) / F**0.5,
            0.1 * torch.randn(n_out, D, generator=g),
            W_skip=torch.randn(D, D, generator=g) / D if layer == 2 else None,
        )
    return TranscoderSet(transcoders)


SETS = {"per-layer": per_layer_set, "cross-layer": cross_layer_set}


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a busy machine two threads wait on each other
    (a 9-token forward pass takes 1 s instead of 3 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_subjects(tokenizer) -> dict[str, SubjectModel]:
    """A tiny random model of each family graphs support (Llama, Qwen2, Gemma-2)."""
    return {family: SubjectModel(tiny_model(family, N_LAYERS), tokenizer, f"tiny-{family}") for family in FAMILIES}


def labeled_run(path, config: RunConfig, tset: TranscoderSet) -> str:
    """A collected run of `tset` with an ok label (and a score) for every feature."""
    with Store(path) as store:
        run_id = store.start_run(config.model_dump_json(), "tiny")
        store.write_shard(run_id, "collect", "final", {})
        labels = [
            {
                "run_id": run_id,
                "layer": layer,
                "feature": f,
                "labeler": "test",
                "label": f"feature {layer}:{f}",
                "status": "ok",
                "created_at": now(),
            }
            for layer in tset.layers
            for f in range(F)
        ]
        scores = [
            {
                "run_id": run_id,
                "layer": 1,
                "feature": f,
                "labeler": "test",
                "scorer": "detection",
                "value": 0.5,
                "status": "ok",
                "unreliable": True,
            }
            for f in range(F)
        ]
        store.write_shard(run_id, "label", "0", {"labels": labels, "scores": scores})
    return run_id
