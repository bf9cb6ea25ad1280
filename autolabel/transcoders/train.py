"""`autolabel transcoder train`: per-layer TopK (or JumpReLU) transcoders on the subject model's
own (MLP input, MLP output) pairs.

Activations stream from early-exit forward passes into a shuffled buffer; each
layer trains in a normalised space (inputs and outputs scaled to unit mean
square per dimension) that is folded back into the weights when saving, so the
saved transcoder reads and writes the model's own activations. Decoder rows are
kept at unit norm. Dead features are revived two ways: an auxiliary loss asks
the dead ones to explain the residual error (AuxK, as in Gao et al. 2024), and,
early in training, features dead for too long are re-initialised on the tokens
the transcoder explains worst (resampling). An optional linear skip path
(x @ W_skip) takes the part of the MLP that is linear in its input, so features
spend their capacity on the rest.

A run can stop and continue: a checkpoint holds the whole training state (weights,
Adam moments, dead-feature counters, generator states and the position in the
data), and a run resumed from it continues exactly as if it had never stopped.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from autolabel.config import TranscoderTrainConfig
from autolabel.corpus.windows import Window
from autolabel.models import SubjectModel
from autolabel.transcoders.activations import activation_pairs
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


class _Trainee(nn.Module):
    """One layer's transcoder in normalised space, with its training-only state."""

    def __init__(self, layer: int, d_model: int, config: TranscoderTrainConfig, generator: torch.Generator):
        super().__init__()
        self.layer, self.config = layer, config
        W_dec = torch.randn(config.d_feat, d_model, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [d_feat, d_model], unit rows
        # Small encoder at start: k random unit directions at full size would add more
        # variance than the target has (an initial FVU of 2-3 instead of about 1).
        self.W_enc = nn.Parameter(0.1 * W_dec.T.clone())  # [d_model, d_feat]
        self.b_enc = nn.Parameter(torch.zeros(config.d_feat))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.log_threshold = nn.Parameter(torch.full((config.d_feat,), math.log(config.jumprelu_init_threshold)))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model)) if config.skip else None  # [d_in, d_out]
        # Buffers, so a checkpoint's state_dict carries them.
        self.register_buffer("tokens_since_fired", torch.zeros(config.d_feat, dtype=torch.long))
        self.register_buffer("x_mean", torch.zeros(d_model))  # of the normalised inputs, set by calibrate
        self.x_scale = self.y_scale = 1.0

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set the normalisation from a buffer of raw activations, and centre the encoder on the data.

        Mid-layer MLP inputs carry a large shared mean (a third of their energy at
        SmolLM2's layer 15), so each feature's bias starts at minus its response to
        the mean, and resampled features are centred the same way. Without this,
        resampled features at layer 15 died again (38.7% dead against 3.3% with it).
        """
        self.x_scale = float(x.float().pow(2).mean().sqrt())
        self.y_scale = float(y.float().pow(2).mean().sqrt())
        self.x_mean = x.float().mean(0) / self.x_scale
        self.b_dec.copy_(y.float().mean(0) / self.y_scale)
        self.b_enc.copy_(-(self.x_mean @ self.W_enc))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [batch, d_model] -> pre-activations, activations [batch, d_feat], prediction [batch, d_model]."""
        pre = x @ self.W_enc + self.b_enc
        if self.config.activation == "topk":
            values, indices = pre.topk(self.config.k, dim=-1)
            acts = torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
        else:
            acts = _JumpReLU.apply(pre, self.log_threshold.exp(), self.config.jumprelu_bandwidth)
        # A dense product: on the CPU it beats gathering the k active decoder rows (2-3x at k 32-64),
        # whose backward is a slow scatter-add.
        prediction = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            prediction = prediction + x @ self.W_skip
        return pre, acts, prediction

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """x, y [batch, d_model] in normalised space -> loss, metrics."""
        pre, acts, prediction = self(x)
        active = acts > 0
        residual = y - prediction
        fvu = residual.pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        loss = fvu
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired[active.any(0)] = 0
        dead = self.tokens_since_fired > self.config.dead_after_tokens
        if self.config.activation == "topk" and dead.any():
            k_aux = min(self.config.aux_k, int(dead.sum()))
            aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
            aux_acts = torch.zeros_like(pre).scatter_(-1, aux_indices, torch.relu(aux_values))
            aux_prediction = aux_acts @ self.W_dec
            target = residual.detach()
            aux_fvu = (target - aux_prediction).pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-8)
            loss = loss + self.config.aux_coef * aux_fvu
        if self.config.activation == "jumprelu":
            l0_proxy = _StepL0.apply(pre, self.log_threshold.exp(), self.config.jumprelu_bandwidth)
            loss = loss + self.config.l0_coef * l0_proxy.sum(-1).mean()
        metrics = {"fvu": fvu.item(), "l0": active.float().sum(-1).mean().item(), "dead": dead.float().mean().item()}
        return loss, metrics

    @torch.no_grad()
    def resample_dead(
        self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Adam, generator: torch.Generator
    ) -> int:
        """Point each dead feature at one badly explained token of the batch; returns how many.

        Tokens are drawn with probability proportional to their squared error. The
        decoder row becomes that token's residual direction, and the encoder column
        (centred like the others) is scaled so the token's pre-activation matches a
        typical token's largest activation, which puts the feature back into the
        TopK competition. Adam's moments for the touched weights are reset so stale
        statistics do not push it straight back out.
        """
        dead = (self.tokens_since_fired > self.config.dead_after_tokens).nonzero().squeeze(-1)  # [n_dead]
        if len(dead) == 0:
            return 0
        _, acts, prediction = self(x)
        residual = y - prediction  # [batch, d_model]
        error = residual.pow(2).sum(-1)
        rows = torch.multinomial(error / error.sum(), len(dead), replacement=len(dead) > len(x), generator=generator)
        directions = residual[rows] / residual[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        typical = acts.max(-1).values.mean().clamp_min(1e-3)
        inputs = x[rows] - self.x_mean  # [n_dead, d_model]
        self.W_dec[dead] = directions
        self.W_enc[:, dead] = (inputs / inputs.pow(2).sum(-1, keepdim=True).clamp_min(1e-8) * typical).T
        self.b_enc[dead] = -(self.x_mean @ self.W_enc[:, dead])
        alive = torch.ones(self.config.d_feat, dtype=torch.bool)
        alive[dead] = False
        for parameter, axis in ((self.W_dec, 0), (self.W_enc, 1), (self.b_enc, 0)):
            state = optimizer.state.get(parameter, {})
            if "exp_avg" in state:
                state["exp_avg"].index_fill_(axis, dead, 0.0)
                # The alive features' mean second moment, not zero: a zero would make the next
                # Adam step a full-size sign step that knocks the new direction straight out.
                typical_sq = state["exp_avg_sq"].index_select(axis, alive.nonzero().squeeze(-1)).mean()
                state["exp_avg_sq"].index_fill_(axis, dead, float(typical_sq))
        self.tokens_since_fired[dead] = 0
        return len(dead)

    @torch.no_grad()
    def constrain_decoder(self) -> None:
        """Keep decoder rows at unit norm and drop the gradient that would only change their length."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def export(self) -> Transcoder:
        """Fold the normalisation back in: the result reads and writes raw activations."""
        with torch.no_grad():
            threshold = self.log_threshold.exp().clone() if self.config.activation == "jumprelu" else None
            W_skip = None if self.W_skip is None else self.W_skip * (self.y_scale / self.x_scale)
            return Transcoder(
                self.layer,
                self.W_enc / self.x_scale,
                self.b_enc.clone(),
                self.W_dec * self.y_scale,
                self.b_dec * self.y_scale,
                activation=self.config.activation,
                threshold=threshold,
                k=self.config.k if self.config.activation == "topk" else None,
                W_skip=W_skip,
            )


class _JumpReLU(torch.autograd.Function):
    """pre * (pre > threshold), with a straight-through gradient for the threshold."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).float()
        grad_threshold = -(threshold / ctx.bandwidth) * near * grad
        return grad * (pre > threshold), grad_threshold.sum(0), None


class _StepL0(torch.autograd.Function):
    """The count of active features, with a gradient that moves thresholds."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).float()

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).float()
        return None, (-(1.0 / ctx.bandwidth) * near * grad).sum(0), None


@dataclass
class TrainResult:
    transcoders: TranscoderSet
    tokens: int
    seconds: float
    history: list[dict]
    resampled: dict[int, int]  # layer -> features re-initialised over the whole run


@dataclass
class _Position:
    """Where a run stands: enough, with the weights and generator, to continue it exactly."""

    seen: int = 0  # training tokens so far
    step: int = 0
    seconds: float = 0.0  # spent before this process started
    history: list[dict] = field(default_factory=list)
    resampled: dict[int, int] = field(default_factory=dict)
    buffer_index: int = 0
    windows_before_buffer: int = 0  # windows of the stream consumed by the buffers before this one
    batches_done: int = 0  # training batches of this buffer already stepped on
    generator_at_buffer_start: torch.Tensor | None = None  # to redraw this buffer's shuffles on resume


def _buffers(
    pairs: Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]], layers: list[int], buffer_tokens: int
) -> Iterator[tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], int]]:
    """Fill a buffer of about buffer_tokens tokens per layer, hand it over with the number of forward batches it
    took, repeat (the trainer shuffles)."""
    chunks: dict[int, list] = {layer: [] for layer in layers}
    filled = n_batches = 0
    for batch in pairs:
        for layer, (x, y) in batch.items():
            chunks[layer].append((x.half(), y.half()))  # fp16 halves the buffer's memory
        filled += next(iter(batch.values()))[0].shape[0]
        n_batches += 1
        if filled >= buffer_tokens:
            yield _concat(chunks), n_batches
            chunks, filled, n_batches = {layer: [] for layer in layers}, 0, 0
    if filled:
        yield _concat(chunks), n_batches


def _concat(chunks: dict[int, list]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {
        layer: (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])) for layer, parts in chunks.items()
    }


def _buffer_batches_from(
    buffer: dict[int, tuple[torch.Tensor, torch.Tensor]],
    config: TranscoderTrainConfig,
    generator: torch.Generator,
    at: _Position,
) -> list[dict[int, torch.Tensor]]:
    """The batches of `buffer` still to train: all of a fresh buffer (its shuffles drawn now, the generator's
    state before them saved), or, resumed inside it, its shuffles redrawn from that saved state with the
    generator then put back where the checkpoint left it, less the batches already done."""
    if at.batches_done == 0:
        at.generator_at_buffer_start = generator.get_state()
        return _buffer_batches(buffer, config, generator)
    current = generator.get_state()
    generator.set_state(at.generator_at_buffer_start)
    batches = _buffer_batches(buffer, config, generator)
    generator.set_state(current)
    return batches[at.batches_done :]


def _train_batch(
    buffer: dict[int, tuple[torch.Tensor, torch.Tensor]],
    rows: dict[int, torch.Tensor],
    trainees: dict[int, _Trainee],
    optimizers: dict[int, torch.optim.Optimizer],
    config: TranscoderTrainConfig,
    generator: torch.Generator,
    at: _Position,
) -> dict[int, dict[str, float]]:
    """One optimizer step per layer on the buffer's `rows`, dead features resampled when due; advances `at`.
    The learning rate decays linearly over the last fifth of training, which settles the weights."""
    lr = config.lr * min(1.0, (config.n_tokens - at.seen) / (0.2 * config.n_tokens))
    metrics = {}
    for layer, (x, y) in buffer.items():
        xb, yb, metrics[layer] = _step(trainees[layer], optimizers[layer], x[rows[layer]], y[rows[layer]], lr)
        if _resample_now(config, at.step + 1, at.seen + config.batch_tokens):
            at.resampled[layer] = at.resampled.get(layer, 0) + trainees[layer].resample_dead(
                xb, yb, optimizers[layer], generator
            )
    at.seen += config.batch_tokens
    at.step += 1
    at.batches_done += 1
    return metrics


def train_transcoders(
    subject: SubjectModel,
    windows: list[Window],
    config: TranscoderTrainConfig,
    on_step: Callable[[int, dict[int, dict[str, float]]], None] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> TrainResult:
    """Train one transcoder per configured layer on `windows` for config.n_tokens tokens (epochs as needed).

    Every config.checkpoint_every_steps steps, on_checkpoint gets the whole training state (a dict of tensors and
    plain values, for torch.save). Passed back as `resume`, it continues the run where it stood, to the same
    weights as an uninterrupted run: the buffer it was in is refilled from the same windows, its shuffles are
    redrawn from the saved generator state, and the batches already done are skipped.
    """
    if not windows:
        raise ValueError("train_transcoders needs at least one window")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    trainees = {layer: _Trainee(layer, subject.d_model, config, generator) for layer in config.layers}
    optimizers = {
        layer: torch.optim.Adam(t.parameters(), lr=config.lr, betas=(0.9, 0.999)) for layer, t in trainees.items()
    }
    at = _Position() if resume is None else _restore(resume, config, trainees, optimizers, generator)
    started = time.perf_counter() - at.seconds
    stream = itertools.islice(_window_stream(windows, config.seed), at.windows_before_buffer, None)
    pairs = activation_pairs(
        subject, stream, config.layers, config.input_hook, config.output_hook, config.batch_windows
    )
    # A run resumed from its last step has nothing left to do (and no buffer to fill).
    buffers = _buffers(pairs, config.layers, config.buffer_tokens) if at.seen < config.n_tokens else iter(())
    for buffer, n_batches in buffers:
        if at.buffer_index == 0 and at.batches_done == 0:
            for layer, (x, y) in buffer.items():
                trainees[layer].calibrate(x, y)
        for rows in _buffer_batches_from(buffer, config, generator, at):
            metrics = _train_batch(buffer, rows, trainees, optimizers, config, generator, at)
            if on_step:
                on_step(config.batch_tokens, metrics)
            if at.step % 25 == 0:
                at.history.append(
                    {"step": at.step, "tokens": at.seen, **{f"fvu_{k}": v["fvu"] for k, v in metrics.items()}}
                )
            if on_checkpoint and at.step % config.checkpoint_every_steps == 0:
                at.seconds = time.perf_counter() - started
                on_checkpoint(_state(config, trainees, optimizers, generator, at))
            if at.seen >= config.n_tokens:
                break
        if at.seen >= config.n_tokens:
            break
        at.buffer_index += 1
        at.windows_before_buffer += n_batches * config.batch_windows
        at.batches_done = 0
    return TrainResult(
        _export(trainees, config, subject.model_id, at.seen, at.step),
        at.seen,
        time.perf_counter() - started,
        at.history,
        at.resampled,
    )


def _state(
    config: TranscoderTrainConfig,
    trainees: dict[int, _Trainee],
    optimizers: dict[int, torch.optim.Adam],
    generator: torch.Generator,
    at: _Position,
) -> dict:
    """A copy (training goes on mutating the originals) of everything a resumed run needs."""
    return copy.deepcopy(
        {
            "config": _resume_settings(config),
            "trainees": {
                layer: {"weights": t.state_dict(), "x_scale": t.x_scale, "y_scale": t.y_scale}
                for layer, t in trainees.items()
            },
            "optimizers": {layer: optimizer.state_dict() for layer, optimizer in optimizers.items()},
            "generator": generator.get_state(),
            "position": asdict(at),
        }
    )


def _restore(
    state: dict,
    config: TranscoderTrainConfig,
    trainees: dict[int, _Trainee],
    optimizers: dict[int, torch.optim.Adam],
    generator: torch.Generator,
) -> _Position:
    if state["config"] != _resume_settings(config):
        raise ValueError("the checkpoint was made with other training settings; resume it with the same ones")
    for layer, trainee in trainees.items():
        saved = state["trainees"][layer]
        trainee.load_state_dict(saved["weights"])
        trainee.x_scale, trainee.y_scale = saved["x_scale"], saved["y_scale"]
        optimizers[layer].load_state_dict(state["optimizers"][layer])
    generator.set_state(state["generator"])
    return _Position(**copy.deepcopy(state["position"]))


def _resume_settings(config: TranscoderTrainConfig) -> dict:
    """The settings a checkpoint must agree with to be resumed (how often to checkpoint may change)."""
    return config.model_dump(mode="json", exclude={"checkpoint_every_steps"})


def _window_stream(windows: list[Window], seed: int) -> Iterator[Window]:
    """The windows over and over, each epoch in a new order."""
    rng = random.Random(seed)
    while True:
        order = windows[:]
        rng.shuffle(order)
        yield from order


def _buffer_batches(
    buffer: dict[int, tuple[torch.Tensor, torch.Tensor]], config: TranscoderTrainConfig, generator: torch.Generator
) -> list[dict[int, torch.Tensor]]:
    """Each training batch of a buffer as the rows [batch_tokens] it takes per layer.

    A buffer is reused for several passes, each in a new order: the forward pass that filled it costs far more
    than a training step. Every pass's order is drawn before the first batch.
    """
    n = next(iter(buffer.values()))[0].shape[0]
    orders = {
        layer: [torch.randperm(n, generator=generator) for _ in range(config.passes_per_buffer)] for layer in buffer
    }
    return [
        {layer: orders[layer][epoch][begin : begin + config.batch_tokens] for layer in buffer}
        for epoch in range(config.passes_per_buffer)
        for begin in range(0, n - config.batch_tokens + 1, config.batch_tokens)
    ]


def _step(
    trainee: _Trainee, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One optimizer step on a batch of raw pairs [batch, d] (fp16): (normalised x, normalised y, metrics)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    xb = x.float() / trainee.x_scale
    yb = y.float() / trainee.y_scale
    loss, metrics = trainee.loss(xb, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainee.constrain_decoder()
    optimizer.step()
    trainee.constrain_decoder()
    return xb, yb, metrics


def _resample_now(config: TranscoderTrainConfig, step: int, seen: int) -> bool:
    # Only early on: late resets would leave features no time to learn, and the LR decay no time to settle.
    every = config.resample_every_steps
    return bool(every) and step % every == 0 and seen <= config.resample_until * config.n_tokens


def _export(
    trainees: dict[int, _Trainee], config: TranscoderTrainConfig, model_id: str, tokens: int, steps: int
) -> TranscoderSet:
    return TranscoderSet(
        {layer: t.export() for layer, t in trainees.items()},
        input_hook=config.input_hook,
        output_hook=config.output_hook,
        source_format="autolabel",
        model_name=model_id,
        metadata={"train_config": config.model_dump(mode="json"), "tokens": tokens, "steps": steps},
    )
