"""Streaming collection of top-activating examples and role-aware statistics per feature."""

from autolabel.collect.stage import CollectSummary, collect_stage

__all__ = ["CollectSummary", "collect_stage"]
