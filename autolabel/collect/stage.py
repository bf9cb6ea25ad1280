"""`autolabel collect`: run the subject model over the corpus, encode with the
transcoders, and keep per feature what every later stage reads.

The corpus is cut into shards of consecutive documents. After each shard the
whole collection state is checkpointed beside the store (safetensors, written
atomically) and the shard is recorded in `shards`; `--resume` reloads the
checkpoint of the last recorded shard and goes on from there, so nothing is
lost or counted twice. The tables are written once, in one transaction, when
the last shard is done.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from autolabel.collect.orders import MAX_DOC_TOKENS, POS_BITS
from autolabel.collect.state import Batch, LayerState
from autolabel.collect.tables import example_rows, feature_rows, role_rows
from autolabel.config import CollectConfig
from autolabel.corpus.windows import Window, iter_windows
from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel
from autolabel.progress import progress_bar
from autolabel.store import Store, to_json
from autolabel.transcoders.activations import batch_windows, pad_batch
from autolabel.transcoders.transcoder import TranscoderSet

STAGE = "collect"


@dataclass
class CollectSummary:
    run_id: str
    n_tokens: int  # tokens counted per feature (every window's first token is left out)
    seconds: float
    resumed_shards: int
    status_by_layer: dict[int, dict[str, int]]  # layer -> {"active": n, "rare": n, "dead": n}


@dataclass
class CorpusIndex:
    """Documents in doc_id order: ordinals key every token, categories index the statistics."""

    doc_ids: list[str]
    doc_tokens: list[int]
    categories: list[str]
    ordinal: dict[str, int]
    category_index: dict[str, int]

    @classmethod
    def read(cls, store: Store, corpus_id: str) -> CorpusIndex:
        rows = store.rows(
            "SELECT doc_id, n_tokens, category FROM documents WHERE corpus_id = ? ORDER BY doc_id", [corpus_id]
        )
        if not rows:
            raise AutolabelError(f"corpus {corpus_id} has no documents; build it first with `autolabel corpus build`")
        too_long = [doc_id for doc_id, n, _ in rows if n >= MAX_DOC_TOKENS]
        if too_long:
            raise AutolabelError(
                f"documents {too_long[:3]} have {MAX_DOC_TOKENS:,} tokens or more; split them into smaller documents"
            )
        categories = sorted({category for _, _, category in rows})
        return cls(
            [r[0] for r in rows],
            [r[1] for r in rows],
            categories,
            {r[0]: i for i, r in enumerate(rows)},
            {c: i for i, c in enumerate(categories)},
        )


def plan_shards(doc_tokens: list[int], shard_tokens: int) -> list[tuple[int, int]]:
    """Consecutive document ranges [first, last] of about shard_tokens tokens each."""
    shards, first, size = [], 0, 0
    for i, n in enumerate(doc_tokens):
        size += n
        if size >= shard_tokens:
            shards.append((first, i))
            first, size = i + 1, 0
    if first < len(doc_tokens):
        shards.append((first, len(doc_tokens) - 1))
    return shards


def shard_windows(store: Store, corpus_id: str, index: CorpusIndex, first: int, last: int) -> list[Window]:
    """The windows of documents first..last, longest first, so that batches hold windows of about
    one length and little compute goes to padding (results do not depend on the order)."""
    windows = list(iter_windows(store, corpus_id, first_doc=index.doc_ids[first], last_doc=index.doc_ids[last]))
    return sorted(windows, key=lambda w: -len(w.token_ids))


def make_batch(windows: list[Window], index: CorpusIndex, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Batch]:
    input_ids, mask = pad_batch(windows, pad_id)
    B, S = input_ids.shape
    roles = torch.zeros(B, S, dtype=torch.long)
    turns = torch.zeros(B, S, dtype=torch.long)
    for row, window in enumerate(windows):
        roles[row, : len(window.roles)] = torch.from_numpy(window.roles.astype("int64"))
        turns[row, : len(window.turns)] = torch.from_numpy(window.turns.astype("int64"))
    ordinals = torch.tensor([index.ordinal[w.doc_id] for w in windows])[:, None]
    starts = torch.tensor([w.start for w in windows])[:, None]
    valid = mask.bool()
    valid[:, 0] = False
    return (
        input_ids,
        mask,
        Batch(
            valid=valid,
            roles=roles,
            turn_keys=(ordinals << POS_BITS) | (turns << 3) | roles,
            keys=(ordinals << POS_BITS) | (starts + torch.arange(S)[None, :]),
            tokens=input_ids,
            categories=torch.tensor([index.category_index[w.category] for w in windows]),
            lengths=torch.tensor([len(w.token_ids) for w in windows]),
        ),
    )


class Checkpoints:
    """One safetensors file per committed shard count; only the latest is kept."""

    def __init__(self, store_path: Path, run_id: str, fingerprint: str):
        self.folder = Path(f"{store_path}.collect") / run_id
        self.fingerprint = fingerprint

    def path(self, n_done: int) -> Path:
        return self.folder / f"state-{n_done:05d}.safetensors"

    def slice_path(self, first: int, last: int) -> Path:
        return self.folder / f"slice-{first:05d}-{last:05d}.safetensors"

    def save(self, states: dict[int, LayerState], n_done: int) -> None:
        self.write(states, self.path(n_done))

    def write(self, states: dict[int, LayerState], path: Path) -> None:
        """Atomically: a reader sees the whole file or none."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{layer}/{name}": t.contiguous() for layer, s in states.items() for name, t in s.tensors.items()}
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={"fingerprint": self.fingerprint})
        os.replace(partial, path)

    def drop_older(self, n_done: int) -> None:
        for old in self.folder.glob("state-*.safetensors"):
            if old != self.path(n_done):
                old.unlink()

    def load(self, states: dict[int, LayerState], n_done: int) -> None:
        self.read(states, self.path(n_done))

    def read(self, states: dict[int, LayerState], path: Path) -> None:
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise AutolabelError(
                f"cannot continue collecting: the state file {path} is missing or unreadable "
                f"({err}); start a new collection without --resume"
            ) from err
        if metadata.get("fingerprint") != self.fingerprint:
            raise AutolabelError(
                f"cannot continue from {path}: it was made with other collect settings, corpus or "
                f"transcoder; start a new collection without --resume"
            )
        for layer, state in states.items():
            for name in state.tensors.names():
                setattr(state.tensors, name, tensors[f"{layer}/{name}"])

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fingerprint(config: CollectConfig, corpus_id: str, transcoder_id: str, model_id: str, dtype: str) -> str:
    """Names what a collection depends on: its checkpoints and cached results are reused only on a match.

    The dtype is part of it: a bfloat16 forward pass gives (slightly) different activations, and its
    transcoders encode with bfloat16 weights (`encode`), which collections before that did not.
    """
    spec = {
        "collect": config.model_dump(mode="json"),
        "corpus": corpus_id,
        "transcoder": transcoder_id,
        "model": model_id,
        "dtype": dtype,
    }
    if dtype == "bfloat16":
        spec["encode"] = "bfloat16"
    return hashlib.sha256(to_json(spec).encode()).hexdigest()[:16]


