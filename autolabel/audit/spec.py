"""Audit specs: YAML files (the built-in one in autolabel/data/defaults/, yours anywhere) that name an audit, its
metrics and its flag thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from autolabel.config import Strict, load_yaml_model

PERVASIVE_METRICS = ("assistant_turn_share", "lift_vs_user", "lift_vs_text", "breadth")
METRICS = (*PERVASIVE_METRICS, "lift_vs_other_categories")


class AuditSpec(Strict):
    """One audit, as written in a spec YAML file."""

    name: str = Field(min_length=1)
    kind: Literal["assistant_pervasiveness"]
    description: str = ""
    metrics: list[str] = Field(default_factory=lambda: list(PERVASIVE_METRICS))
    flag: dict[str, float]  # metric -> the least its lower bound (breadth: its value) may be to flag
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    breadth_min_turns: int = Field(default=5, ge=1)
    breadth_turn_share: float = Field(default=0.2, gt=0, le=1)
    min_active_turns: int = Field(default=5, ge=1)
    template_share: float = Field(default=0.5, gt=0, le=1)
    keep: int = Field(default=200, ge=0)
    match_cosine: float = Field(default=0.7, gt=0, le=1)
    # Scope the assistant metrics to these corpus categories' assistant turns (a behaviour that shows for one
    # kind of request only); None: every category. `lift_vs_other_categories` needs a scope.
    categories: list[str] | None = Field(default=None, min_length=1)

    @field_validator("metrics")
    @classmethod
    def known_metrics(cls, metrics: list[str]) -> list[str]:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        return metrics

    @model_validator(mode="after")
    def flags_on_reported_metrics(self) -> AuditSpec:
        stray = [m for m in self.flag if m not in self.metrics]
        if stray:
            raise ValueError(
                f"flag names {', '.join(stray)}, which `metrics` does not list ({', '.join(self.metrics)})"
            )
        if self.categories is None and "lift_vs_other_categories" in self.metrics:
            raise ValueError(
                "metric lift_vs_other_categories compares `categories` with the rest; list the "
                "categories (for example `categories: [recipe]`) or drop the metric"
            )
        if self.categories is not None and "breadth" in self.metrics:
            raise ValueError(
                "metric breadth counts categories, so it means nothing for an audit scoped to "
                f"{self.categories}; drop it from `metrics` and `flag`"
            )
        return self


def load_spec(path: str | Path) -> AuditSpec:
    return load_yaml_model(
        Path(path),
        AuditSpec,
        "audit spec",
        "the built-in one is autolabel/data/defaults/assistant_pervasiveness.yaml",
        "(name, kind, metrics, flag, ...)",
        "autolabel/data/defaults/assistant_pervasiveness.yaml for a complete spec",
    )
