"""Collection throughput and peak memory next to the bare early-exit forward pass, and delphi's caching.

    .venv/bin/python benchmarks/collect.py [--tokens 32768] [--delphi-python /work/venvs/delphi/bin/python] [--bf16]

All rows are measured in this one run, on the same plain-text windows (BBC News,
256 tokens each, SmolLM2-135M-Instruct, the embedded transcoders), each row in a
fresh process so that its peak RSS is its own:

  (a) the bare forward pass, stopped after the deepest hooked layer, capturing the transcoders' inputs;
  (b) `collect` with the default transcoders (layers 6, 15, 24): forward, encode, every statistic,
      the examples and the final tables in the store;
  (b4) the same over 4x the tokens: peak RSS must stay flat;
  (c) `collect` with one layer's transcoder only (24, then 6), and delphi's LatentCache on the same
      layer and windows (full forward, every nonzero activation kept), when --delphi-python names
      a venv that has eai-delphi (see benchmarks/delphi_cache.py). autolabel stops the forward pass
      after the hooked layer, so its lead grows the earlier the layer.
  (d) with --bf16: (a), (b) and the layer-24 pair again with the subject model in bfloat16
      (`model.dtype: bfloat16`; the transcoders encode with bfloat16 weights). delphi's CLI loads
      the model in bfloat16 on a GPU and in the checkpoint's dtype (float32 here) otherwise, so
      both of its dtypes are shown. The transcoders' FVU on these windows under each dtype is
      printed too (and, for the bfloat16 model, with the float32 and the bfloat16 encode): a
      faster dtype is only worth having if the transcoders still fit.

--baseline PATH (a `git worktree` of an earlier commit) also runs the (b) and (d) collections with
that tree's code, interleaved in the same run, then compares the stored tables: float32 must be
bit-identical, and bfloat16 (where the encode changed) gets the share of each feature's top-20
examples the two collections have in common. --quick leaves out (b4) and (c).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import peak_rss_mb

from autolabel.config import CollectConfig, CorpusConfig, RunConfig, SourceConfig
from autolabel.corpus import build_corpus, iter_windows
from autolabel.corpus.sources import load_source
from autolabel.models import load_subject_model
from autolabel.store import Store

CHECK_TOKENS = 8192
EMBEDDED_SET = Path(__file__).resolve().parent.parent / "autolabel" / "data" / "transcoders" / "smollm2-135m-instruct"


def corpus_config(workdir: Path, scale: int) -> CorpusConfig:
    config = CorpusConfig(sources=[SourceConfig(name="file", path=str(workdir / f"news-x{scale}.jsonl"))])
    config.generation.enabled = False
    return config


def prepare(workdir: Path, tokens: int) -> None:
    """Write news-x1.jsonl and news-x4.jsonl (about `tokens` and 4x `tokens`) and build both corpora."""
    config = RunConfig()
    subject = load_subject_model(config.model.source, config.cache_dir)
    documents = load_source(SourceConfig(name="bbc_news"), seed=0)
    workdir.mkdir(parents=True, exist_ok=True)
    with Store(workdir / "bench.duckdb") as store:
        for scale in (1, 4):
            rows, total = [], 0
            for document in documents:
                if total >= scale * tokens:
                    break
                rows.append({"id": document.doc_id, "text": document.text, "category": "news"})
                total += len(subject.tokenizer(document.text)["input_ids"])
            if total < scale * tokens:
                raise SystemExit(f"the news source has only {total} tokens; ask for fewer --tokens")
            (workdir / f"news-x{scale}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            build_corpus(store, corpus_config(workdir, scale), subject, show_progress=False)


def worker(kind: str, workdir: Path, scale: int, layers: list[int], dtype: str) -> dict:
    import autolabel
    from autolabel.collect import collect_stage
    from autolabel.collect.stage import CorpusIndex, capture_batches, plan_shards, shard_windows
    from autolabel.corpus import corpus_id_for
    from autolabel.transcoders.activations import batch_windows, pad_batch
    from autolabel.transcoders.check import measure_quality
    from autolabel.transcoders.formats import load_transcoders

    config = RunConfig()
    subject = load_subject_model(config.model.source, config.cache_dir, dtype)
    tset = load_transcoders(EMBEDDED_SET, "circuit_tracer", layers=layers)
    corpus_id = corpus_id_for(corpus_config(workdir, scale), subject.model_id)
    collect = CollectConfig()
    with Store(workdir / "bench.duckdb") as store:
        index = CorpusIndex.read(store, corpus_id)
        # The same batches collection makes: its shards, longest windows first.
        shards = [
            shard_windows(store, corpus_id, index, first, last)
            for first, last in plan_shards(index.doc_tokens, collect.shard_tokens)
        ]
        windows = [w for shard in shards for w in shard]
        next(capture_batches(subject, tset, windows[: collect.batch_windows], index, collect.batch_windows))  # warm-up
        n_tokens = sum(len(w.token_ids) for w in windows)
        started = time.perf_counter()
        if kind == "fvu":
            quality = measure_quality(subject, tset, windows, CHECK_TOKENS)
            return {layer: q.fvu for layer, q in quality.items()}
        if kind == "fvu-encode":
            return encode_fvu(subject, tset, windows)
        if kind == "forward":
            points = [subject.hook_point(tset.input_hook, layer) for layer in tset.layers]
            for shard in shards:
                for group in batch_windows(shard, collect.batch_windows):
                    subject.capture(*pad_batch(group, subject.pad_id), points)
        else:
            run_id = store.start_run("{}", subject.model_id)
            collect_stage(store, subject, tset, corpus_id, "tc-bench", collect, run_id, show_progress=False)
        seconds = time.perf_counter() - started
    return {
        "tokens": n_tokens,
        "seconds": seconds,
        "tok_per_s": n_tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "run_id": run_id if kind == "collect" else None,
        "code": str(Path(autolabel.__file__).parent.parent),
    }


def encode_fvu(subject, tset, windows) -> dict:
    """{encode: {layer: FVU}} over CHECK_TOKENS tokens with the float32 encode and the collection's encode
    (bfloat16 weights for a bfloat16 model), and the share of (token, feature) activations that fire under
    one but not the other."""
    from autolabel.transcoders.activations import activation_pairs

    sq_err = {name: dict.fromkeys(tset.layers, 0.0) for name in ("float32", "collection")}
    variance, differ, fired, seen = (
        dict.fromkeys(tset.layers, 0.0),
        dict.fromkeys(tset.layers, 0),
        dict.fromkeys(tset.layers, 0),
        0,
    )
    with torch.inference_mode():
        for pairs in activation_pairs(subject, windows, tset.layers, tset.input_hook, tset.output_hook, 16):
            for layer, (x, y) in pairs.items():
                transcoder, y = tset[layer], y.double()
                variance[layer] += float(((y - y.mean(0)) ** 2).sum())  # per batch: both encodes share it
                # x arrives as float32 (exactly the bfloat16 model's values): collection hands over bfloat16
                reference, ours = transcoder.encode(x), transcoder.encode_at_input_precision(x.bfloat16())
                for name, acts in (("float32", reference), ("collection", ours)):
                    sq_err[name][layer] += float(((transcoder.decode(acts, x).double() - y) ** 2).sum())
                differ[layer] += int(((reference > 0) != (ours > 0)).sum())
                fired[layer] += int((reference > 0).sum())
            seen += len(next(iter(pairs.values()))[0])
            if seen >= CHECK_TOKENS:
                break
    result = {name: {layer: sq_err[name][layer] / variance[layer] for layer in tset.layers} for name in sq_err}
    result["fired_differently"] = {layer: differ[layer] / fired[layer] for layer in tset.layers}
    return result


def run_worker(
    kind: str, workdir: Path, scale: int, layers: list[int], dtype: str = "float32", code: Path | None = None
) -> dict:
    """One row in a fresh process; `code`: a tree whose autolabel package it imports instead of this one."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--workdir",
        str(workdir),
        "--scale",
        str(scale),
        "--layers",
        ",".join(map(str, layers)),
        "--dtype",
        dtype,
    ]
    env = dict(os.environ, PYTHONPATH=str(code)) if code else None
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    row = json.loads(out.strip().splitlines()[-1])
    if code and Path(row["code"]).resolve() != code.resolve():
        raise SystemExit(f"the baseline row imported autolabel from {row['code']}, not from {code}")
    return row


