"""The trainer and the FVU check on the tiny random Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autolabel.config import TranscoderTrainConfig
from autolabel.corpus.windows import Window
from autolabel.errors import AutolabelError
from autolabel.transcoders import groups
from autolabel.transcoders.check import measure_quality, refuse_bad_fit
from autolabel.transcoders.groups import train_in_groups
from autolabel.transcoders.stage import open_transcoders
from autolabel.transcoders.train import _Trainee, train_transcoders
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


def random_windows(n: int, length: int = 32, seed: int = 0) -> list[Window]:
    rng = np.random.default_rng(seed)
    return [
        Window(
            f"doc-{i}",
            "c",
            0,
            rng.integers(100, 5000, length).astype(np.int32),
            np.full(length, 4, dtype=np.uint8),
            np.zeros(length, dtype=np.int16),
        )
        for i in range(n)
    ]


TRAIN_CONFIG = TranscoderTrainConfig(
    layers=[1, 2],
    d_feat=128,
    k=16,
    n_tokens=150_000,
    batch_tokens=256,
    buffer_tokens=8_000,
    passes_per_buffer=4,
    batch_windows=32,
    lr=3e-3,
    dead_after_tokens=5_000,
    checkpoint_every_steps=100,
)


@pytest.fixture(scope="module")
def trained(tiny_subject):
    checkpoints = []
    result = train_transcoders(tiny_subject, random_windows(256), TRAIN_CONFIG, on_checkpoint=checkpoints.append)
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
    assert [c["position"]["step"] for c in checkpoints] == list(range(100, result.history[-1]["step"] + 1, 100))


def test_resumed_run_ends_with_the_same_weights(tiny_subject, trained):
    """Step 500 lies inside a later buffer: resuming refills it, redraws its shuffles, skips the batches done, and
    continues to exactly the uninterrupted run's weights."""
    result, checkpoints = trained
    state = checkpoints[4]
    assert state["position"]["buffer_index"] > 0 and state["position"]["batches_done"] > 0
    resumed = train_transcoders(tiny_subject, random_windows(256), TRAIN_CONFIG, resume=state)
    assert resumed.tokens == result.tokens and resumed.history == result.history
    assert resumed.resampled == result.resampled
    for layer in (1, 2):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip"):
            assert torch.equal(getattr(resumed.transcoders[layer], name), getattr(result.transcoders[layer], name))
    with pytest.raises(ValueError, match="other training settings"):
        train_transcoders(tiny_subject, random_windows(256), TRAIN_CONFIG.model_copy(update={"lr": 1e-3}), resume=state)


def test_fvu_check_catches_transposed_and_wrong_hook(tiny_subject, trained):
    good = trained[0].transcoders
    windows = random_windows(16, seed=2)
    layer = good[1]
    transposed = TranscoderSet(
        {
            1: Transcoder(
                1,
                layer.W_dec.detach().T,
                layer.b_enc.detach(),
                layer.W_enc.detach().T,
                layer.b_dec.detach(),
                "topk",
                k=16,
            )
        },
        path="transposed",
    )
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
    config = TranscoderTrainConfig(
        layers=[1],
        activation="jumprelu",
        d_feat=128,
        n_tokens=60_000,
        batch_tokens=256,
        buffer_tokens=8_000,
        passes_per_buffer=4,
        batch_windows=32,
        lr=3e-3,
        l0_coef=2e-3,
        jumprelu_init_threshold=0.05,
    )
    result = train_transcoders(tiny_subject, random_windows(256), config)
    transcoder = result.transcoders[1]
    assert transcoder.activation == "jumprelu" and transcoder.threshold is not None
    assert not torch.allclose(transcoder.threshold, torch.full_like(transcoder.threshold, 0.05))  # thresholds moved
    assert result.history[-1]["fvu_1"] < 0.7 * result.history[0]["fvu_1"]
    quality = measure_quality(tiny_subject, result.transcoders, random_windows(32, seed=1), n_tokens=1000)
    assert quality[1].fvu < 0.6 and 0 < quality[1].l0 < 128


def test_calibration_centres_the_encoder_on_the_data_mean():
    """With a large shared mean in the inputs, an uncentred random encoder leaves features that never fire."""
    generator = torch.Generator().manual_seed(1)
    trainee = _Trainee(0, 16, TranscoderTrainConfig(d_feat=64, k=4), generator)
    x = torch.randn(4000, 16, generator=generator) + 3.0 * torch.randn(16, generator=generator)
    y = torch.randn(4000, 16, generator=generator) + 2.0
    trainee.calibrate(x, y)
    with torch.no_grad():
        pre = (x / trainee.x_scale) @ trainee.W_enc + trainee.b_enc  # [tokens, d_feat]
        assert pre.mean(0).abs().max() < 1e-3 * pre.std(0).min()
        assert ((pre > 0).float().mean(0) > 0.2).all()  # every feature is in the running on many tokens
        assert torch.allclose(trainee.b_dec * trainee.y_scale, y.mean(0), atol=1e-5)


