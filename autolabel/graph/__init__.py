"""Attribution graphs for a prompt over the transcoder features, with autolabel's labels on the nodes."""

from autolabel.graph.stage import GraphSummary, graph_stage

__all__ = ["GraphSummary", "graph_stage"]
