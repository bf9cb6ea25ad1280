"""`autolabel transcoder check`: does this transcoder describe this model?

A transcoder whose weights were transposed, read at the wrong hook, or trained
for another model still produces features, just meaningless ones. Reconstruction
quality on real activations is the test that catches all three: the fraction of
variance of the real MLP output left unexplained (FVU) is near 0 for a good
transcoder and near or above 1 for a mismatched one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from autolabel.corpus.windows import Window
from autolabel.errors import AutolabelError
from autolabel.hashing import hash_path
from autolabel.models import SubjectModel
from autolabel.store import Store, now, to_json
from autolabel.transcoders.activations import activation_pairs
from autolabel.transcoders.transcoder import TranscoderSet


@dataclass
class LayerQuality:
    layer: int
    fvu: float
    l0: float  # mean active features per token
    dead_fraction: float  # features that never fired on the measured tokens
    n_tokens: int


class _Accumulator:
    def __init__(self, d_out: int, d_feat: int):
        self.sq_err = 0.0
        self.sum_y = torch.zeros(d_out, dtype=torch.float64)
        self.sum_y2 = torch.zeros(d_out, dtype=torch.float64)
        self.active = 0
        self.fired = torch.zeros(d_feat, dtype=torch.bool)
        self.n = 0

    def add(self, target: torch.Tensor, prediction: torch.Tensor, acts: torch.Tensor) -> None:
        self.sq_err += float(((target - prediction).double() ** 2).sum())
        self.sum_y += target.double().sum(0)
        self.sum_y2 += (target.double() ** 2).sum(0)
        nonzero = acts > 0
        self.active += int(nonzero.sum())
        self.fired |= nonzero.any(0)
        self.n += target.shape[0]

    def result(self, layer: int) -> LayerQuality:
        variance = float((self.sum_y2 - self.sum_y**2 / self.n).sum())
        return LayerQuality(
            layer,
            self.sq_err / max(variance, 1e-12),
            self.active / self.n,
            1.0 - float(self.fired.float().mean()),
            self.n,
        )


def check_shapes(subject: SubjectModel, tset: TranscoderSet) -> None:
    for layer, transcoder in tset.transcoders.items():
        if not 0 <= layer < subject.n_layers:
            raise AutolabelError(
                f"transcoder {tset.path} has layer {layer}, but {subject.model_id} has layers 0..{subject.n_layers - 1}"
            )
        if transcoder.d_in != subject.d_model or transcoder.d_out != subject.d_model:
            raise AutolabelError(
                f"transcoder {tset.path} layer {layer} maps {transcoder.d_in} -> {transcoder.d_out} dims, but "
                f"{subject.model_id} has d_model {subject.d_model}: it was made for another model"
            )


@torch.inference_mode()
def measure_quality(
    subject: SubjectModel, tset: TranscoderSet, windows: Iterable[Window], n_tokens: int = 8192, batch_size: int = 16
) -> dict[int, LayerQuality]:
    """FVU, L0 and dead fraction per layer over (about) n_tokens tokens."""
    check_shapes(subject, tset)
    accumulators = {layer: _Accumulator(t.d_out, t.d_feat) for layer, t in tset.transcoders.items()}
    seen = 0
    for pairs in activation_pairs(subject, windows, tset.layers, tset.input_hook, tset.output_hook, batch_size):
        inputs = {layer: x for layer, (x, _) in pairs.items()}
        predictions = tset.reconstruct(inputs)
        for layer, (x, y) in pairs.items():
            accumulators[layer].add(y, predictions[layer], tset[layer].encode(x))
        seen += next(iter(pairs.values()))[0].shape[0]
        if seen >= n_tokens:
            break
    if seen == 0:
        raise AutolabelError("no tokens to check the transcoder on: the corpus is empty")
    return {layer: acc.result(layer) for layer, acc in accumulators.items()}


def transcoder_id(tset: TranscoderSet) -> str:
    """Content hash of the weight files, so the same transcoder is recognised wherever it lies."""
    return f"tc-{hash_path(Path(tset.path), tset.source_format)[:12]}"


def record_quality(
    store: Store, tset: TranscoderSet, tid: str, model_id: str, quality: dict[int, LayerQuality]
) -> None:
    layers = sorted(quality)
    store.record_transcoder(
        {
            "transcoder_id": tid,
            "source_format": tset.source_format,
            "path": str(tset.path),
            "model_id": model_id,
            "d_in": tset[layers[0]].d_in,
            "d_feat": tset.d_feat,
            "layers": tset.layers,
            "activation": tset.activation,
            "input_hook": tset.input_hook,
            "output_hook": tset.output_hook,
            "checked_at": now(),
            "fvu_by_layer": {k: quality[k].fvu for k in layers},
            "l0_by_layer": {k: quality[k].l0 for k in layers},
            "dead_by_layer": {k: quality[k].dead_fraction for k in layers},
        }
    )


def refuse_bad_fit(tset: TranscoderSet, quality: dict[int, LayerQuality], max_fvu: float) -> None:
    """A NaN FVU or bound compares false with everything, so each is refused before the comparison could pass it."""
    if not 0 < max_fvu < math.inf:
        raise AutolabelError(
            f"the FVU bound {max_fvu} (transcoder.max_fvu or --max-fvu) must be a positive finite number, e.g. 0.5"
        )
    broken = {layer: q.fvu for layer, q in quality.items() if not math.isfinite(q.fvu)}
    if broken:
        layers = ", ".join(f"layer {layer}: FVU {fvu}" for layer, fvu in sorted(broken.items()))
        raise AutolabelError(
            f"transcoder {tset.path} reconstructs this model's MLP output as NaN or infinite values ({layers}): the "
            f"transcoder's outputs or the model's activations overflow. Check the weights of those layers (export them "
            f"in float32) and run the model in float32 (model.dtype: float32)."
        )
    bad = {layer: q.fvu for layer, q in quality.items() if q.fvu > max_fvu}
    if bad:
        worst = ", ".join(f"layer {layer}: FVU {fvu:.2f}" for layer, fvu in sorted(bad.items()))
        raise AutolabelError(
            f"transcoder {tset.path} does not reconstruct this model's MLP output ({worst}; bound {max_fvu}). "
            f"Likely causes: the wrong hook point (reads {tset.input_hook!r}, writes {tset.output_hook!r}), "
            f"transposed weights (a wrong --format), or a transcoder made for another model "
            f"(it names {tset.model_name or 'no model'!r}). Raise transcoder.max_fvu only if you are sure."
        )


def check_transcoders(
    store: Store,
    subject: SubjectModel,
    tset: TranscoderSet,
    windows: Iterable[Window],
    n_tokens: int,
    max_fvu: float,
    corpus_id: str | None = None,
    settings: dict | None = None,
) -> tuple[str, dict[int, LayerQuality]]:
    """Measure, record in `transcoders`, then refuse a transcoder that does not fit.

    With a corpus_id, the figures are kept in `transcoder_checks` by (transcoder, model, corpus, dtype,
    n_tokens and `settings`: what chose the windows), and a later check of the same reads them instead of
    measuring again (15-20 s of forward passes on a CPU); `windows` is then never read, so it may be lazy.
    """
    tid = transcoder_id(tset)
    key = {
        "transcoder_id": tid,
        "model_id": subject.model_id,
        "corpus_id": corpus_id,
        "dtype": subject.dtype,
        "settings_json": to_json({"n_tokens": n_tokens, **(settings or {})}),
    }
    quality = _stored_quality(store, key) if corpus_id is not None else None
    if quality is None:
        quality = measure_quality(subject, tset, windows, n_tokens)
        if corpus_id is not None:
            store.upsert(
                "transcoder_checks",
                [{**key, "checked_at": now(), "quality_json": to_json([asdict(q) for q in quality.values()])}],
            )
    record_quality(store, tset, tid, subject.model_id, quality)
    refuse_bad_fit(tset, quality, max_fvu)
    return tid, quality


def _stored_quality(store: Store, key: dict) -> dict[int, LayerQuality] | None:
    row = store.one(
        "SELECT quality_json FROM transcoder_checks WHERE " + " AND ".join(f"{column} = ?" for column in key),
        list(key.values()),
    )
    return {q["layer"]: LayerQuality(**q) for q in json.loads(row[0])} if row else None
