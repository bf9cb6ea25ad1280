"""Report speed and memory on a synthetic 16k-feature run, next to just querying the rows it reads.

    .venv/bin/python benchmarks/report.py [--layers 8] [--features 2048] [--workdir /tmp/autolabel-report-bench]

Builds, in a temp store, a run shaped like a real one: a corpus of chats and
text (random SmolLM2 token ids, every token tagged with a role), `layers` x
`features` features with histograms and role statistics, 50 top examples,
50 quantile samples and 20 random contexts of 32 tokens per live feature,
labels and three scores for most of them, a UMAP map, clusters, groups, audit
findings and a diff. Then each row runs in its own process (so its peak RSS is
its own):

  (a) the baseline: the report's queries (features, role statistics, labels and scores, each layer's
      shown examples with their token roles) drained into memory, nothing rendered;
  (b) the report with the tokenizer only: every page, no output tokens or nearest features;
  (c) the full report: (b) plus output tokens through SmolLM2's unembedding and the 5 nearest
      features by decoder cosine, from a random transcoder set of the same shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from common import peak_rss_mb

from autolabel.config import ROLES, ReportConfig, RunConfig
from autolabel.models import load_subject_model
from autolabel.report import features as page_data
from autolabel.report import summary
from autolabel.report.stage import report_stage
from autolabel.store import Store, now, to_json
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

CORPUS = "bench-corpus"
N_DOCS, DOC_TOKENS, EXAMPLE_TOKENS = 2000, 256, 32
TOP, QUANTILE, RANDOM = 50, 50, 20


def lists(values: np.ndarray, width: int, value_type: pa.DataType) -> pa.ListArray:
    offsets = np.arange(0, values.size + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.ravel(), type=value_type))


def synthetic_corpus(store: Store, rng: np.random.Generator) -> np.ndarray:
    """N_DOCS documents of DOC_TOKENS random token ids: half chats (system, user, assistant, template), half text."""
    token_ids = rng.integers(100, 49152, size=(N_DOCS, DOC_TOKENS), dtype=np.int32)
    chat_roles = np.array(["template"] * 8 + ["system"] * 24 + ["user"] * 64 + ["template"] * 8 + ["assistant"] * 152)
    roles = [chat_roles.tolist() if d % 2 else ["text"] * DOC_TOKENS for d in range(N_DOCS)]
    doc_ids = [f"doc{d:05d}" for d in range(N_DOCS)]
    store.upsert(
        "documents",
        pa.table(
            {
                "corpus_id": [CORPUS] * N_DOCS,
                "doc_id": doc_ids,
                "kind": ["chat" if d % 2 else "text" for d in range(N_DOCS)],
                "source": ["bench"] * N_DOCS,
                "category": [["news", "support", "coding", "poem"][d % 4] for d in range(N_DOCS)],
                "n_tokens": [DOC_TOKENS] * N_DOCS,
            }
        ),
    )
    store.upsert(
        "doc_tokens",
        pa.table(
            {
                "corpus_id": [CORPUS] * N_DOCS,
                "doc_id": doc_ids,
                "token_ids": lists(token_ids, DOC_TOKENS, pa.int32()),
                "roles": roles,
                "turns": [[0] * DOC_TOKENS] * N_DOCS,
            }
        ),
    )
    return token_ids


def synthetic_layer(
    store: Store, run_id: str, layer: int, n_features: int, corpus: np.ndarray, rng: np.random.Generator
) -> None:
    features = np.arange(n_features, dtype=np.int32)
    dead = rng.random(n_features) < 0.02
    n_tokens = N_DOCS * DOC_TOKENS
    n_active = np.where(dead, 0, rng.integers(10, n_tokens // 20, n_features))
    max_act = np.where(dead, 0.0, rng.uniform(1, 20, n_features))
    edges = max_act[:, None] * 2.0 ** (np.arange(25)[None, :] / 3 - 8)
    histogram = np.where(dead[:, None], 0, rng.integers(0, 5000, (n_features, 24)))
    base = {"run_id": [run_id] * n_features, "layer": np.full(n_features, layer, dtype=np.int32), "feature": features}
    tables = {
        "features": pa.table(
            {
                **base,
                "n_tokens": np.full(n_features, n_tokens),
                "n_active": n_active,
                "density": n_active / n_tokens,
                "max_act": max_act,
                "mean_act": max_act / 3,
                "quantile_edges": lists(np.sort(edges[:, ::2][:, :11], 1), 11, pa.float64()),
                "histogram": lists(histogram, 24, pa.int64()),
                "histogram_edges": lists(edges, 25, pa.float64()),
                "status": np.where(dead, "dead", "active"),
            }
        )
    }
    tables["role_stats"] = pa.table(
        {
            "run_id": [run_id] * (5 * n_features),
            "layer": np.full(5 * n_features, layer, dtype=np.int32),
            "feature": np.repeat(features, 5),
            "role": list(ROLES) * n_features,
            "n_tokens": np.full(5 * n_features, n_tokens // 5),
            "n_active": np.repeat(n_active, 5) // 5,
            "sum_act": rng.uniform(0, 1e4, 5 * n_features),
            "max_act": np.repeat(max_act, 5),
            "n_turns": np.full(5 * n_features, 1000),
            "n_turns_active": rng.integers(0, 1000, 5 * n_features),
        }
    )
    alive = features[~dead]
    per = TOP + QUANTILE + RANDOM
    n = len(alive) * per
    kind = np.tile(np.array(["top"] * TOP + ["quantile"] * QUANTILE + ["random"] * RANDOM), len(alive))
    rank = np.tile(np.concatenate([np.arange(TOP), np.arange(QUANTILE), np.arange(RANDOM)]), len(alive))
    bins = np.where(kind == "quantile", rank // 5, -1)
    doc, start = rng.integers(0, N_DOCS, n), rng.integers(0, DOC_TOKENS - EXAMPLE_TOKENS, n)
    tokens = corpus[doc[:, None], start[:, None] + np.arange(EXAMPLE_TOKENS)[None, :]]
    acts = (rng.exponential(1.0, (n, EXAMPLE_TOKENS)) * (rng.random((n, EXAMPLE_TOKENS)) < 0.15)).astype(np.float32)
    acts[kind == "random"] = 0
    tables["examples"] = pa.table(
        {
            "run_id": [run_id] * n,
            "layer": np.full(n, layer, dtype=np.int32),
            "feature": np.repeat(alive, per),
            "kind": kind,
            "rank": rank.astype(np.int32),
            "bin": pa.array(bins.astype(np.int32), mask=bins < 0),
            "doc_id": [f"doc{d:05d}" for d in doc],
            "turn": np.zeros(n, dtype=np.int32),
            "role": ["assistant"] * n,
            "start": start.astype(np.int32),
            "tokens": lists(tokens, EXAMPLE_TOKENS, pa.int32()),
            "acts": lists(acts, EXAMPLE_TOKENS, pa.float32()),
            "max_act": acts.max(1).astype(np.float64),
        }
    )
    labeled = alive[rng.random(len(alive)) < 0.9]
    m = len(labeled)
    tables["labels"] = pa.table(
        {
            "run_id": [run_id] * m,
            "layer": np.full(m, layer, dtype=np.int32),
            "feature": labeled,
            "labeler": ["bench"] * m,
            "label": [f"synthetic concept {f % 97} in layer {layer}" for f in labeled],
            "explanation": ["Fires on a synthetic concept; & <escaped> text."] * m,
            "status": ["ok"] * m,
            "created_at": [now()] * m,
        }
    )
    values = rng.uniform(0.3, 1.0, 3 * m)
    tables["scores"] = pa.table(
        {
            "run_id": [run_id] * 3 * m,
            "layer": np.full(3 * m, layer, dtype=np.int32),
            "feature": np.repeat(labeled, 3),
            "labeler": ["bench"] * 3 * m,
            "scorer": ["detection", "fuzzing", "embedding"] * m,
            "value": values,
            "n": np.full(3 * m, 20, dtype=np.int32),
            "status": ["ok"] * 3 * m,
            "unreliable": values < 0.6,
            "details_json": ["{}"] * 3 * m,
        }
    )
    tables["feature_map"] = pa.table(
        {
            **base,
            "umap_x": rng.normal(size=n_features),
            "umap_y": rng.normal(size=n_features),
            "cluster_id": rng.integers(0, 40, n_features).astype(np.int32),
            "reliable": ~dead,
        }
    )
    store.write_shard(run_id, "bench", f"layer{layer}", tables, fresh=True)


def build(workdir: Path, n_layers: int, n_features: int) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "bench.duckdb").unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    layers = list(range(0, 4 * n_layers, 4))
    with Store(workdir / "bench.duckdb") as store:
        corpus = synthetic_corpus(store, rng)
        run_id = store.start_run(
            to_json(RunConfig().model_dump(mode="json")), "smollm2-135m-instruct", CORPUS, "bench-tc"
        )
        for layer in layers:
            synthetic_layer(store, run_id, layer, n_features, corpus, rng)
        store.upsert(
            "clusters", [{"run_id": run_id, "cluster_id": c, "name": f"cluster {c}", "size": 400} for c in range(40)]
        )
        store.upsert(
            "groups",
            [
                {"run_id": run_id, "group_name": g, "layer": layers[0], "feature": f, "similarity": 0.5, "lift": 2.0}
                for g in ("refusal", "sycophancy", "reward_model_bias")
                for f in range(30)
            ],
        )
        store.upsert(
            "audit_findings",
            [
                {
                    "run_id": run_id,
                    "audit": "assistant_pervasiveness",
                    "layer": layers[-1],
                    "feature": f,
                    "metric": metric,
                    "value": 0.5,
                    "ci_low": 0.4,
                    "ci_high": 0.6,
                    "flagged": f < 20,
                    "details_json": "{}",
                    "section": "template" if f % 10 == 0 else "pervasive",
                    "rank": f + 1,
                    "group_name": None,
                    "label": None,
                }
                for f in range(200)
                for metric in ("assistant_turn_share", "lift_vs_user", "lift_vs_text", "breadth")
            ],
        )
        store.upsert(
            "llm_calls",
            [
                {
                    "call_id": f"c{i}",
                    "run_id": run_id,
                    "stage": "label",
                    "model": "bench",
                    "tokens_in": 500,
                    "tokens_out": 60,
                    "cost_usd": 1e-4,
                    "status": "ok",
                    "cached": False,
                    "created_at": now(),
                }
                for i in range(1000)
            ],
        )
        store.con.execute("CHECKPOINT")
    torch.manual_seed(0)
    tset = TranscoderSet(
        {
            layer: Transcoder(
                layer,
                torch.randn(576, n_features),
                torch.zeros(n_features),
                torch.randn(n_features, 576),
                torch.zeros(576),
            )
            for layer in layers
        }
    )
    torch.save({layer: tset[layer].W_dec.detach() for layer in layers}, workdir / "w_dec.pt")
    return run_id


def worker(kind: str, workdir: Path, run_id: str) -> dict:
    settings = ReportConfig()
    started = time.perf_counter()
    with Store(workdir / "bench.duckdb", read_only=True) as store:
        if kind == "query":
            rows = page_data.feature_rows(store, run_id)
            page_data.role_density(store, run_id)
            summary.feature_labels(store, run_id)
            for layer in sorted({r["layer"] for r in rows}):
                page_data.examples_table(store, run_id, CORPUS, layer, settings)
            return {"seconds": time.perf_counter() - started, "pages": len(rows), "rss": peak_rss_mb(), "mb": 0}
        subject = load_subject_model("embedded:smollm2", RunConfig().cache_dir)
        tset = None
        if kind == "full":
            w_dec = torch.load(workdir / "w_dec.pt")
            tset = TranscoderSet(
                {
                    layer: Transcoder(layer, torch.zeros(576, w.shape[0]), torch.zeros(w.shape[0]), w, torch.zeros(576))
                    for layer, w in w_dec.items()
                }
            )
        out = workdir / f"reports-{kind}"
        shutil.rmtree(out, ignore_errors=True)  # a first report; a re-run also deletes the old pages
        started = time.perf_counter()  # the model load (under 2 s, cached) is not the report's work
        result = report_stage(
            store, run_id, out, settings, subject.tokenizer, subject if tset else None, tset, show_progress=False
        )
    size = sum(p.stat().st_size for p in result.index.parent.rglob("*") if p.is_file()) / 2**20
    return {"seconds": time.perf_counter() - started, "pages": result.pages, "rss": peak_rss_mb(), "mb": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autolabel-report-bench"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.run)))
        return
    started = time.perf_counter()
    run_id = build(args.workdir, args.layers, args.features)
    seconds = time.perf_counter() - started
    print(f"synthetic run {run_id}: {args.layers} x {args.features} features, built in {seconds:.0f} s")
    results = {}
    for kind in ("query", "tokenizer", "full"):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", kind, "--workdir", str(args.workdir), "--run", run_id],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    names = {
        "query": "(a) query the rows (baseline)",
        "tokenizer": "(b) report, tokenizer only",
        "full": "(c) report + output tokens + nearest",
    }
    print("| what | pages | seconds | pages/s | vs (a) | peak RSS MB | report MB |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(
            f"| {names[kind]} | {r['pages']:,} | {r['seconds']:.1f} | {r['pages'] / r['seconds']:,.0f} | "
            f"{r['seconds'] / results['query']['seconds']:.1f}x | {r['rss']:.0f} | {r['mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
