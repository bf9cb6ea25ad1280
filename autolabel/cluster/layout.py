"""Points -> a 2-D map and clusters.

The k nearest neighbours are computed once, exactly, by blocked matrix products
(16k points take seconds, and need no numba JIT, unlike UMAP's approximate
search); both UMAP embeddings reuse them: a 2-D one for the map and a
`cluster_dims`-D one that HDBSCAN clusters in (density clustering works far
better after UMAP than on raw 384-D embeddings). Points HDBSCAN leaves out are
noise, cluster -1. UMAP runs with `random_state = cluster.seed`: reproducible, and
single-threaded, which costs little on two cores.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from autolabel.config import ClusterConfig

BLOCK_ROWS = 2048


@dataclass
class Layout:
    map_xy: np.ndarray  # [n, 2]
    cluster_space: np.ndarray  # [n, cluster_dims]
    cluster_ids: np.ndarray  # [n] int, -1 for noise
    seconds: dict[str, float] = field(default_factory=dict)  # knn, umap_map, umap_clusters, hdbscan


def exact_knn(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors [n, d] -> (indices [n, k], cosine distances [n, k]), each point first (distance 0)."""
    n = len(vectors)
    k = min(k, n)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, BLOCK_ROWS):
        similarity = vectors[start : start + BLOCK_ROWS] @ vectors.T  # [block, n]
        rows = np.arange(len(similarity))
        similarity[rows, start + rows] = np.inf  # a point is its own nearest neighbour, even among duplicates
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # [block, k], unordered
        order = np.argsort(-np.take_along_axis(similarity, nearest, 1), axis=1)
        nearest = np.take_along_axis(nearest, order, 1)
        indices[start : start + len(similarity)] = nearest
        distances[start : start + len(similarity)] = np.clip(1 - np.take_along_axis(similarity, nearest, 1), 0, 2)
    distances[:, 0] = 0.0
    return indices, distances


def _umap(
    vectors: np.ndarray, knn: tuple[np.ndarray, np.ndarray], dims: int, min_dist: float, config: ClusterConfig
) -> np.ndarray:
    import umap

    reducer = umap.UMAP(
        n_components=dims,
        n_neighbors=knn[0].shape[1],
        metric="cosine",
        min_dist=min_dist,
        n_epochs=config.epochs,
        init="random",
        random_state=config.seed,
        low_memory=True,
        precomputed_knn=(*knn, None),
    )
    with warnings.catch_warnings():  # "n_jobs overridden by random_state", "no search index": both intended
        warnings.simplefilter("ignore")
        return reducer.fit_transform(vectors).astype(np.float32)


def lay_out(vectors: np.ndarray, config: ClusterConfig) -> Layout:
    """Unit vectors [n, d] -> the map, the clustering space and cluster ids."""
    from sklearn.cluster import HDBSCAN

    seconds = {}
    n = len(vectors)
    if n <= config.neighbors:  # too few points for UMAP's graph: one noise cloud on a line
        line = np.stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)], 1)
        return Layout(line, np.zeros((n, config.cluster_dims), np.float32), np.full(n, -1), seconds)
    started = time.perf_counter()
    knn = exact_knn(vectors, config.neighbors)
    seconds["knn"] = time.perf_counter() - started
    started = time.perf_counter()
    cluster_space = _umap(vectors, knn, config.cluster_dims, 0.0, config)  # tight clumps for density clustering
    seconds["umap_clusters"] = time.perf_counter() - started
    started = time.perf_counter()
    map_xy = _umap(vectors, knn, 2, config.map_min_dist, config)
    seconds["umap_map"] = time.perf_counter() - started
    started = time.perf_counter()
    min_cluster_size = config.min_cluster_size or max(5, n // 400)
    cluster_ids = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=config.min_samples, copy=True).fit_predict(
        cluster_space
    )
    seconds["hdbscan"] = time.perf_counter() - started
    return Layout(map_xy, cluster_space, cluster_ids.astype(np.int64), seconds)