def test_resampling_points_dead_features_at_badly_explained_tokens():
    config = TranscoderTrainConfig(d_feat=64, k=4, dead_after_tokens=100)
    generator = torch.Generator().manual_seed(0)
    trainee = _Trainee(0, 16, config, generator)
    optimizer = torch.optim.Adam(trainee.parameters(), lr=1e-3)
    x, y = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
    loss, _ = trainee.loss(x, y)
    loss.backward()
    optimizer.step()  # fills Adam's moments
    dead = torch.tensor([3, 10, 40])
    alive = torch.ones(64, dtype=torch.bool)
    alive[dead] = False
    trainee.tokens_since_fired[dead] = 1_000
    with torch.no_grad():
        residual = y - trainee(x)[2]
    before = {name: tensor.clone() for name, tensor in optimizer.state[trainee.W_dec].items()}
    assert trainee.resample_dead(x, y, optimizer, generator) == 3
    assert int(trainee.tokens_since_fired[dead].sum()) == 0
    directions = residual / residual.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        _, acts, _ = trainee(x)
    for feature in dead.tolist():
        row = trainee.W_dec[feature].detach()
        token = int((directions @ row).argmax())
        assert torch.allclose(row, directions[token], atol=1e-5)  # the decoder writes that token's error
        assert acts[token, feature] > 0  # and the feature fires on it again
    # Adam: no stale direction for the new rows, and a second moment like the alive rows' (not zero,
    # which would make the next step a full-size sign step); the alive rows keep theirs.
    state = optimizer.state[trainee.W_dec]
    alive_mean = float(before["exp_avg_sq"][alive].mean())
    assert state["exp_avg"][dead].abs().sum() == 0
    assert torch.allclose(state["exp_avg_sq"][dead], torch.full((3, 16), alive_mean))
    assert torch.equal(state["exp_avg"][alive], before["exp_avg"][alive])
    assert trainee.resample_dead(x, y, optimizer, generator) == 0  # nothing is dead any more


def test_skip_and_resampling_lower_fvu_and_dead_features(tiny_subject):
    base = dict(
        layers=[1],
        d_feat=512,
        k=4,
        n_tokens=60_000,
        batch_tokens=256,
        buffer_tokens=8_000,
        passes_per_buffer=4,
        batch_windows=32,
        lr=3e-3,
        dead_after_tokens=3_000,
        aux_coef=0.0,
    )
    heldout = random_windows(32, seed=1)
    plain = train_transcoders(
        tiny_subject, random_windows(256), TranscoderTrainConfig(**base, skip=False, resample_every_steps=0)
    )
    revived = train_transcoders(
        tiny_subject,
        random_windows(256),
        TranscoderTrainConfig(**base, skip=True, resample_every_steps=20, resample_until=0.6),
    )
    assert plain.resampled == {} and revived.resampled[1] > 0
    plain_quality = measure_quality(tiny_subject, plain.transcoders, heldout, n_tokens=1000)[1]
    revived_quality = measure_quality(tiny_subject, revived.transcoders, heldout, n_tokens=1000)[1]
    assert revived_quality.dead_fraction < 0.7 * plain_quality.dead_fraction, (plain_quality, revived_quality)
    assert revived_quality.fvu < plain_quality.fvu
    transcoder = revived.transcoders[1]
    assert transcoder.W_skip is not None and transcoder.W_skip.abs().sum() > 0


GROUP_CONFIG = TranscoderTrainConfig(
    layers=[0, 1, 2, 3],
    group_size=3,
    d_feat=32,
    k=4,
    n_tokens=8_000,
    batch_tokens=256,
    buffer_tokens=2_000,
    passes_per_buffer=2,
    batch_windows=16,
    lr=3e-3,
    checkpoint_every_steps=5,
)


def train_groups(subject, out, config=GROUP_CONFIG, heldout_seed=1, **options):
    return train_in_groups(
        random_windows(64), random_windows(8, seed=heldout_seed), subject, config, 500, out, **options
    )


def spy_on_trainer(monkeypatch, calls: list, stop_at_checkpoint: int | None = None):
    """Record each group the trainer is called for (layers, resumed at step); optionally die at a checkpoint."""

    def spied(subject, windows, config, on_step, on_checkpoint, resume):
        calls.append((config.layers, resume["position"]["step"] if resume else None))
        checkpoints = []

        def checkpoint(state):
            on_checkpoint(state)
            checkpoints.append(state)
            if len(checkpoints) == stop_at_checkpoint:
                raise KeyboardInterrupt

        return train_transcoders(subject, windows, config, on_step, checkpoint, resume)

    monkeypatch.setattr(groups, "train_transcoders", spied)


