"""`autolabel graph --feature L:F`: does a feature lie on a high-influence path to the output where it fires most?

The prompts are the feature's top examples cut just after their peak token (as `autolabel intervene` cuts them;
for a feature an audit flagged, examples peaking in assistant turns first), so each graph's targets are the
tokens the model predicts right where the feature fires hardest. Per prompt:

- share: the influence on the targets of the feature's nodes (every position where it is active; prune.py) over
  the targets' total probability, 0 when it is no node of the graph. Influence is a flow from the targets,
  each node passing its share on to its sources, so the share is the part of the output that flows through
  the feature, in [0, 1] (its nodes share one layer, so no path runs from one to another);
- kept: pruning kept one of its nodes, i.e. it lies on the graph's high-influence paths to the output;
- rank: its most influential node's rank among the graph's feature nodes (1 = the most influential).

The rows go to `feature_graphs`, linked to the stored graphs, in one shard per feature together with an
`influence_share` finding beside each audit finding of the feature (graph/evidence.py), which every later
audit of the run recomputes from the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from autolabel.config import GraphConfig
from autolabel.errors import AutolabelError
from autolabel.graph.evidence import finding_rows_of
from autolabel.graph.prompts import GraphPrompt
from autolabel.graph.stage import graph_stage
from autolabel.models import SubjectModel
from autolabel.store import Store, now
from autolabel.transcoders.transcoder import TranscoderSet

STAGE = "feature_graph"
Key = tuple[int, int]


@dataclass
class PeakPrompt:
    index: int  # among the feature's prompts, in the order they are traced
    doc_id: str
    max_act: float  # the example's peak activation, as collection measured it
    token_ids: list[int]  # the example's tokens up to and including its peak
    roles: list[str]  # one per token

    def prompt(self, tokenizer) -> GraphPrompt:
        return GraphPrompt(tokenizer.decode(self.token_ids), self.token_ids, self.roles)


def peak_prompts(store: Store, run_id: str, key: Key, n: int, prefer_assistant: bool) -> list[PeakPrompt]:
    """Up to n of the feature's top examples, cut after their peak, with each token's role from the corpus."""
    rows = store.rows(
        "SELECT e.doc_id, e.role, e.tokens, e.acts, e.max_act, d.roles[e.start + 1 : e.start + len(e.tokens)] "
        "FROM examples e JOIN runs r USING (run_id) "
        "LEFT JOIN doc_tokens d ON d.corpus_id = r.corpus_id AND d.doc_id = e.doc_id "
        "WHERE e.run_id = ? AND e.layer = ? AND e.feature = ? AND e.kind = 'top' ORDER BY e.rank",
        [run_id, *key],
    )
    if prefer_assistant:
        rows.sort(key=lambda row: row[1] != "assistant")  # stable: by rank within each side
    prompts = []
    for index, (doc_id, _, tokens, acts, max_act, roles) in enumerate(rows[:n]):
        peak = max(range(len(acts)), key=acts.__getitem__)
        roles = list(roles or [])[: peak + 1]
        roles += ["unknown"] * (peak + 1 - len(roles))  # a corpus no longer in the store
        prompts.append(PeakPrompt(index, doc_id, float(max_act), list(tokens[: peak + 1]), roles))
    return prompts


def check_prompts(store: Store, run_id: str, keys: list[Key], n: int, flagged: set[Key]) -> dict[Key, list[PeakPrompt]]:
    """Every feature's prompts, or an error naming the first feature collection kept no examples of."""
    prompts = {}
    for key in keys:
        prompts[key] = peak_prompts(store, run_id, key, n, key in flagged)
        if not prompts[key]:
            raise AutolabelError(
                f"feature {key[0]}:{key[1]} has no top examples in run {run_id}, so there is no "
                f"prompt where it fires to trace; collect with examples kept (collect.top_k > 0)"
            )
    return prompts


@dataclass
class Share:
    share: float
    kept: bool
    rank: int | None  # None: not a node of the graph
    activation: float | None  # at the peak (the last position), in the graph


def feature_share(store: Store, graph_id: str, key: Key, last: int) -> Share:
    """The feature's influence share, kept flag and rank in one stored graph."""
    nodes = store.rows(
        "SELECT layer, feature, position, influence, kept, activation FROM graph_nodes "
        "WHERE graph_id = ? AND kind = 'feature'",
        [graph_id],
    )
    total = store.one("SELECT sum(probability) FROM graph_nodes WHERE graph_id = ? AND kind = 'logit'", [graph_id])[0]
    mine = [node for node in nodes if (node[0], node[1]) == key]
    if not mine:
        return Share(0.0, False, None, None)
    best = max(node[3] for node in mine)
    rank = 1 + sum(node[3] > best for node in nodes)
    at_peak = [node[5] for node in mine if node[2] == last]
    return Share(
        sum(node[3] for node in mine) / total, any(node[4] for node in mine), rank, at_peak[0] if at_peak else None
    )


def feature_graph_stage(
    store: Store,
    subject: SubjectModel,
    tset: TranscoderSet,
    transcoder_id: str,
    run_id: str,
    prompts: dict[Key, list[PeakPrompt]],
    settings: GraphConfig,
) -> list[dict]:
    """Graph each feature's prompts (stored graphs are read back) and store its `feature_graphs` rows with
    their `influence_share` findings: the rows, feature by feature."""
    written = []
    for key, peaks in prompts.items():
        rows = []
        for peak in peaks:
            summary = graph_stage(store, subject, tset, transcoder_id, peak.prompt(subject.tokenizer), settings, run_id)
            share = feature_share(store, summary.graph_id, key, len(peak.token_ids) - 1)
            rows.append(
                {
                    "run_id": run_id,
                    "layer": key[0],
                    "feature": key[1],
                    "prompt_index": peak.index,
                    "graph_id": summary.graph_id,
                    "doc_id": peak.doc_id,
                    "max_act": peak.max_act,
                    "activation": share.activation,
                    "share": share.share,
                    "kept": share.kept,
                    "rank": share.rank,
                    "created_at": now(),
                }
            )
        findings = finding_rows_of(store, run_id, key, rows)
        store.write_shard(
            run_id,
            STAGE,
            f"{key[0]}:{key[1]}",
            {"feature_graphs": rows, "audit_findings": findings},
            replace=True,
            clear={"feature_graphs": {"run_id": run_id, "layer": key[0], "feature": key[1]}},
        )
        written.extend(rows)
    return written