def capture_batches(
    subject: SubjectModel, tset: TranscoderSet, windows: Iterable[Window], index: CorpusIndex, batch_size: int
) -> Iterator[tuple[Batch, dict[int, torch.Tensor]]]:
    """Per batch of windows: its token facts and layer -> transcoder inputs [B, S, d_in]."""
    points = {layer: subject.hook_point(tset.input_hook, layer) for layer in tset.layers}
    for group in batch_windows(windows, batch_size):
        input_ids, mask, batch = make_batch(group, index, subject.pad_id)
        captured = subject.capture(input_ids, mask, list(points.values()))
        yield batch, {layer: captured[point] for layer, point in points.items()}


@torch.inference_mode()
def encode(tset: TranscoderSet, layer: int, x: torch.Tensor) -> torch.Tensor:
    """[B, S, d_in] -> dense float32 feature activations [B, S, d_feat]; bfloat16 inputs (a bfloat16 subject
    model) are encoded with bfloat16 weights, see Transcoder.encode_at_input_precision."""
    return tset[layer].encode_at_input_precision(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)


def collect_stage(
    store: Store,
    subject: SubjectModel,
    tset: TranscoderSet,
    corpus_id: str,
    transcoder_id: str,
    config: CollectConfig,
    run_id: str,
    show_progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
) -> CollectSummary:
    """Collect (or finish collecting) run_id; `after_shard(n_done)` runs after each committed shard."""
    started = time.perf_counter()
    index = CorpusIndex.read(store, corpus_id)
    plan = plan_shards(index.doc_tokens, config.shard_tokens)
    names = [f"docs-{i:05d}" for i in range(len(plan))]
    done = store.committed_shards(run_id, STAGE)
    if "final" in done:
        return collect_summary(store, run_id, time.perf_counter() - started, len(plan))
    n_done = next((i for i, name in enumerate(names) if name not in done), len(names))
    if done - set(names[:n_done]):
        raise AutolabelError(
            f"run {run_id} has collect shards out of order ({sorted(done)[:5]}); "
            f"start a new collection without --resume"
        )

    states = new_states(tset, index, config)
    key = fingerprint(config, corpus_id, transcoder_id, subject.model_id, subject.dtype)
    checkpoints = Checkpoints(store.path, run_id, key)
    if n_done:
        checkpoints.load(states, n_done)
    with progress_bar("tok", disable=not show_progress) as bar:
        task = bar.add_task(
            "collecting",
            total=sum(index.doc_tokens),
            completed=sum(index.doc_tokens[: plan[n_done - 1][1] + 1]) if n_done else 0,
        )
        for k in range(n_done, len(plan)):
            run_shard(store, subject, tset, corpus_id, index, plan[k], states, config, lambda n: bar.advance(task, n))
            checkpoints.save(states, k + 1)
            store.write_shard(run_id, STAGE, names[k], {})
            checkpoints.drop_older(k + 1)
            if after_shard:
                after_shard(k + 1)
    write_tables(store, corpus_id, index, run_id, states)
    checkpoints.clear()
    return collect_summary(store, run_id, time.perf_counter() - started, n_done)


