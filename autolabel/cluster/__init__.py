"""The cluster stage: feature map, named clusters and audit groups (see stage.py)."""

from autolabel.cluster.stage import ClusterSummary, cluster_stage

__all__ = ["ClusterSummary", "cluster_stage"]
