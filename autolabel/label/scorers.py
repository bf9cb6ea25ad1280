"""Scores of a label on held-out examples the labeler never saw.

A small scorer model asked to sort ten texts in one hard yes/no list answers "all
of them" (every label then scores exactly 0.50), and ten texts leave ±0.15 of
noise. So each text is judged on its own, and the answer is graded: the
probability of "yes" against "no" read from the first answer token's
log-probabilities (llama.cpp and OpenAI return them; a server that does not is
read as a hard yes = 1 / no = 0). A score is the AUROC of those probabilities,
over at least `label.score_examples` texts:

- detection: held-out activating texts against silent ones, unmarked: "does the
  feature fire on a token of this text?";
- fuzzing: activating texts, half marked on the tokens that fire and half on as
  many random other tokens: "are the marked tokens the ones it fires on?";
- embedding: the cosine of MiniLM embeddings of the label and of each text,
  activating against silent texts. No LLM call.

Each score carries a 95% bootstrap interval over texts and a balanced accuracy at
a threshold fitted on one half of the texts and measured on the other. Answers
that do not tell the texts apart (the same probability for every text, "yes" to
all of them) are `degenerate`, never 0.50. A scorer that cannot run is recorded
with the reason, never as 0: `failed` when it never can (too few examples, no
yes/no in the answers), `error` when the LLM gave no answer (a re-run asks again).
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field

import numpy as np

from autolabel.label.prompts import Label, mark
from autolabel.llm import LLMClient

MIN_PER_CLASS = 3  # answered texts of each kind below which a score is not worth reporting
BOOTSTRAP = 1000  # resamples for the interval
TOP_LOGPROBS = 20  # alternatives asked for the answer token (OpenAI's maximum)

JUDGE_SYSTEM = (
    "You check descriptions of features of a language model. A feature fires on some tokens of "
    "some texts. Answer with one word: yes or no."
)
DETECTION_QUESTION = "Does the feature fire on a token of this text?"
FUZZING_QUESTION = "Are the tokens marked <<like this>> the ones the feature fires on?"


@dataclass
class Example:
    pieces: list[str]  # decoded tokens
    acts: list[float]
    role: str | None = None  # at the peak token
    category: str | None = None  # of the example's document

    @property
    def text(self) -> str:
        return "".join(self.pieces).replace("\n", "\\n")

    def marked(self, threshold: float) -> str:
        return mark(self.pieces, self.acts, threshold)


@dataclass
class Score:
    scorer: str
    value: float | None
    n: int
    status: str  # ok, degenerate, failed, error
    details: dict = field(default_factory=dict)
    ci_low: float | None = None
    ci_high: float | None = None
    accuracy: float | None = None  # balanced accuracy at a threshold fitted on the other half of the texts


def balanced_accuracy(truth: list[bool], said: list[bool]) -> float:
    positives = [s for t, s in zip(truth, said, strict=True) if t]
    negatives = [not s for t, s in zip(truth, said, strict=True) if not t]
    return (sum(positives) / len(positives) + sum(negatives) / len(negatives)) / 2


# -- graded statistics -----------------------------------------------------------------------------


def _pairwise(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """[n_pos, n_neg]: 1 where the positive ranks above the negative, 0.5 on ties; its mean is the AUROC."""
    return (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])


def auroc_interval(positive: np.ndarray, negative: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of the AUROC, resampling positives and negatives separately."""
    pairs = _pairwise(positive, negative)
    rows = rng.integers(0, len(positive), (BOOTSTRAP, len(positive)))  # [B, n_pos]
    cols = rng.integers(0, len(negative), (BOOTSTRAP, len(negative)))  # [B, n_neg]
    resampled = pairs[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))  # [B]
    low, high = np.quantile(resampled, [0.025, 0.975])
    return float(low), float(high)


def held_out_accuracy(truth: np.ndarray, graded: np.ndarray) -> float | None:
    """Balanced accuracy on the odd-indexed texts of each kind, at the threshold that is best on the
    even-indexed ones: a threshold chosen on the texts it is measured on would flatter every label."""
    fit = np.zeros(len(truth), dtype=bool)
    for kind in (True, False):
        fit[np.flatnonzero(truth == kind)[0::2]] = True
    if len(set(truth[fit])) < 2 or len(set(truth[~fit])) < 2:
        return None
    values = np.unique(graded[fit])
    candidates = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2, [values[-1] + 1]])
    best = max(candidates, key=lambda t: balanced_accuracy(list(truth[fit]), list(graded[fit] > t)))
    return float(balanced_accuracy(list(truth[~fit]), list(graded[~fit] > best)))


def graded_score(
    scorer: str, truth: list[bool], graded: list[float | None], seed: str, details: dict | None = None
) -> Score:
    """The score of graded answers (None: a text the judge gave no yes/no for)."""
    answered = [(t, g) for t, g in zip(truth, graded, strict=True) if g is not None]
    truth_array = np.array([t for t, _ in answered], dtype=bool)
    values = np.array([g for _, g in answered], dtype=float)
    details = (details or {}) | {"truth": truth, "graded": graded}
    n_pos, n_neg = int(truth_array.sum()), int((~truth_array).sum())
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        return Score(
            scorer,
            None,
            len(answered),
            "failed",
            details
            | {"reason": f"{n_pos} activating and {n_neg} other texts were answered; each needs {MIN_PER_CLASS}"},
        )
    if values.max() - values.min() < 1e-9:
        return Score(
            scorer,
            None,
            len(answered),
            "degenerate",
            details
            | {"reason": f"the same answer ({values[0]:.3g}) for every text: the judge did not tell them apart"},
        )
    positive, negative = values[truth_array], values[~truth_array]
    auroc = float(_pairwise(positive, negative).mean())
    low, high = auroc_interval(positive, negative, np.random.default_rng(_seed(seed)))
    return Score(scorer, auroc, len(answered), "ok", details, low, high, held_out_accuracy(truth_array, values))