def same_weights(a: TranscoderSet, b: TranscoderSet) -> bool:
    return a.layers == b.layers and all(
        torch.equal(getattr(a[layer], name), getattr(b[layer], name))
        for layer in a.layers
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip")
    )


@pytest.fixture(scope="module")
def grouped(tiny_subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("groups") / "set"
    return train_groups(tiny_subject, out), out


def test_groups_merge_into_one_set_and_a_rerun_trains_nothing(tiny_subject, grouped, monkeypatch):
    result, out = grouped
    assert result.groups == [[0, 1, 2], [3]] and result.trained_now == [0, 1] and result.finished == 2
    loaded = open_transcoders(str(out))
    assert loaded.layers == [0, 1, 2, 3] and same_weights(loaded, result.transcoders)
    assert {p.name for p in out.iterdir()} == {
        "plan.json",
        "config.yaml",
        "autolabel.json",
        "history.json",
        *(f"layer_{layer}.safetensors" for layer in range(4)),
    }
    assert sorted(result.quality) == [0, 1, 2, 3] and all(0 < q.fvu < 1 for q in result.quality.values())
    assert sorted(loaded.metadata["heldout"]) == ["0", "1", "2", "3"]
    assert {entry["group"] for entry in json.loads((out / "history.json").read_text())} == {0, 1}
    # The group of layer 3 is the trainer's own run for that layer (saved in fp16).
    alone = train_transcoders(tiny_subject, random_windows(64), GROUP_CONFIG.model_copy(update={"layers": [3]}))
    assert torch.equal(alone.transcoders[3].W_dec.half().float(), loaded[3].W_dec)

    calls = []
    spy_on_trainer(monkeypatch, calls)
    again = train_groups(tiny_subject, out)
    assert calls == [] and again.trained_now == [] and again.quality == result.quality
    assert same_weights(again.transcoders, result.transcoders)


def test_interrupted_between_groups_continues_with_the_next(tiny_subject, grouped, tmp_path, monkeypatch):
    out = tmp_path / "set"
    calls = []
    spy_on_trainer(monkeypatch, calls)
    first = train_groups(tiny_subject, out, max_groups=1)
    assert first.transcoders is None and first.finished == 1 and sorted(first.quality) == [0, 1, 2]
    assert not (out / "config.yaml").exists()  # not loadable while groups are left
    second = train_groups(tiny_subject, out)
    assert calls == [([0, 1, 2], None), ([3], None)] and second.trained_now == [1]
    assert same_weights(second.transcoders, grouped[0].transcoders)


def test_killed_inside_a_group_continues_from_its_checkpoint(tiny_subject, grouped, tmp_path, monkeypatch):
    out = tmp_path / "set"
    calls = []
    spy_on_trainer(monkeypatch, calls, stop_at_checkpoint=2)
    with pytest.raises(KeyboardInterrupt):
        train_groups(tiny_subject, out)
    assert (out / "checkpoints" / "group-00.pt").is_file() and not (out / "groups" / "group-00").exists()
    spy_on_trainer(monkeypatch, calls)
    result = train_groups(tiny_subject, out)
    assert calls == [([0, 1, 2], None), ([0, 1, 2], 10), ([3], None)]
    assert same_weights(result.transcoders, grouped[0].transcoders)
    assert not (out / "checkpoints").exists() and not (out / "groups").exists()


def test_other_settings_or_a_foreign_folder_are_refused(tiny_subject, grouped, tmp_path):
    _, out = grouped
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(AutolabelError, match=r"other settings \(train.d_feat: 32 there, 64 now\)"):
        train_groups(tiny_subject, out, GROUP_CONFIG.model_copy(update={"d_feat": 64}))
    with pytest.raises(AutolabelError, match="train.group_size: 3 there, 2 now"):
        train_groups(tiny_subject, out, GROUP_CONFIG.model_copy(update={"group_size": 2}))
    with pytest.raises(AutolabelError, match="heldout_windows: "):
        train_groups(tiny_subject, out, heldout_seed=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("model_name: x\n")
    with pytest.raises(AutolabelError, match="not empty and has no plan.json"):
        train_groups(tiny_subject, tmp_path / "old")
    with pytest.raises(AutolabelError, match="has layers 0-3, not 4"):
        train_groups(tiny_subject, tmp_path / "new", GROUP_CONFIG.model_copy(update={"layers": [2, 4]}))
