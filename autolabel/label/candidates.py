"""What a label is drafted from and scored on, and best-of-N: the best of several candidates kept.

The labeler sees examples of even rank (top examples and quantile samples); the
odd-ranked ones and the random silent contexts are held out for the scorers.

One small labeler draws different labels from different examples, and some of
them are far better than others. So with `label.candidates` = N > 1, N candidate
labels are drafted, each from its own subset of the even-ranked examples: the
first from the best-ranked ones (the single label's evidence), each other from a
seeded sample of as many from the same pool (a subset drawn twice is drafted
once). The held-out examples are then cut in two halves of each kind: every other
odd-ranked top example, quantile sample and random context goes to the
*selection* split, the rest to the *report* split. Each valid candidate is scored
on the selection split (candidates with the same label and explanation once, and
none when all the valid ones say the same); the
kept one is the candidate with the highest mean of its scores there, a score that
is not `ok` counting as chance (0.5: degenerate answers tell nothing apart, and a
scorer that failed failed for every candidate alike), ties going to the earlier
candidate. The kept label's stored scores come from the report split alone, which
played no part in the choice, so they are not flattered by it. `labels.candidates_json`
lists every candidate: the examples it was drafted from, its answer, its selection
scores and whether it was kept.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from autolabel.config import LabelConfig
from autolabel.label.negatives import detection_negatives, silent_stretches
from autolabel.label.prompts import Label
from autolabel.label.scorers import Example, Score, detection, embedding, fuzzing
from autolabel.llm import LLMClient

CHANCE = 0.5  # what a score that is not `ok` counts for in the choice
RULE = "highest mean of the selection scores, a score not ok counting 0.5; ties to the earlier candidate"


@dataclass
class HeldOut:
    """Texts the labeler never saw."""

    positives: list[Example]  # activating: odd-ranked top examples, then quantile samples
    random: list[Example]  # random contexts where the feature never fires


def shown_subsets(examples: dict[str, list[Example]], settings: LabelConfig, seed: str) -> list[dict[str, list[int]]]:
    """Positions in the feature's top and quantile lists of the examples each candidate is drafted from:
    the best-ranked even ranks first, then seeded samples of as many from all the even ranks."""
    pools = {"top": list(range(0, len(examples["top"]), 2)), "quantile": list(range(0, len(examples["quantile"]), 2))}
    sizes = {
        "top": min(settings.explain_top, len(pools["top"])),
        "quantile": min(settings.explain_quantile, len(pools["quantile"])),
    }
    subsets = [{kind: pool[: sizes[kind]] for kind, pool in pools.items()}]
    rng = random.Random(f"{seed}:candidates")
    for _ in range(settings.candidates - 1):
        subset = {kind: sorted(rng.sample(pool, sizes[kind])) for kind, pool in pools.items()}
        if subset not in subsets:
            subsets.append(subset)
    return subsets


def shown_examples(examples: dict[str, list[Example]], subset: dict[str, list[int]]) -> list[Example]:
    return [examples[kind][i] for kind in ("top", "quantile") for i in subset[kind]]


def held_out_splits(examples: dict[str, list[Example]], choosing: bool) -> tuple[HeldOut | None, HeldOut]:
    """(selection split, report split) of the held-out examples; with no choice to make, (None, all of them)."""
    top, quantile, silent = examples["top"][1::2], examples["quantile"][1::2], examples["random"]
    if not choosing:
        return None, HeldOut(top + quantile, silent)
    return HeldOut(top[0::2] + quantile[0::2], silent[0::2]), HeldOut(top[1::2] + quantile[1::2], silent[1::2])


async def score_label(
    client: LLMClient, embedder, label: Label, held: HeldOut, settings: LabelConfig, seed: str
) -> list[Score]:
    """Every configured scorer of one label on one set of held-out texts; detection's negatives include
    `label.hard_negatives` of silent contexts that mention the label's words (label.negatives)."""
    rng = random.Random(seed)
    n = settings.score_examples
    scores: list[Score] = []
    if "detection" in settings.scorers:
        negatives, n_hard = detection_negatives(
            label, held.random, silent_stretches(held.positives), n - n // 2, settings.hard_negatives
        )
        scores.append(await detection(client, label, held.positives, negatives, n, rng, {"hard_negatives": n_hard}))
    if "fuzzing" in settings.scorers:
        scores.append(await fuzzing(client, label, held.positives, n, settings.mark_fraction, rng))
    if "embedding" in settings.scorers and embedder is not None:
        scores.append(embedding(embedder, label, held.positives, held.random, seed))
    return scores


def selection_value(scores: list[Score]) -> float:
    """The number candidates are ranked by (RULE)."""
    values = [score.value if score.status == "ok" else CHANCE for score in scores]
    return sum(values) / len(values) if values else CHANCE


async def selection_scores(
    client: LLMClient, embedder, labels: list[Label], selection: HeldOut, settings: LabelConfig, seed: str
) -> list[list[Score]]:
    """Each label's scores on the selection split; labels alike (label and explanation) are scored once."""
    distinct = list(dict.fromkeys((label.label, label.explanation) for label in labels))
    scored = await asyncio.gather(
        *(score_label(client, embedder, Label(*key), selection, settings, f"{seed}:select") for key in distinct)
    )
    by_key = dict(zip(distinct, scored, strict=True))
    return [by_key[(label.label, label.explanation)] for label in labels]


def best(values: list[float]) -> int:
    """The index of the highest value, the earliest among equals."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_summary(scores: list[Score]) -> dict[str, dict]:
    """What candidates_json keeps of each selection score."""
    return {s.scorer: {"status": s.status, "value": s.value, "n": s.n} for s in scores}