def _seed(text: str) -> int:
    return random.Random(text).getrandbits(64)


# -- the judge -------------------------------------------------------------------------------------


def p_yes(text: str, top_logprobs: dict[str, float] | None) -> float | None:
    """P(yes) / (P(yes) + P(no)) over the answer token's alternatives (" Yes", "yes" and "YES" all count),
    else 1 / 0 from the text, else None."""
    if top_logprobs:
        mass = {"yes": 0.0, "no": 0.0}
        for token, logprob in top_logprobs.items():
            word = token.strip().lower()
            if word in mass:
                mass[word] += math.exp(logprob)
        if mass["yes"] + mass["no"] > 0:
            return mass["yes"] / (mass["yes"] + mass["no"])
    word = text.strip().lower().rstrip(".!")
    return {"yes": 1.0, "no": 0.0}.get(word)


def judge_messages(label: Label, question: str, text: str) -> list[dict[str, str]]:
    """The text comes last, so a server reuses the cached prefix across a feature's texts."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": f"Feature: {label.label}. {label.explanation}\n{question}\nText: {text}\nAnswer yes or no.",
        },
    ]


async def _judge_all(
    client: LLMClient,
    scorer: str,
    label: Label,
    question: str,
    texts: list[str],
    truth: list[bool],
    seed: str,
    details: dict | None = None,
) -> Score:
    details = details or {}
    if sum(truth) < MIN_PER_CLASS or len(truth) - sum(truth) < MIN_PER_CLASS:
        return Score(
            scorer,
            None,
            len(truth),
            "failed",
            details
            | {
                "reason": f"{sum(truth)} activating and {len(truth) - sum(truth)} other held-out texts; "
                f"each needs {MIN_PER_CLASS}"
            },
        )
    replies = await asyncio.gather(
        *(
            client.complete(judge_messages(label, question, text), str, max_tokens=1, top_logprobs=TOP_LOGPROBS)
            for text in texts
        )
    )
    failed = next((reply for reply in replies if reply.status != "ok"), None)
    if failed is not None:
        return Score(scorer, None, len(truth), "error", details | {"reason": failed.error or failed.status})
    graded = [p_yes(reply.text, reply.top_logprobs) for reply in replies]
    graded_by = "logprobs" if any(r.top_logprobs for r in replies) else "text"
    return graded_score(scorer, truth, graded, seed, details | {"graded_by": graded_by})


async def detection(
    client: LLMClient,
    label: Label,
    positives: list[Example],
    negatives: list[Example],
    n: int,
    rng: random.Random,
    details: dict | None = None,
) -> Score:
    """`negatives` in the order they are to be taken (label.negatives puts the hard ones first)."""
    items = [(e.text, True) for e in positives[: n // 2]] + [(e.text, False) for e in negatives[: n - n // 2]]
    rng.shuffle(items)
    return await _judge_all(
        client,
        "detection",
        label,
        DETECTION_QUESTION,
        [t for t, _ in items],
        [f for _, f in items],
        f"detection:{rng.random()}",
        details,
    )


async def fuzzing(
    client: LLMClient, label: Label, positives: list[Example], n: int, mark_fraction: float, rng: random.Random
) -> Score:
    items = []
    for i, example in enumerate(positives[:n]):
        threshold = mark_fraction * max(example.acts)
        if i % 2 == 0:
            items.append((example.marked(threshold), True))
            continue
        n_marked = sum(a > threshold for a in example.acts)
        others = [j for j, a in enumerate(example.acts) if a <= threshold] or list(range(len(example.acts)))
        fake = set(rng.sample(others, min(n_marked, len(others))))
        items.append((mark(example.pieces, [1.0 if j in fake else 0.0 for j in range(len(example.acts))], 0.5), False))
    rng.shuffle(items)
    return await _judge_all(
        client,
        "fuzzing",
        label,
        FUZZING_QUESTION,
        [t for t, _ in items],
        [f for _, f in items],
        f"fuzzing:{rng.random()}",
    )


def embedding(embedder, label: Label, positives: list[Example], negatives: list[Example], seed: str) -> Score:
    if len(positives) < MIN_PER_CLASS or len(negatives) < MIN_PER_CLASS:
        return Score(
            "embedding",
            None,
            len(positives) + len(negatives),
            "failed",
            {"reason": f"needs {MIN_PER_CLASS} activating and {MIN_PER_CLASS} silent examples"},
        )
    vectors = embedder.encode(
        [f"{label.label}. {label.explanation}"] + [e.text for e in positives + negatives], normalize_embeddings=True
    )
    similarity = [float(s) for s in vectors[1:] @ vectors[0]]
    truth = [True] * len(positives) + [False] * len(negatives)
    return graded_score("embedding", truth, similarity, f"embedding:{seed}")
