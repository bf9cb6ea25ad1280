"""Interventions' time and peak memory next to a plain forward pass over the same prompts.

    .venv/bin/python benchmarks/intervene.py [--features 24] [--prompts 4] [--max-new-tokens 16] [--threads N]

Setup (not timed): the news corpus of benchmarks/collect.py (about 32k tokens of BBC News) collected
with the embedded transcoders (SmolLM2-135M-Instruct, layers 6/15/24), then `--features` features
picked evenly over the layers (active, with enough top and silent examples; a fixed pseudo-random pick).
Each feature gets `--prompts` prompts where it fires and as many silent ones. Every row runs in its own
process, so its peak RSS is its own; seconds exclude loading the model:

  (c) the collection that made the run (its peak RSS is the one interventions are held to);
  (a) a plain forward pass over the prompts, one row each, batched as the interventions are;
  (a2) greedy continuations of the prompts, clean only;
  (b) `intervene_stage`: every prompt clean plus ablation plus 3 steering strengths, the continuations,
      KL and token changes, and the rows written to the store (no judge: no LLM calls).

On a machine whose cores other jobs share, pass --threads 1: torch's threads then never wait for each
other at the end of every small operation, which is much of what decoding a token is (here, under a load
average of 7 to 9, three features' interventions took 21 s with 1 thread and 125 to 166 s with 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from collect import EMBEDDED_SET, corpus_config, prepare
from common import peak_rss_mb

from autolabel.config import CollectConfig, InterveneConfig, RunConfig
from autolabel.models import load_subject_model
from autolabel.store import Store

LAYERS = [6, 15, 24]


def pick_features(store: Store, run_id: str, n: int, prompts: int) -> list[tuple[int, int]]:
    """n features spread evenly over the layers, each with `prompts` top and silent examples."""
    keys = []
    for i, layer in enumerate(LAYERS):
        want = n // len(LAYERS) + (i < n % len(LAYERS))
        keys += store.con.execute(
            "SELECT layer, feature FROM (SELECT f.layer, f.feature, hash(f.layer, f.feature) AS h FROM features f "
            "JOIN examples e ON e.run_id = f.run_id AND e.layer = f.layer AND e.feature = f.feature "
            "WHERE f.run_id = ? AND f.layer = ? AND f.status = 'active' GROUP BY ALL "
            "HAVING count(*) FILTER (e.kind = 'top') >= ? AND count(*) FILTER (e.kind = 'random') >= ?) "
            "ORDER BY h LIMIT ?",
            [run_id, layer, prompts, prompts, want],
        ).fetchall()
    return keys


def worker(kind: str, workdir: Path, args: argparse.Namespace) -> dict:
    from autolabel.collect import collect_stage
    from autolabel.corpus import corpus_id_for
    from autolabel.intervene import intervene_stage
    from autolabel.intervene.run import left_pad
    from autolabel.intervene.targets import select_prompts
    from autolabel.transcoders.formats import load_transcoders

    if args.threads:
        torch.set_num_threads(args.threads)
    config = RunConfig(intervene=InterveneConfig(prompts=args.prompts, max_new_tokens=args.max_new_tokens, judge=False))
    subject = load_subject_model(config.model.source, config.cache_dir, config.model.dtype)
    tset = load_transcoders(EMBEDDED_SET, "circuit_tracer", layers=LAYERS)
    with Store(workdir / "bench.duckdb") as store:
        if kind == "collect":
            corpus_id = corpus_id_for(corpus_config(workdir, 1), subject.model_id)
            run_id = store.start_run("{}", subject.model_id)
            started = time.perf_counter()
            collect_stage(store, subject, tset, corpus_id, "tc-bench", CollectConfig(), run_id, show_progress=False)
            return {"run_id": run_id, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
        keys = [tuple(k) for k in json.loads(args.keys)]
        prompts = [p for key in keys for p in select_prompts(store, args.run, key, args.prompts, False)]
        ordered = sorted(prompts, key=lambda p: len(p.tokens))
        size = config.intervene.batch_rows  # prompts per plain batch: as many rows as an intervention batch
        batches = [
            left_pad([p.tokens for p in ordered[i : i + size]], subject.pad_id) for i in range(0, len(ordered), size)
        ]
        store.con.execute("DELETE FROM interventions WHERE run_id = ?", [args.run])
        store.con.execute("DELETE FROM shards WHERE run_id = ? AND stage = 'intervene'", [args.run])
        with torch.inference_mode():
            subject.model(*batches[0], logits_to_keep=1)  # warm-up
        started = time.perf_counter()
        if kind == "intervene":
            summary = intervene_stage(store, subject, tset, args.run, keys, config, show_progress=False)
            rows = store.one("SELECT count(*) FROM interventions WHERE run_id = ?", [args.run])[0]
            assert summary.computed == len(keys) and rows == len(prompts) * (1 + len(config.intervene.multiples))
        else:
            with torch.inference_mode():
                for ids, mask in batches:
                    if kind == "forward":
                        subject.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
                    else:
                        subject.model.generate(
                            input_ids=ids,
                            attention_mask=mask,
                            max_new_tokens=args.max_new_tokens,
                            do_sample=False,
                            temperature=None,
                            top_p=None,
                            top_k=None,
                            repetition_penalty=config.intervene.repetition_penalty,
                            pad_token_id=subject.pad_id,
                        )
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "prompts": len(prompts),
        "tokens": sum(len(p.tokens) for p in prompts),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def run_worker(kind: str, args: argparse.Namespace, **extra: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--workdir",
        str(args.workdir),
        "--prompts",
        str(args.prompts),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--threads",
        str(args.threads),
    ]
    for name, value in extra.items():
        command += [f"--{name}", value]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=4, help="prompts of each kind per feature")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32_768, help="tokens of the collected news corpus")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every row (0: torch's default)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autolabel-bench"))
    parser.add_argument("--worker", choices=["collect", "forward", "generate", "intervene"], help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args)))
        return

    prepare(args.workdir, args.tokens)
    collected = run_worker("collect", args)
    with Store(args.workdir / "bench.duckdb", read_only=True) as store:
        keys = pick_features(store, collected["run_id"], args.features, args.prompts)
    if len(keys) < args.features:
        raise SystemExit(f"only {len(keys)} features have {args.prompts} top and silent examples; ask for fewer")
    extra = {"run": collected["run_id"], "keys": json.dumps(keys)}
    rows = {
        "(a) plain forward pass, one row per prompt": run_worker("forward", args, **extra),
        f"(a2) clean greedy continuations, {args.max_new_tokens} tokens": run_worker("generate", args, **extra),
        "(b) intervene: clean + ablation + 3 steering strengths": run_worker("intervene", args, **extra),
    }
    config = RunConfig()
    base = rows["(a) plain forward pass, one row per prompt"]
    print(
        f"\nSmolLM2-135M-Instruct ({config.model.dtype}), embedded transcoders (layers 6/15/24), {len(keys)} features "
        f"x {base['prompts'] // len(keys)} prompts ({base['tokens']:,} prompt tokens), multiples "
        f"{config.intervene.multiples}, torch threads {base['threads']}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'what':<56}{'seconds':>9}{'vs (a)':>9}{'peak RSS MB':>13}")
    print(
        f"{'(c) collect the run, ' + str(args.tokens // 1024) + 'k tokens (setup)':<56}{collected['seconds']:>9.1f}"
        f"{'':>9}{collected['peak_rss_mb']:>13.0f}"
    )
    for name, row in rows.items():
        print(f"{name:<56}{row['seconds']:>9.1f}{row['seconds'] / base['seconds']:>8.1f}x{row['peak_rss_mb']:>13.0f}")
    ratio = rows["(b) intervene: clean + ablation + 3 steering strengths"]["peak_rss_mb"] / collected["peak_rss_mb"]
    print(f"\npeak RSS of (b) / (c): {ratio:.2f}")


if __name__ == "__main__":
    main()
