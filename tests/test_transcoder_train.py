"""The trainer and the FVU check on the tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autolabel.config import TranscoderTrainConfig
from autolabel.corpus.windows import Window
from autolabel.errors import AutolabelError
from autolabel.transcoders.check import measure_quality, refuse_bad_fit
from autolabel.transcoders.train import train_transcoders
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


def random_windows(n: int, length: int = 32, seed: int = 0) -> list[Window]:
    rng = np.random.default_rng(seed)
    return [Window(f"doc-{i}", "c", 0, rng.integers(100, 5000, length).astype(np.int32),
                   np.full(length, 4, dtype=np.uint8), np.zeros(length, dtype=np.int16)) for i in range(n)]


@pytest.fixture(scope="module")
def trained(tiny_subject):
    config = TranscoderTrainConfig(layers=[1, 2], d_feat=128, k=16, n_tokens=150_000, batch_tokens=256,
                                   buffer_tokens=8_000, passes_per_buffer=4, batch_windows=32, lr=3e-3,
                                   dead_after_tokens=5_000, checkpoint_every_steps=100)
    checkpoints = []
    result = train_transcoders(tiny_subject, random_windows(256), config, on_checkpoint=checkpoints.append)
    return result, checkpoints


def test_trainer_lowers_loss_and_reaches_fvu_bound(tiny_subject, trained):
    result, checkpoints = trained
    assert result.tokens >= 150_000 and result.transcoders.layers == [1, 2]
    first, last = result.history[0], result.history[-1]
    for layer in (1, 2):
        assert last[f"fvu_{layer}"] < 0.5 * first[f"fvu_{layer}"]
    quality = measure_quality(tiny_subject, result.transcoders, random_windows(32, seed=1), n_tokens=1000)
    for q in quality.values():
        assert q.fvu < 0.45, q  # held-out tokens
        assert q.l0 <= 16 and q.dead_fraction < 0.1
    assert len(checkpoints) == result.history[-1]["step"] // 100
    assert all(isinstance(c, TranscoderSet) for c in checkpoints)


def test_fvu_check_catches_transposed_and_wrong_hook(tiny_subject, trained):
    good = trained[0].transcoders
    windows = random_windows(16, seed=2)
    layer = good[1]
    transposed = TranscoderSet({1: Transcoder(1, layer.W_dec.detach().T, layer.b_enc.detach(), layer.W_enc.detach().T,
                                              layer.b_dec.detach(), "topk", k=16)}, path="transposed")
    quality = measure_quality(tiny_subject, transposed, windows, n_tokens=500)
    assert quality[1].fvu > 0.9
    with pytest.raises(AutolabelError, match="transposed weights"):
        refuse_bad_fit(transposed, quality, 0.5)
    wrong_hook = TranscoderSet({1: good[1]}, input_hook="mlp_in", output_hook="resid_mid", path="wrong-hook")
    quality = measure_quality(tiny_subject, wrong_hook, windows, n_tokens=500)
    with pytest.raises(AutolabelError, match="wrong hook point"):
        refuse_bad_fit(wrong_hook, quality, 0.5)
    good_quality = measure_quality(tiny_subject, TranscoderSet({1: good[1]}), windows, n_tokens=500)
    refuse_bad_fit(good, good_quality, 0.5)  # a good fit passes


def test_shape_that_does_not_match_model(tiny_subject):
    other = Transcoder(1, torch.randn(48, 64), torch.zeros(64), torch.randn(64, 48), torch.zeros(48))
    with pytest.raises(AutolabelError, match="d_model 32: it was made for another model"):
        measure_quality(tiny_subject, TranscoderSet({1: other}, path="x"), random_windows(2), n_tokens=10)
    with pytest.raises(AutolabelError, match="has layer 9"):
        measure_quality(tiny_subject, TranscoderSet({9: other}, path="x"), random_windows(2), n_tokens=10)


def test_jumprelu_training_learns_thresholds(tiny_subject):
    config = TranscoderTrainConfig(layers=[1], activation="jumprelu", d_feat=128, n_tokens=60_000,
                                   batch_tokens=256, buffer_tokens=8_000, passes_per_buffer=4, batch_windows=32,
                                   lr=3e-3, l0_coef=2e-3, jumprelu_init_threshold=0.05)
    result = train_transcoders(tiny_subject, random_windows(256), config)
    transcoder = result.transcoders[1]
    assert transcoder.activation == "jumprelu" and transcoder.threshold is not None
    assert not torch.allclose(transcoder.threshold, torch.full_like(transcoder.threshold, 0.05))  # thresholds moved
    assert result.history[-1]["fvu_1"] < 0.7 * result.history[0]["fvu_1"]
    quality = measure_quality(tiny_subject, result.transcoders, random_windows(32, seed=1), n_tokens=1000)
    assert quality[1].fvu < 0.6 and 0 < quality[1].l0 < 128