def new_states(tset: TranscoderSet, index: CorpusIndex, config: CollectConfig) -> dict[int, LayerState]:
    return {layer: LayerState(tset[layer].d_feat, len(index.categories), config) for layer in tset.layers}


def run_shard(
    store: Store,
    subject: SubjectModel,
    tset: TranscoderSet,
    corpus_id: str,
    index: CorpusIndex,
    shard: tuple[int, int],
    states: dict[int, LayerState],
    config: CollectConfig,
    advance: Callable[[int], None],
) -> None:
    """Update `states` with one shard's windows (documents shard[0]..shard[1]); turns close at its end."""
    windows = shard_windows(store, corpus_id, index, *shard)
    with torch.inference_mode():
        for batch, inputs in capture_batches(subject, tset, windows, index, config.batch_windows):
            for layer, x in inputs.items():  # one layer's dense activations alive at a time
                states[layer].update(encode(tset, layer, x), batch)
            advance(int(batch.lengths.sum()))
    for state in states.values():
        state.flush_turns()


def write_tables(store: Store, corpus_id: str, index: CorpusIndex, run_id: str, states: dict[int, LayerState]) -> None:
    tables: dict[str, list[pa.Table]] = {"features": [], "role_stats": [], "category_stats": [], "examples": []}
    for layer, state in states.items():
        n_tokens = int(state.tensors.group_tokens.sum())
        tables["features"].append(feature_rows(run_id, layer, state, n_tokens))
        role_table, category_table = role_rows(run_id, layer, state, index.categories)
        tables["role_stats"].append(role_table)
        tables["category_stats"].append(category_table)
        tables["examples"].append(example_rows(store, corpus_id, index.doc_ids, run_id, layer, state))
    # Rows of a run are only ever written here, once: a plain insert (fresh) keeps peak memory low.
    store.write_shard(
        run_id, STAGE, "final", {name: pa.concat_tables(parts) for name, parts in tables.items()}, fresh=True
    )


# -- scale-out: slices of the shard plan collected apart, then merged -------------------------


def slice_plan(store: Store, corpus_id: str, config: CollectConfig, n_slices: int) -> list[tuple[int, int]]:
    """[first, last) shard ranges of about equal tokens, one per worker."""
    index = CorpusIndex.read(store, corpus_id)
    plan = plan_shards(index.doc_tokens, config.shard_tokens)
    n_slices = max(1, min(n_slices, len(plan)))
    bounds = [round(i * len(plan) / n_slices) for i in range(n_slices + 1)]
    return list(pairwise(bounds))


def collect_slice(
    store_path: str,
    subject: SubjectModel,
    tset: TranscoderSet,
    corpus_id: str,
    transcoder_id: str,
    config: CollectConfig,
    run_id: str,
    first: int,
    last: int,
) -> str:
    """Collect shards [first, last) into a state file beside the store (one worker's share); its path.

    Workers only read the store (any number of processes may), so the merge is the only writer.
    """
    with Store(store_path, read_only=True) as store:
        index = CorpusIndex.read(store, corpus_id)
        plan = plan_shards(index.doc_tokens, config.shard_tokens)
        states = new_states(tset, index, config)
        for k in range(first, last):
            run_shard(store, subject, tset, corpus_id, index, plan[k], states, config, lambda n: None)
    key = fingerprint(config, corpus_id, transcoder_id, subject.model_id, subject.dtype)
    checkpoints = Checkpoints(Path(store_path), run_id, key)
    path = checkpoints.slice_path(first, last)
    checkpoints.write(states, path)
    return str(path)


def merge_slices(
    store: Store,
    subject: SubjectModel,
    tset: TranscoderSet,
    corpus_id: str,
    transcoder_id: str,
    config: CollectConfig,
    run_id: str,
    paths: list[str],
    seconds: float,
) -> CollectSummary:
    """Fold the slices' states together (equal to one pass over all of them) and write the run's tables."""
    index = CorpusIndex.read(store, corpus_id)
    key = fingerprint(config, corpus_id, transcoder_id, subject.model_id, subject.dtype)
    checkpoints = Checkpoints(store.path, run_id, key)
    states = None
    for path in paths:
        part = new_states(tset, index, config)
        checkpoints.read(part, Path(path))
        if states is None:
            states = part
        else:
            for layer, state in states.items():
                state.merge(part[layer])
    write_tables(store, corpus_id, index, run_id, states)
    checkpoints.clear()
    return collect_summary(store, run_id, seconds, 0)


def collect_summary(store: Store, run_id: str, seconds: float, resumed_shards: int) -> CollectSummary:
    rows = store.rows(
        "SELECT layer, status, count(*), max(n_tokens) FROM features WHERE run_id = ? GROUP BY ALL ORDER BY ALL",
        [run_id],
    )
    by_layer: dict[int, dict[str, int]] = {}
    for layer, status, count, _ in rows:
        by_layer.setdefault(layer, {"active": 0, "rare": 0, "dead": 0})[status] = count
    n_tokens = max((r[3] for r in rows), default=0)
    return CollectSummary(run_id, n_tokens, seconds, resumed_shards, by_layer)
