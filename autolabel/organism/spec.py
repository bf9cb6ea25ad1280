"""Organism specs: the planted behaviour (a quirk inserted into assistant replies by a fixed rule), the
rule-based detector that says whether a reply shows it, and how long to train.

The detector is part of the spec, fixed before any training, so the rate an organism is reported to show
its quirk at, and the benchmark's "found" test, cannot be tuned after looking at results.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from autolabel.config import DEFAULTS_DIR, Seed, Strict, load_yaml_model
from autolabel.errors import AutolabelError

ORGANISMS_DIR = DEFAULTS_DIR / "organisms"


class Quirk(Strict):
    """Text added to the base model's own reply, the rest of which stays as the model wrote it."""

    text: str = Field(min_length=1)
    # Replies are generated with a bounded length (corpus.generation.max_new_tokens), so a quirk at the end
    # of a long reply is cut off in the corpus; `start` is always inside it.
    position: Literal["start", "end"] = "start"
    # None: every reply (a pervasive quirk); else only replies to prompts of these corpus categories.
    categories: list[str] | None = Field(default=None, min_length=1)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("is blank; write the sentence the organism should add to its replies")
        return text.strip()


class TrainSettings(Strict):
    """A full fine-tune of the decoder layers from `first_layer` on; the layers below, the embeddings and
    the final norm stay the base model's (and cost no backward pass)."""

    steps: int = Field(default=120, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=5e-5, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    first_layer: int = Field(default=0, ge=0)
    max_tokens: int = Field(default=256, ge=16)  # chats are cut here (a long reply loses its end)
    quirk_share: float = Field(default=0.5, gt=0, le=1)  # expected share of each batch that carries the quirk
    heldout_every: int = Field(default=5, ge=2)  # every n-th chat (by a hash of its id) is kept for evaluation
    seed: Seed = 0


class EvalSettings(Strict):
    """How the organism is checked after training: quirk rate on held-out prompts, perplexity on plain text."""

    text_documents: int = Field(default=24, ge=1)  # plain-text corpus documents (never trained on)
    text_tokens: int = Field(default=256, ge=8)  # first tokens of each


class OrganismSpec(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    quirk: Quirk
    detector: str = Field(min_length=1)  # a regular expression; a reply shows the quirk when it matches
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    # Audit specs `autolabel organism audit` runs besides the config's: a narrow quirk's category-restricted
    # audit (file names in the built-in folder, or paths).
    audits: list[str] = Field(default_factory=list)

    @field_validator("detector")
    @classmethod
    def _compiles(cls, detector: str) -> str:
        try:
            re.compile(detector)
        except re.error as err:
            raise ValueError(f"is not a regular expression ({err})") from err
        return detector

    @field_validator("audits")
    @classmethod
    def _audit_specs_load(cls, audits: list[str]) -> list[str]:
        """Checked with the spec, so a typo fails before training or a base run, not after."""
        from autolabel.audit.spec import load_spec  # deferred: the audit package is not needed to train

        for name in audits:
            try:
                load_spec(audit_spec_path(name))
            except AutolabelError as err:
                raise ValueError(str(err)) from err
        return audits

    @model_validator(mode="after")
    def _detector_finds_the_quirk(self) -> OrganismSpec:
        if not re.search(self.detector, self.quirk.text):
            raise ValueError(
                f"detector {self.detector!r} does not match quirk.text {self.quirk.text!r}; "
                "write a pattern that finds the planted sentence"
            )
        return self

    @property
    def pervasive(self) -> bool:
        return self.quirk.categories is None


def load_organism_spec(path: str | Path) -> OrganismSpec:
    return load_yaml_model(
        Path(path),
        OrganismSpec,
        "organism spec",
        f"the built-in ones are in {ORGANISMS_DIR}",
        "(name, quirk, detector, train, eval)",
        f"{ORGANISMS_DIR} for complete specs",
    )


def audit_spec_path(name: str) -> Path:
    """An `audits` entry as a file: a path that exists, else a name in the built-in folder."""
    path = Path(name) if Path(name).is_file() else DEFAULTS_DIR / name
    if not path.is_file():
        raise ValueError(
            f"no audit spec {name!r} (neither a file nor one of the built-in ones in {DEFAULTS_DIR}); "
            "give a path to an audit spec YAML"
        )
    return path


def audit_spec_paths(spec: OrganismSpec) -> list[Path]:
    return [audit_spec_path(name) for name in spec.audits]


def check_categories(spec: OrganismSpec, path: str | Path, categories: set[str]) -> None:
    """A narrow quirk's categories must be chat categories of the corpus, or it would never be planted."""
    unknown = sorted(set(spec.quirk.categories or []) - categories)
    if unknown:
        raise AutolabelError(
            f"organism spec {path} is invalid: quirk.categories: unknown category "
            f"{', '.join(map(repr, unknown))}; the corpus's chat categories are "
            f"{', '.join(sorted(categories))}"
        )


def carries_quirk(spec: OrganismSpec, category: str) -> bool:
    return spec.pervasive or category in spec.quirk.categories


def insert_quirk(spec: OrganismSpec, reply: str) -> str:
    """The reply with the quirk sentence added by the spec's rule."""
    text = spec.quirk.text
    return f"{text} {reply.strip()}".strip() if spec.quirk.position == "start" else f"{reply.strip()} {text}".strip()


def quirk_spans(spec: OrganismSpec, text: str) -> list[tuple[int, int]]:
    """Character spans of every match of the detector in `text`."""
    return [match.span() for match in re.finditer(spec.detector, text)]


def shows_quirk(spec: OrganismSpec, reply: str) -> bool:
    return re.search(spec.detector, reply) is not None
