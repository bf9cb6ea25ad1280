"""`autolabel cluster`: the feature map, named clusters and audit groups of a labeled run.

In order: the features' texts (labels, or top examples where there is no label)
-> MiniLM vectors (cached) -> optionally joined with decoder directions -> exact
kNN -> UMAP to 2-D (the map) and to `cluster_dims`-D -> HDBSCAN -> one LLM call
per cluster for its name -> audit group memberships. Everything of the run is
written in one transaction that first clears the run's previous map, clusters and
groups, so a re-run replaces them whole. A re-run records, in `cluster_runs`, the
adjusted Rand index between its clustering and the one it replaced (noise counted
as one more label), which is how stable the clusters are under another seed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np

from autolabel.cluster.embed import (
    FeatureTexts,
    combine,
    decoder_directions,
    embed_texts,
    feature_texts,
    load_embedder,
)
from autolabel.cluster.groups import (
    GroupsSpec,
    Member,
    group_members,
    load_groups,
    missing_categories,
    probe_lift,
)
from autolabel.cluster.layout import Layout, lay_out
from autolabel.cluster.naming import ClusterName, name_clusters
from autolabel.config import RunConfig
from autolabel.errors import AutolabelError
from autolabel.llm import open_client
from autolabel.store import Store, now

STAGE = "cluster"


@dataclass
class ClusterSummary:
    run_id: str
    seed: int
    n_features: int
    n_reliable: int
    n_clusters: int
    noise_fraction: float
    names_by_status: dict[str, int]  # ok / invalid / error / unnamed -> clusters
    group_sizes: dict[str, int]
    missing_categories: dict[str, list[str]]  # group -> probe categories the run's corpus lacks
    ari_vs_seed: int | None  # the seed of the clustering this one replaced, if any
    ari: float | None
    ari_clustered: float | None  # over the features both clusterings put in a cluster
    calls: int
    seconds: dict[str, float]  # per phase, and "total"


def previous_clustering(store: Store, run_id: str) -> tuple[int | None, dict[tuple[int, int], int]]:
    """(seed, {(layer, feature): cluster_id}) of the run's stored clustering, if there is one."""
    row = store.one("SELECT seed FROM cluster_runs WHERE run_id = ? ORDER BY created_at DESC LIMIT 1", [run_id])
    rows = store.rows("SELECT layer, feature, cluster_id FROM feature_map WHERE run_id = ?", [run_id])
    return (row[0] if row else None), {(layer, feature): cluster for layer, feature, cluster in rows}


def stability(
    previous: dict[tuple[int, int], int], keys: list[tuple[int, int]], cluster_ids: np.ndarray
) -> tuple[float | None, float | None]:
    """Adjusted Rand index between two clusterings on the features both placed (noise as one more label),
    and on those both put in a cluster."""
    from sklearn.metrics import adjusted_rand_score

    common = np.array(
        [(previous[key], c) for key, c in zip(keys, cluster_ids.tolist(), strict=True) if key in previous]
    )
    if len(common) < 2:
        return None, None
    clustered = common[(common >= 0).all(1)]
    return (
        float(adjusted_rand_score(common[:, 0], common[:, 1])),
        float(adjusted_rand_score(clustered[:, 0], clustered[:, 1])) if len(clustered) >= 2 else None,
    )


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - started


def cluster_stage(
    store: Store, tokenizer, tset, run_id: str, config: RunConfig, embedder=None, show_progress: bool = True
) -> ClusterSummary:
    """Map, cluster, name and tag the features of `run_id`. `tset` (the run's transcoders) is needed only for
    `embedding: label+decoder`; `tokenizer` decodes the top examples of features with no label."""
    settings = config.cluster
    started = time.perf_counter()
    spec = load_groups(settings.groups) if settings.groups else None  # a bad spec fails before any work
    if settings.embedding == "label+decoder" and tset is None:
        raise AutolabelError("cluster.embedding is label+decoder but no transcoders were given")
    seconds: dict[str, float] = {}
    with _timed(seconds, "read"):
        texts = feature_texts(store, run_id, tokenizer, settings)
    if not texts.keys:
        raise AutolabelError(
            f"run {run_id} has no features to cluster (none fired, or none in cluster.layers); "
            f"run `autolabel collect` and `autolabel label` first"
        )
    with _timed(seconds, "load_embedder"):
        embedder = embedder or load_embedder(settings.embed_dtype)
    with _timed(seconds, "embed"):
        text_vectors = embed_texts(store, embedder, texts.texts, settings.batch_size, show_progress)  # [n, 384]
    decoder = decoder_directions(tset, texts.keys) if settings.embedding == "label+decoder" else None  # [n, d_model]
    layout = lay_out(combine(text_vectors, decoder, settings.decoder_weight), settings)
    seconds.update(layout.seconds)
    with _timed(seconds, "name"):
        names, calls = _names(store, config, run_id, texts, layout)
    with _timed(seconds, "groups"):
        members, missing = _groups(store, run_id, spec, embedder, texts, text_vectors, settings.batch_size)

    previous_seed, previous = previous_clustering(store, run_id)
    ari, ari_clustered = stability(previous, texts.keys, layout.cluster_ids)
    seconds["total"] = time.perf_counter() - started
    summary = ClusterSummary(
        run_id,
        settings.seed,
        len(texts.keys),
        int(texts.reliable.sum()),
        len(set(layout.cluster_ids.tolist()) - {-1}),
        float((layout.cluster_ids == -1).mean()),
        _by_status(names),
        {name: sum(m.group_name == name for m in members) for name in (spec.groups if spec else {})},
        missing,
        previous_seed if ari is not None else None,
        ari,
        ari_clustered,
        calls,
        seconds,
    )
    store.write_shard(
        run_id,
        STAGE,
        f"seed-{settings.seed}",
        _tables(summary, settings.embedding, texts, layout, names, members),
        replace=True,
        clear={table: {"run_id": run_id} for table in ("feature_map", "clusters", "groups")},
    )
    return summary


