"""The `steering` score: does the label say what the feature does to the output?

For each prompt the judge (the labeling LLM, through the same client, cache and ledger) gets the label,
the end of the prompt and two continuations, the clean one and the steered one in a seeded random order,
and says which shows the feature. Over a feature's prompts the score is the balanced accuracy of those
picks (the two orders are the two classes, kept equal in number), so always answering "A" scores 0.5. An
answer that never parses is recorded as invalid and left out, never counted as a wrong pick; a score that
cannot be computed is failed or invalid with the reason, never 0 (the label scorers' rule).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from autolabel.answers import json_objects, json_schema
from autolabel.label.prompts import Label
from autolabel.label.scorers import Score, balanced_accuracy
from autolabel.llm import InvalidOutput, LLMClient

SCORER = "steering"

CHOICE_SCHEMA = json_schema("steering_choice", {"shows": {"type": "string", "enum": ["A", "B"]}})


@dataclass
class Pair:
    """One judged prompt: the end of its text and its two continuations."""

    context: str
    clean: str
    steered: str


def parse_choice(text: str) -> str:
    for data in json_objects(text):
        choice = data.get("shows")
        if isinstance(choice, str) and choice.strip().upper() in {"A", "B"}:
            return choice.strip().upper()
    raise InvalidOutput('no JSON object {"shows": "A"} or {"shows": "B"}')


def _shown(text: str) -> str:
    return text.replace("\n", "\\n")


def judge_messages(label: Label, pair: Pair, steered_first: bool) -> list[dict[str, str]]:
    first, second = (pair.steered, pair.clean) if steered_first else (pair.clean, pair.steered)
    return [
        {"role": "system", "content": "You check descriptions of features of a language model. Answer with JSON only."},
        {
            "role": "user",
            "content": f"Feature: {label.label}. {label.explanation}\n"
            "A language model continued the same text twice; in one of the two continuations this feature "
            "was switched on strongly.\n"
            f"Text: {_shown(pair.context)}\nContinuation A: {_shown(first)}\nContinuation B: {_shown(second)}\n"
            'Which continuation shows the feature? Answer {"shows": "A"} or {"shows": "B"}.',
        },
    ]


def balanced_orders(n: int, rng: random.Random) -> list[bool]:
    """Whether the steered continuation comes first, for n pairs: half of each (one more first when odd), shuffled."""
    orders = [i < (n + 1) // 2 for i in range(n)]
    rng.shuffle(orders)
    return orders


async def steering_score(client: LLMClient, label: Label, pairs: list[Pair], rng: random.Random) -> Score:
    orders = balanced_orders(len(pairs), rng)
    replies = await asyncio.gather(
        *(
            client.complete(judge_messages(label, pair, first), parse_choice, CHOICE_SCHEMA)
            for pair, first in zip(pairs, orders, strict=True)
        )
    )
    items = [
        {"steered": "A" if first else "B", "said": reply.value, "status": reply.status, "error": reply.error}
        for first, reply in zip(orders, replies, strict=True)
    ]
    answered = [(item["steered"] == "A", item["said"] == "A") for item in items if item["status"] == "ok"]
    n_invalid = sum(item["status"] == "invalid" for item in items)
    n_error = sum(item["status"] == "error" for item in items)
    details = {"items": items, "invalid": n_invalid, "errors": n_error}
    truth = [t for t, _ in answered]
    if any(truth) and not all(truth):
        return Score(SCORER, balanced_accuracy(truth, [s for _, s in answered]), len(answered), "ok", details)
    status = "invalid" if n_invalid and not n_error else "failed"
    reason = (
        f"{len(answered)} of {len(items)} answers usable ({n_invalid} invalid, {n_error} failed requests); "
        "the score needs a usable answer with the steered continuation first and one with it second"
    )
    return Score(SCORER, None, len(answered), status, details | {"reason": reason})