def compare_runs(workdir: Path, ours: str, theirs: str) -> dict:
    """Tables of two collections of the same windows: which differ at all, and the mean share of each
    feature's top-20 examples (by window) found in both."""
    with Store(workdir / "bench.duckdb", read_only=True) as store:
        differing = []
        for table in ("features", "role_stats", "category_stats", "examples"):
            diff = store.rows(
                f"SELECT count(*) FROM ((SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ? "
                f"EXCEPT ALL SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ?) UNION ALL "
                f"(SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ? "
                f"EXCEPT ALL SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ?))",
                [ours, theirs, theirs, ours],
            )[0][0]
            if diff:
                differing.append(f"{table} ({diff} rows)")
        ((agreement, n_features),) = store.rows(
            "WITH top AS (SELECT run_id, layer, feature, doc_id, start FROM examples "
            "             WHERE kind = 'top' AND rank < 20 AND run_id IN (?, ?)), "
            "per AS (SELECT a.layer, a.feature, count(b.doc_id) / count(*) AS share FROM top a "
            "        LEFT JOIN top b ON b.run_id = ? AND a.layer = b.layer AND a.feature = b.feature "
            "             AND a.doc_id = b.doc_id AND a.start = b.start "
            "        WHERE a.run_id = ? GROUP BY ALL) "
            "SELECT avg(share), count(*) FROM per",
            [ours, theirs, theirs, ours],
        )
    return {"differing": differing, "top20_agreement": agreement, "features": n_features}