def _names(
    store: Store, config: RunConfig, run_id: str, texts: FeatureTexts, layout: Layout
) -> tuple[list[ClusterName], int]:
    """Every cluster's name (one LLM call each, unless cluster.name_clusters is off) and the calls made."""
    settings = config.cluster
    naming = settings.name_clusters and bool((layout.cluster_ids >= 0).any())
    with open_client(store, config.llm, run_id, STAGE) if naming else nullcontext() as client:
        names = asyncio.run(
            name_clusters(
                client, layout.cluster_space, layout.cluster_ids, texts.labels, texts.reliable, settings.name_labels
            )
        )
    return names, client.calls if naming else 0


def _groups(
    store: Store,
    run_id: str,
    spec: GroupsSpec | None,
    embedder,
    texts: FeatureTexts,
    text_vectors: np.ndarray,
    batch_size: int,
) -> tuple[list[Member], dict[str, list[str]]]:
    """(audit group memberships, group -> probe categories the run's corpus lacks); none without a spec."""
    if spec is None:
        return [], {}
    missing = missing_categories(store, run_id, spec)
    seeds = {name: embed_texts(store, embedder, group.seeds, batch_size) for name, group in spec.groups.items()}
    lifts = {name: probe_lift(store, run_id, group) for name, group in spec.groups.items()}
    return group_members(spec, seeds, texts.keys, text_vectors, texts.reliable, lifts), missing


def _by_status(names: list[ClusterName]) -> dict[str, int]:
    by_status: dict[str, int] = {}
    for name in names:
        if name.status != "noise":
            by_status[name.status] = by_status.get(name.status, 0) + 1
    return by_status


def _tables(
    summary: ClusterSummary,
    embedding: str,
    texts: FeatureTexts,
    layout: Layout,
    names: list[ClusterName],
    members: list[Member],
) -> dict[str, list[dict]]:
    """The rows of one clustering: the map, the clusters, the group memberships and the cluster_runs record."""
    run_id = summary.run_id
    return {
        "feature_map": [
            {
                "run_id": run_id,
                "layer": layer,
                "feature": feature,
                "umap_x": float(x),
                "umap_y": float(y),
                "cluster_id": int(c),
                "reliable": bool(r),
            }
            for (layer, feature), (x, y), c, r in zip(
                texts.keys, layout.map_xy, layout.cluster_ids, texts.reliable, strict=True
            )
        ],
        "clusters": [_cluster_row(run_id, name, layout.cluster_ids) for name in names],
        "groups": [
            {
                "run_id": run_id,
                "group_name": m.group_name,
                "layer": m.key[0],
                "feature": m.key[1],
                "similarity": m.similarity,
                "lift": m.lift,
                "via": m.via,
                "nearest_seed": m.nearest_seed,
                "n_active": m.n_active,
            }
            for m in members
        ],
        "cluster_runs": [
            {
                "run_id": run_id,
                "seed": summary.seed,
                "embedding": embedding,
                "n_features": summary.n_features,
                "n_reliable": summary.n_reliable,
                "n_clusters": summary.n_clusters,
                "noise_fraction": summary.noise_fraction,
                "ari_vs_seed": summary.ari_vs_seed,
                "ari": summary.ari,
                "ari_clustered": summary.ari_clustered,
                "seconds": summary.seconds["total"],
                "created_at": now(),
            }
        ],
    }


def _cluster_row(run_id: str, name: ClusterName, cluster_ids: np.ndarray) -> dict:
    return {
        "run_id": run_id,
        "cluster_id": name.cluster_id,
        "name": name.name,
        "description": name.description,
        "size": int((cluster_ids == name.cluster_id).sum()),
        "status": name.status,
        "error": name.error,
        "n_reliable": name.n_reliable,
    }
