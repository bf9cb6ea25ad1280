"""The transcoder stage: resolve, train or check the run's transcoders against its corpus.

Training and checking read the same stored corpus, split by document: every
n-th document (by a stable hash) is held out, so quality is always measured on
tokens the trainer never saw.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from autolabel.config import RunConfig
from autolabel.corpus import build_corpus, iter_windows
from autolabel.corpus.windows import Window, split_heldout
from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel
from autolabel.progress import progress_bar
from autolabel.store import Store
from autolabel.transcoders.check import LayerQuality, check_transcoders, measure_quality
from autolabel.transcoders.formats import load_transcoders, save_circuit_tracer
from autolabel.transcoders.train import train_transcoders
from autolabel.transcoders.transcoder import TranscoderSet

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "data" / "transcoders"
EMBEDDED = {"embedded:smollm2": EMBEDDED_DIR / "smollm2-135m-instruct"}


def corpus_windows(store: Store, subject: SubjectModel, config: RunConfig, show_progress: bool,
                   for_training: bool = False) -> tuple[list[Window], list[Window]]:
    """(train, held-out) windows of the run's corpus, or of the training corpus when one is configured."""
    corpus = config.transcoder.train.corpus if for_training and config.transcoder.train.corpus else config.corpus
    summary = build_corpus(store, corpus, subject, show_progress)
    return split_heldout(list(iter_windows(store, summary.corpus_id)), config.transcoder.train.heldout_every)


def open_transcoders(source: str, fmt: str = "auto") -> TranscoderSet:
    if source.startswith("embedded:"):
        if source not in EMBEDDED:
            raise AutolabelError(f"unknown embedded transcoder {source!r}; known: {', '.join(EMBEDDED)}")
        if not (EMBEDDED[source] / "config.yaml").is_file():
            raise AutolabelError(f"the embedded transcoder files are missing from {EMBEDDED[source]}; "
                                 f"reinstall autolabel, or rebuild them with `autolabel transcoder train --out {EMBEDDED[source]}`")
        return load_transcoders(EMBEDDED[source], "circuit_tracer")
    return load_transcoders(source, fmt)


def check_stage(store: Store, subject: SubjectModel, config: RunConfig,
                show_progress: bool = True) -> tuple[TranscoderSet, str, dict[int, LayerQuality]]:
    """Open the configured transcoders and refuse them unless they reconstruct this model: (set, id, quality)."""
    tset = open_transcoders(config.transcoder.source, config.transcoder.format)
    corpus_id = build_corpus(store, config.corpus, subject, show_progress).corpus_id
    every = config.transcoder.train.heldout_every
    tid, quality = check_transcoders(store, subject, tset, _check_windows(store, corpus_id, every),
                                     config.transcoder.check_tokens, config.transcoder.max_fvu, corpus_id,
                                     {"heldout_every": every})
    return tset, tid, quality


def _check_windows(store: Store, corpus_id: str, heldout_every: int) -> Iterator[Window]:
    """The held-out windows, read only if the check measures (a stored check needs none). A corpus too small
    to hold out a document is still a fair test of a transcoder trained elsewhere: then all of them."""
    train, heldout = split_heldout(list(iter_windows(store, corpus_id)), heldout_every)
    yield from heldout or train


def train_stage(train: list[Window], heldout: list[Window], subject: SubjectModel, config: RunConfig,
                out_dir: Path, show_progress: bool = True) -> tuple[TranscoderSet, dict[int, LayerQuality]]:
    """Train, checkpoint, save in the circuit-tracer layout, measure on held-out tokens.

    Takes windows rather than the store, so the store is not held open (and locked
    against `autolabel query`) for the length of training.
    """
    train_config = config.transcoder.train
    if not train:
        raise AutolabelError("the corpus has no training windows; build a larger corpus")
    checkpoint_dir = out_dir / "checkpoint"
    with progress_bar("tok", disable=not show_progress) as bar:
        task = bar.add_task("training transcoders", total=train_config.n_tokens)

        def on_step(n_tokens: int, metrics: dict[int, dict[str, float]]) -> None:
            summary = "  ".join(f"L{layer} fvu {m['fvu']:.3f} l0 {m['l0']:.0f} dead {m['dead']:.0%}"
                                for layer, m in metrics.items())
            bar.update(task, advance=n_tokens, description=f"training  {summary}")

        dtype = getattr(torch, train_config.save_dtype)

        def on_checkpoint(tset: TranscoderSet) -> None:
            save_circuit_tracer(tset, checkpoint_dir, subject.model_id, dtype)

        result = train_transcoders(subject, train, train_config, on_step, on_checkpoint)
    quality = measure_quality(subject, result.transcoders, heldout, config.transcoder.check_tokens)
    result.transcoders.metadata.update({
        "model_id": subject.model_id, "seconds": round(result.seconds, 1),
        "resampled_features": {str(k): n for k, n in result.resampled.items()},
        "heldout": {str(k): {"fvu": q.fvu, "l0": q.l0, "dead_fraction": q.dead_fraction, "n_tokens": q.n_tokens}
                    for k, q in quality.items()},
    })
    save_circuit_tracer(result.transcoders, out_dir, subject.model_id, dtype)
    (out_dir / "history.json").write_text(json.dumps(result.history), encoding="utf-8")
    return result.transcoders, quality
