"""Cluster-stage speed on synthetic labels, next to MiniLM embedding alone.

    .venv/bin/python benchmarks/cluster.py [--features 16000]

Writes `--features` labeled features (synthetic labels: 24 domains, two domain
words and a context in one of six phrasings, all distinct texts) into a temporary
store and measures, in this one process:

  (a) the baseline: MiniLM encoding of the same texts in float32, nothing else;
  (a2) the same in bfloat16 (the stage's default `cluster.embed_dtype`);
  (b) `cluster_stage`, first run in the process: read, embed (and cache), exact kNN,
      UMAP to 10-D (this first UMAP call includes numba's JIT compilation), UMAP to
      2-D, HDBSCAN, audit groups; cluster naming off (it is LLM-bound, one call per cluster);
  (c) the same with another seed: embeddings come from the store's cache, the JIT is
      warm, and the ARI against (b) is the stability figure.
Peak RSS is the process's, after each row.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb

from autolabel.cluster import cluster_stage
from autolabel.cluster.embed import load_embedder
from autolabel.config import ClusterConfig, RunConfig
from autolabel.store import Store, now

DOMAINS = {
    "cooking": "flour butter sugar oven recipe chocolate garlic onion",
    "programming": "function variable loop class import compiler bracket array",
    "football": "goal striker referee league penalty keeper match transfer",
    "music": "guitar chord lyrics album drummer melody concert orchestra",
    "weather": "rain storm forecast snow wind temperature cloud humidity",
    "law": "court judge lawyer verdict contract statute appeal evidence",
    "medicine": "patient doctor symptom vaccine surgery diagnosis hospital dose",
    "finance": "stock bond interest inflation bank loan dividend currency",
    "travel": "flight hotel passport luggage airport beach itinerary visa",
    "animals": "cat dog horse bird fish lion insect rabbit",
    "politics": "election minister parliament vote campaign policy senator party",
    "chemistry": "molecule atom reaction acid bond catalyst solvent electron",
    "mathematics": "equation integral matrix prime theorem fraction vector proof",
    "history": "empire war dynasty revolution treaty medieval castle king",
    "games": "player level score puzzle chess dice quest console",
    "fashion": "dress shoe fabric designer jacket silk collection runway",
    "cars": "engine tyre brake gearbox fuel dashboard steering bumper",
    "space": "planet orbit rocket galaxy telescope astronaut comet moon",
    "education": "teacher student exam lesson school homework classroom grade",
    "religion": "church prayer temple priest scripture faith monk ritual",
    "refusal": "sorry cannot refuse decline unable apologise unfortunately inappropriate",
    "units": "kilometre mile metre pound kilogram litre inch degree",
    "poetry": "rhyme verse stanza sonnet poem meter couplet haiku",
    "self": "assistant model AI language chatbot helpful SmolLM trained",
}
CONTEXTS = [
    "news articles",
    "chat messages",
    "user questions",
    "assistant replies",
    "lists",
    "headlines",
    "long documents",
    "code comments",
    "quoted speech",
    "titles",
    "tables",
    "instructions",
]
PHRASINGS = [
    "{a} and {b}",
    "the words {a} or {b}",
    "{a} next to {b}",
    "mentions of {a} and {b}",
    "{a}, then {b}",
    "{b} after {a}",
]


def synthetic_labels(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct (label, explanation) pairs, each about one domain."""
    rng = random.Random(seed)
    every = [
        (domain, a, b, phrasing, context)
        for domain, words in DOMAINS.items()
        for a in words.split()
        for b in words.split()
        if a != b
        for phrasing in PHRASINGS
        for context in CONTEXTS
    ]
    chosen = rng.sample(every, n)
    return [
        (phrasing.format(a=a, b=b), f"Fires on {a} in {context} about {domain}.")
        for domain, a, b, phrasing, context in chosen
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=16_000)
    args = parser.parse_args()
    labels = synthetic_labels(args.features)
    texts = [f"{label}. {explanation}" for label, explanation in labels]
    config = RunConfig(cluster=ClusterConfig(name_clusters=False))
    rows = []
    for name, dtype in [
        ("(a) MiniLM encode only, float32", "float32"),
        ("(a2) MiniLM encode only, bfloat16", "bfloat16"),
    ]:
        embedder = load_embedder(dtype)
        embedder.encode(texts[:256], batch_size=config.cluster.batch_size)  # one-off warm-up, not timed
        started = time.perf_counter()
        embedder.encode(texts, batch_size=config.cluster.batch_size, normalize_embeddings=True)
        seconds = time.perf_counter() - started
        rows.append((name, {"embed": seconds, "total": seconds}, None, peak_rss_mb()))
    baseline = rows[0][1]["total"]

    with tempfile.TemporaryDirectory() as folder, Store(Path(folder) / "bench.duckdb") as store:
        store.write_shard(
            "bench",
            "test",
            "rows",
            {
                "features": [
                    {"run_id": "bench", "layer": 0, "feature": i, "status": "active"} for i in range(len(labels))
                ],
                "labels": [
                    {
                        "run_id": "bench",
                        "layer": 0,
                        "feature": i,
                        "labeler": "synthetic",
                        "label": label,
                        "explanation": explanation,
                        "status": "ok",
                        "created_at": now(),
                    }
                    for i, (label, explanation) in enumerate(labels)
                ],
            },
        )
        for name, seed in [("(b) cluster, first run (cold)", 0), ("(c) cluster, seed 1 (warm)", 1)]:
            config.cluster.seed = seed
            summary = cluster_stage(store, None, None, "bench", config, embedder, show_progress=False)  # bfloat16
            rows.append((name, summary.seconds, summary, peak_rss_mb()))

    phases = ["read", "embed", "knn", "umap_clusters", "umap_map", "hdbscan", "groups", "total"]
    print(
        f"{args.features:,} features, synthetic labels; cluster_dims {config.cluster.cluster_dims}, "
        f"neighbors {config.cluster.neighbors}, epochs {config.cluster.epochs}, min_cluster_size "
        f"{config.cluster.min_cluster_size or max(5, args.features // 400)}\n"
    )
    print("| what | " + " | ".join(phases) + " | vs (a) | clusters | noise | ARI | ARI clustered | peak RSS MB |")
    print("|---" * (len(phases) + 7) + "|")
    for name, seconds, summary, rss in rows:
        cells = [f"{seconds[p]:.1f}" if p in seconds else "-" for p in phases]
        extra = (
            [
                str(summary.n_clusters),
                f"{summary.noise_fraction:.1%}",
                *(f"{value:.3f}" if value is not None else "-" for value in (summary.ari, summary.ari_clustered)),
            ]
            if summary
            else ["-"] * 4
        )
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {seconds['total'] / baseline:.2f} | "
            + " | ".join(extra)
            + f" | {rss:.0f} |"
        )


if __name__ == "__main__":
    main()
