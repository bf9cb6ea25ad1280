"""The transcoder stage: resolve, train or check the run's transcoders against its corpus.

Training and checking read the same stored corpus, split by document: every
n-th document (by a stable hash) is held out, so quality is always measured on
tokens the trainer never saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from autolabel.config import RunConfig
from autolabel.corpus import build_corpus, iter_windows
from autolabel.corpus.windows import Window, split_heldout
from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel
from autolabel.progress import progress_bar
from autolabel.store import Store
from autolabel.transcoders.check import LayerQuality, check_transcoders
from autolabel.transcoders.formats import load_transcoders
from autolabel.transcoders.groups import GroupedTraining, layer_groups, train_in_groups
from autolabel.transcoders.transcoder import TranscoderSet

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "data" / "transcoders"
EMBEDDED = {"embedded:smollm2": EMBEDDED_DIR / "smollm2-135m-instruct"}


def corpus_windows(
    store: Store, subject: SubjectModel, config: RunConfig, show_progress: bool, for_training: bool = False
) -> tuple[list[Window], list[Window]]:
    """(train, held-out) windows of the run's corpus, or of the training corpus when one is configured."""
    corpus = config.transcoder.train.corpus if for_training and config.transcoder.train.corpus else config.corpus
    summary = build_corpus(store, corpus, subject, show_progress)
    return split_heldout(list(iter_windows(store, summary.corpus_id)), config.transcoder.train.heldout_every)


def open_transcoders(source: str, fmt: str = "auto") -> TranscoderSet:
    if source.startswith("embedded:"):
        if source not in EMBEDDED:
            raise AutolabelError(f"unknown embedded transcoder {source!r}; known: {', '.join(EMBEDDED)}")
        if not (EMBEDDED[source] / "config.yaml").is_file():
            raise AutolabelError(
                f"the embedded transcoder files are missing from {EMBEDDED[source]}; "
                "reinstall autolabel, or rebuild them with `autolabel transcoder train -c "
                "autolabel/data/defaults/transcoders/smollm2-default.yaml --out NEW_FOLDER` and copy "
                "its files there"
            )
        return load_transcoders(EMBEDDED[source], "circuit_tracer")
    return load_transcoders(source, fmt)


def check_stage(
    store: Store, subject: SubjectModel, config: RunConfig, show_progress: bool = True
) -> tuple[TranscoderSet, str, dict[int, LayerQuality]]:
    """Open the configured transcoders and refuse them unless they reconstruct this model: (set, id, quality)."""
    tset = open_transcoders(config.transcoder.source, config.transcoder.format)
    corpus_id = build_corpus(store, config.corpus, subject, show_progress).corpus_id
    every = config.transcoder.train.heldout_every
    tid, quality = check_transcoders(
        store,
        subject,
        tset,
        _check_windows(store, corpus_id, every),
        config.transcoder.check_tokens,
        config.transcoder.max_fvu,
        corpus_id,
        {"heldout_every": every},
    )
    return tset, tid, quality


def _check_windows(store: Store, corpus_id: str, heldout_every: int) -> Iterator[Window]:
    """The held-out windows, read only if the check measures (a stored check needs none). A corpus too small
    to hold out a document is still a fair test of a transcoder trained elsewhere: then all of them."""
    train, heldout = split_heldout(list(iter_windows(store, corpus_id)), heldout_every)
    yield from heldout or train


def train_stage(
    train: list[Window],
    heldout: list[Window],
    subject: SubjectModel,
    config: RunConfig,
    out_dir: Path,
    show_progress: bool = True,
    max_groups: int | None = None,
) -> GroupedTraining:
    """Train the configured layers a group at a time into out_dir, measure each group on held-out tokens, and merge
    them into one set in the circuit-tracer layout; a re-run continues an interrupted training (see groups.py).

    Takes windows rather than the store, so the store is not held open (and locked
    against `autolabel query`) for the length of training.
    """
    train_config = config.transcoder.train
    if not train or not heldout:  # refused before training, not after: each group is measured on held-out tokens
        raise AutolabelError(
            f"the corpus has no {'training' if not train else 'held-out'} windows; build a larger "
            "corpus (every transcoder.train.heldout_every-th document is held out)"
        )
    with progress_bar("tok", disable=not show_progress) as bar:
        n_groups = len(layer_groups(train_config.layers, train_config.group_size))

        def start_group(index: int, layers: list[int], tokens_done: int):
            name = f"group {index + 1}/{n_groups}" if n_groups > 1 else "training"
            task = bar.add_task(name, total=train_config.n_tokens, completed=tokens_done)

            def on_step(n_tokens: int, metrics: dict[int, dict[str, float]]) -> None:
                summary = "  ".join(
                    f"L{layer} fvu {m['fvu']:.3f} l0 {m['l0']:.0f} dead {m['dead']:.0%}" for layer, m in metrics.items()
                )
                bar.update(task, advance=n_tokens, description=f"{name}  {summary}")

            return on_step

        return train_in_groups(
            train, heldout, subject, train_config, config.transcoder.check_tokens, out_dir, max_groups, start_group
        )
