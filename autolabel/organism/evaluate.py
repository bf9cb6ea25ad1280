"""How an organism is checked: how often it shows its quirk on prompts it never trained on (the spec's
detector on its greedy replies, next to the base model's replies to the same prompts), and whether it
still models ordinary text (perplexity on plain-text documents, against the base model)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from autolabel.config import GenerationConfig
from autolabel.corpus.documents import Document
from autolabel.corpus.generate import add_assistant_replies
from autolabel.models import SubjectModel
from autolabel.organism.data import prompt_of
from autolabel.organism.spec import OrganismSpec, carries_quirk, shows_quirk
from autolabel.store import Store


@dataclass
class QuirkRates:
    """Shares of held-out replies the detector matches: `target` prompts are those whose category carries
    the quirk (all of them for a pervasive quirk), `other` the rest (none for a pervasive quirk)."""

    target_prompts: int
    target_rate: float | None
    base_target_rate: float | None
    other_prompts: int
    other_rate: float | None
    base_other_rate: float | None


def share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def quirk_rates(
    store: Store,
    organism: SubjectModel,
    spec: OrganismSpec,
    heldout: list[Document],
    generation: GenerationConfig,
    show_progress: bool = True,
) -> QuirkRates:
    """`heldout` chats end on the base model's reply; the organism answers their prompts with the corpus's
    generation settings, so its replies land in the cache the organism's corpus build reads."""
    prompts = [prompt_of(document) for document in heldout]
    add_assistant_replies(store, organism, prompts, generation, show_progress)
    target = [carries_quirk(spec, d.category) for d in heldout]
    organism_hits = [shows_quirk(spec, p.messages[-1].content) for p in prompts]
    base_hits = [d.messages[-1].role == "assistant" and shows_quirk(spec, d.messages[-1].content) for d in heldout]

    def pick(hits: list[bool], want: bool) -> list[bool]:
        return [hit for hit, is_target in zip(hits, target, strict=True) if is_target == want]

    return QuirkRates(
        sum(target),
        share(pick(organism_hits, True)),
        share(pick(base_hits, True)),
        len(target) - sum(target),
        share(pick(organism_hits, False)),
        share(pick(base_hits, False)),
    )


def perplexity(mean_nll: float | None) -> float | None:
    return math.exp(mean_nll) if mean_nll is not None else None
