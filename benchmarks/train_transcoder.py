"""Trainer throughput next to the bare early-exit forward pass, and held-out quality.

    .venv/bin/python benchmarks/train_transcoder.py [--store autolabel.duckdb] [--tokens 100000]

Both are measured in this one run on the same windows of the default corpus
(built first if the store has none): (a) the forward pass stopped after the
deepest trained layer, capturing the MLP input and output, and (b) the trainer
(forward passes + buffer + optimisation). The buffer is sized so that, as with the
defaults, each forwarded token is trained on `passes_per_buffer` times; the table
gives both trained tokens/s and distinct (forwarded) tokens/s. Peak RSS is the
process's high-water mark.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import peak_rss_mb

from autolabel.config import RunConfig
from autolabel.models import load_subject_model
from autolabel.store import Store
from autolabel.transcoders.activations import activation_pairs
from autolabel.transcoders.check import measure_quality
from autolabel.transcoders.stage import corpus_windows
from autolabel.transcoders.train import train_transcoders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="autolabel.duckdb")
    parser.add_argument("--tokens", type=int, default=260_000, help="training tokens")
    parser.add_argument("--forward-tokens", type=int, default=20_000, help="tokens for the bare forward pass")
    args = parser.parse_args()

    config = RunConfig(store=args.store)
    train_config = config.transcoder.train
    train_config.n_tokens = args.tokens
    train_config.buffer_tokens = max(args.tokens // train_config.passes_per_buffer, train_config.batch_tokens)
    subject = load_subject_model(config.model.source, config.cache_dir)
    with Store(config.store) as store:
        train, heldout = corpus_windows(store, subject, config, show_progress=True)

    started, seen = time.perf_counter(), 0
    for pairs in activation_pairs(
        subject,
        train,
        train_config.layers,
        train_config.input_hook,
        train_config.output_hook,
        train_config.batch_windows,
    ):
        seen += next(iter(pairs.values()))[0].shape[0]
        if seen >= args.forward_tokens:
            break
    forward_rate = seen / (time.perf_counter() - started)
    rss_forward = peak_rss_mb()

    result = train_transcoders(subject, train, train_config)
    train_rate = result.tokens / result.seconds
    distinct_rate = train_rate / train_config.passes_per_buffer
    quality = measure_quality(subject, result.transcoders, heldout, config.transcoder.check_tokens)

    print(
        f"\nmodel {subject.model_id}, layers {train_config.layers}, d_feat {train_config.d_feat}, "
        f"k {train_config.k}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'what':<44}{'tok/s':>10}{'ratio':>8}{'peak RSS MB':>13}")
    print(f"{'(a) early-exit forward, capture in+out':<44}{forward_rate:>10.0f}{1.0:>8.2f}{rss_forward:>13.0f}")
    print(
        f"{'(b) trainer, distinct tokens':<44}{distinct_rate:>10.0f}{distinct_rate / forward_rate:>8.2f}"
        f"{peak_rss_mb():>13.0f}"
    )
    print(f"{'(b) trainer, trained tokens (x passes)':<44}{train_rate:>10.0f}{train_rate / forward_rate:>8.2f}")
    print(f"\n{'layer':<8}{'FVU':>8}{'L0':>8}{'dead':>8}{'tokens':>9}   (held-out)")
    for q in sorted(quality.values(), key=lambda q: q.layer):
        print(f"{q.layer:<8}{q.fvu:>8.3f}{q.l0:>8.1f}{q.dead_fraction:>8.1%}{q.n_tokens:>9}")


if __name__ == "__main__":
    main()
