"""Causal checks: ablate and steer transcoder features on real prompts and measure what the output does."""

from autolabel.intervene.evidence import Effect, ablation_effects
from autolabel.intervene.stage import InterveneSummary, intervene_stage
from autolabel.intervene.targets import flagged_features

__all__ = ["Effect", "InterveneSummary", "ablation_effects", "flagged_features", "intervene_stage"]
