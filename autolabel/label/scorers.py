"""Scores of a label on held-out examples the labeler never saw.

- detection: the label and unmarked texts, half of them activating; the scorer LLM
  says which ones fire; balanced accuracy.
- fuzzing: activating texts, half marked on the truly firing tokens and half on as
  many random other tokens; the scorer says which are marked correctly; balanced accuracy.
- embedding: MiniLM embeddings of the label and of the texts; AUROC of their cosine
  similarity, activating against silent texts. No LLM call.
A scorer that cannot run is recorded with the reason, never as 0: `failed` when
it never can (too few examples, answers that do not parse), `error` when the LLM
gave no answer (a re-run asks again).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from autolabel.label.prompts import Label, json_objects, mark
from autolabel.llm import InvalidOutput, LLMClient


@dataclass
class Example:
    pieces: list[str]  # decoded tokens
    acts: list[float]

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
    status: str  # ok, failed, error
    details: dict = field(default_factory=dict)


def balanced_accuracy(truth: list[bool], said: list[bool]) -> float:
    positives = [s for t, s in zip(truth, said) if t]
    negatives = [not s for t, s in zip(truth, said) if not t]
    return (sum(positives) / len(positives) + sum(negatives) / len(negatives)) / 2


def _numbers_answer(key: str, n: int):
    """A parser for {"<key>": [numbers between 1 and n]}."""

    def parse(text: str) -> set[int]:
        for data in json_objects(text):
            values = data.get(key)
            if isinstance(values, list) and all(isinstance(v, int) and 1 <= v <= n for v in values):
                return set(values)
        raise InvalidOutput(f"no JSON object with a list {key!r} of numbers from 1 to {n}")

    return parse


def _schema(key: str, n: int) -> dict:
    """Bounded, so a grammar-constrained server cannot run past max_tokens."""
    return {"type": "json_schema", "json_schema": {"name": key, "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": [key],
        "properties": {key: {"type": "array", "maxItems": n,
                             "items": {"type": "integer", "minimum": 1, "maximum": n}}}}}}


def _ask(label: Label, task: str, texts: list[str], key: str) -> list[dict[str, str]]:
    listing = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(texts))
    return [{"role": "system", "content": "You check descriptions of features of a language model. Answer with JSON only."},
            {"role": "user", "content": f"Feature: {label.label}. {label.explanation}\n{task}\n{listing}\n"
                                        f'Answer {{"{key}": [numbers]}}.'}]


async def _llm_score(client: LLMClient, scorer: str, label: Label, texts: list[str], truth: list[bool],
                     task: str, key: str) -> Score:
    if sum(truth) == 0 or sum(truth) == len(truth):
        return Score(scorer, None, len(truth), "failed", {"reason": "needs both positive and negative items"})
    reply = await client.complete(_ask(label, task, texts, key), _numbers_answer(key, len(texts)),
                                  _schema(key, len(texts)))
    if reply.status != "ok":
        return Score(scorer, None, len(truth), "error" if reply.status == "error" else "failed",
                     {"reason": reply.error or reply.status})
    said = [i + 1 in reply.value for i in range(len(texts))]
    return Score(scorer, balanced_accuracy(truth, said), len(truth), "ok", {"truth": truth, "said": said})


async def detection(client: LLMClient, label: Label, positives: list[Example], negatives: list[Example],
                    n: int, rng: random.Random) -> Score:
    items = [(e.text, True) for e in positives[: n // 2]] + [(e.text, False) for e in negatives[: n - n // 2]]
    rng.shuffle(items)
    return await _llm_score(client, "detection", label, [t for t, _ in items], [f for _, f in items],
                            "Which of these texts contain a token the feature fires on?", "fires")


async def fuzzing(client: LLMClient, label: Label, positives: list[Example], n: int, mark_fraction: float,
                  rng: random.Random) -> Score:
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
    return await _llm_score(client, "fuzzing", label, [t for t, _ in items], [f for _, f in items],
                            "In which of these texts are the marked <<tokens>> the ones the feature fires on?",
                            "correct")


def embedding(embedder, label: Label, positives: list[Example], negatives: list[Example]) -> Score:
    from sklearn.metrics import roc_auc_score

    if not positives or not negatives:
        return Score("embedding", None, len(positives) + len(negatives), "failed",
                     {"reason": "needs activating and silent examples"})
    vectors = embedder.encode([f"{label.label}. {label.explanation}"] + [e.text for e in positives + negatives],
                              normalize_embeddings=True)
    similarity = vectors[1:] @ vectors[0]
    truth = np.array([1] * len(positives) + [0] * len(negatives))
    return Score("embedding", float(roc_auc_score(truth, similarity)), len(truth), "ok",
                 {"mean_similarity_positive": float(similarity[truth == 1].mean()),
                  "mean_similarity_negative": float(similarity[truth == 0].mean())})