def run_delphi(python: str, workdir: Path, layer: int, dtype: str = "float32") -> dict:
    from autolabel.corpus import corpus_id_for
    from autolabel.models import convert_gguf, embedded_gguf

    config = RunConfig()
    subject = load_subject_model(config.model.source, config.cache_dir)
    with Store(workdir / "bench.duckdb", read_only=True) as store:
        corpus_id = corpus_id_for(corpus_config(workdir, 1), subject.model_id)
        full = [w.token_ids for w in iter_windows(store, corpus_id) if len(w.token_ids) == 256]
    np.save(workdir / "delphi-tokens.npy", np.stack(full).astype(np.int64))
    model_dir = convert_gguf(embedded_gguf("smollm2"), Path(config.cache_dir))
    command = [
        python,
        str(Path(__file__).parent / "delphi_cache.py"),
        "--model-dir",
        str(model_dir),
        "--transcoder-dir",
        str(EMBEDDED_SET),
        "--layer",
        str(layer),
        "--tokens",
        str(workdir / "delphi-tokens.npy"),
        "--batch-size",
        "16",
        "--dtype",
        dtype,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32_768, help="tokens at 1x (4x is measured too)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autolabel-bench"))
    parser.add_argument("--delphi-python", help="python of a venv with eai-delphi installed")
    parser.add_argument("--bf16", action="store_true", help="also measure with the subject model in bfloat16")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a tree (git worktree) of an earlier commit: its collection "
        "rows run beside these and their tables are compared",
    )
    parser.add_argument("--quick", action="store_true", help="leave out the (b4) and (c) rows")
    parser.add_argument("--bf16-only", action="store_true", help="only the bfloat16 rows (implies --bf16)")
    parser.add_argument("--worker", choices=["forward", "collect", "fvu", "fvu-encode"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--layers", default="6,15,24", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.scale, layers, args.dtype)))
        return

    prepare(args.workdir, args.tokens)
    dtypes = ["bfloat16"] if args.bf16_only else ["float32", "bfloat16"] if args.bf16 else ["float32"]
    rows, forward_of = {}, {}  # forward_of: row name -> the bare forward row of its dtype
    for dtype in dtypes:
        tag = "" if dtype == "float32" else ", bf16"
        forward = f"(a) bare forward, stop after layer 24{tag}"
        rows[forward] = run_worker("forward", args.workdir, 1, [6, 15, 24], dtype)
        rows[f"(b) collect, layers 6/15/24{tag}"] = run_worker("collect", args.workdir, 1, [6, 15, 24], dtype)
        if args.baseline:
            rows[f"(b) baseline collect, layers 6/15/24{tag}"] = run_worker(
                "collect", args.workdir, 1, [6, 15, 24], dtype, args.baseline
            )
        if dtype == "float32" and not args.quick:
            rows["(b4) collect, layers 6/15/24, 4x tokens"] = run_worker("collect", args.workdir, 4, [6, 15, 24])
        for layer in [] if args.quick else [24] if tag else [24, 6]:
            rows[f"(c) collect, layer {layer} only{tag}"] = run_worker("collect", args.workdir, 1, [layer], dtype)
            if args.delphi_python:
                rows[f"(c) delphi 0.1.3 LatentCache, layer {layer}{tag}"] = run_delphi(
                    args.delphi_python, args.workdir, layer, dtype
                )
        forward_of.update({name: forward for name in rows if name not in forward_of})
    print(
        f"\nSmolLM2-135M-Instruct, embedded transcoders (d_feat 2048, TopK 64), batches of 16 x 256 tokens, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'what':<48}{'tokens':>9}{'tok/s':>9}{'vs fwd':>8}{'peak RSS MB':>13}")
    for name, row in rows.items():
        print(
            f"{name:<48}{row['tokens']:>9}{row['tok_per_s']:>9.0f}"
            f"{row['tok_per_s'] / rows[forward_of[name]]['tok_per_s']:>8.2f}{row['peak_rss_mb']:>13.0f}"
        )
    print("(vs fwd: against the bare forward pass of the same dtype)\n")
    for what, tag in (("both float32", ""), ("both bf16", ", bf16")):
        ours, theirs = (
            rows.get(f"(c) collect, layer 24 only{tag}"),
            rows.get(f"(c) delphi 0.1.3 LatentCache, layer 24{tag}"),
        )
        if ours and theirs:
            print(
                f"layer 24, {what}: autolabel collect / delphi caching = "
                f"{ours['tok_per_s'] / theirs['tok_per_s']:.2f}x tok/s, "
                f"peak RSS {ours['peak_rss_mb']:.0f} vs {theirs['peak_rss_mb']:.0f} MB"
            )
    if args.baseline:
        for tag in ("" if dtype == "float32" else ", bf16" for dtype in dtypes):
            ours, theirs = rows[f"(b) collect, layers 6/15/24{tag}"], rows[f"(b) baseline collect, layers 6/15/24{tag}"]
            result = compare_runs(args.workdir, ours["run_id"], theirs["run_id"])
            print(
                f"tables{tag or ', float32'} vs baseline: "
                f"{'bit-identical' if not result['differing'] else 'differ in ' + ', '.join(result['differing'])}; "
                f"top-20 examples in common {result['top20_agreement']:.4f} (mean over {result['features']} features)"
            )
    if "bfloat16" in dtypes:
        print("\nFVU of the embedded transcoders on the benchmark's news windows (float32 vs bfloat16 subject model):")
        for dtype in dtypes:
            fvu = run_worker("fvu", args.workdir, 1, [6, 15, 24], dtype)
            print(
                f"  subject model in {dtype:<9}"
                + "".join(f"  layer {layer} {value:.4f}" for layer, value in fvu.items())
            )
        by_encode = run_worker("fvu-encode", args.workdir, 1, [6, 15, 24], "bfloat16")
        for name, values in by_encode.items():
            shown = "{:.2e}" if name == "fired_differently" else "{:.4f}"
            print(
                f"  bfloat16 model, {name:<17}"
                + "".join(f"  layer {layer} " + shown.format(value) for layer, value in values.items())
            )


if __name__ == "__main__":
    main()
