"""`autolabel graph`: the prompt, the model and transcoders (a run's own, or the config's), the settings.

Every input is checked before the store is opened for writing: the prompt or chat file, the options, the
prompt's length against the model's context, the transcoders' shapes against the model. A bad one is one
AutolabelError and nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from autolabel.config import RunConfig
from autolabel.errors import AutolabelError
from autolabel.graph.export import circuit_tracer_graph, feature_labels, token_text
from autolabel.graph.feature import Key, check_prompts, feature_graph_stage
from autolabel.graph.prompts import chat_prompt, check_length, read_chat, require_text, text_prompt
from autolabel.graph.replacement import layout
from autolabel.graph.stage import GraphSummary, graph_stage
from autolabel.intervene.targets import audit_features, check_features, flagged_features
from autolabel.pipeline import collected_run, subject_model, transcoders
from autolabel.store import Store
from autolabel.transcoders.check import transcoder_id


@dataclass
class GraphResult:
    summary: GraphSummary
    run_id: str | None
    top: list[dict]  # the most influential kept feature nodes, with their labels
    targets: list[dict]  # the target logits
    exported: Path | None


def graph_run(
    config: RunConfig,
    text: str | None,
    chat: Path | None,
    run_id: str | None = None,
    json_out: Path | None = None,
    top: int = 20,
) -> GraphResult:
    """Build (or read back) the graph of one prompt or chat; with `run_id`, on that run's model and transcoders
    and with its labels on the nodes."""
    if (text is None) == (chat is None):
        raise AutolabelError("pass either a PROMPT or --chat FILE (one of them)")
    chat_document = read_chat(chat) if chat is not None else None
    if text is not None:
        require_text(text)
    model, transcoder = config.model, config.transcoder
    if run_id is not None:
        with Store(config.store, create=False) as store:
            run_id, stored = collected_run(store, run_id)
        model, transcoder = stored.model, stored.transcoder
    subject = subject_model(model.source, config.cache_dir, "float32")
    prompt = chat_prompt(subject.tokenizer, chat_document) if chat_document else text_prompt(subject.tokenizer, text)
    check_length(prompt, subject.model.config.max_position_embeddings)
    tset = transcoders(transcoder.source, transcoder.format)
    layout(subject, tset)  # refuses a transcoder set made for another model before anything is written
    with Store(config.store, create=run_id is None) as store:
        summary = graph_stage(store, subject, tset, transcoder_id(tset), prompt, config.graph, run_id)
        labels = feature_labels(store, run_id)
        top_nodes = store.dicts(
            "SELECT node_id, layer, position, feature, activation, influence FROM graph_nodes "
            "WHERE graph_id = ? AND kind = 'feature' AND kept ORDER BY influence DESC, node_id "
            "LIMIT ?",
            [summary.graph_id, top],
        )
        targets = store.dicts(
            "SELECT token_id, probability FROM graph_nodes WHERE graph_id = ? AND kind = 'logit' "
            "ORDER BY probability DESC",
            [summary.graph_id],
        )
        if json_out is not None:
            exported = circuit_tracer_graph(store, summary.graph_id, subject.tokenizer, labels)
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(exported, ensure_ascii=False, indent=1), encoding="utf-8")
    for node in top_nodes:
        node |= labels.get((node["layer"], node["feature"]), {})
        node["token"] = token_text(subject.tokenizer, prompt.token_ids[node["position"]])
    for target in targets:
        target["token"] = token_text(subject.tokenizer, target["token_id"])
    return GraphResult(summary, run_id, top_nodes, targets, json_out)


def summary_rows(result: GraphResult) -> tuple[list[str], list[tuple]]:
    """The command's table: the most influential kept features, labeled where the run has labels."""
    columns = ["node", "position", "activation", "influence", "label", "score"]
    rows = []
    for node in result.top:
        score = (
            "-"
            if node.get("score") is None
            else f"{node['score']:.2f}" + (" unreliable" if node.get("unreliable") else "")
        )
        rows.append(
            (
                f"L{node['layer']}:{node['feature']}",
                f"{node['position']} {node['token']!r}",
                f"{node['activation']:.2f}",
                f"{node['influence']:.4f}",
                node.get("label") or "-",
                score,
            )
        )
    return columns, rows


@dataclass
class FeatureResult:
    run_id: str
    rows: list[dict]  # feature_graphs rows, feature by feature, with the label, the peak token and the top target


def feature_run(
    config: RunConfig, run_id: str | None, features: list[Key] | None, audit: str | None, prompts: int, limit: int
) -> FeatureResult:
    """Trace `features`, or the best-ranked `limit` flagged features of `audit`, on their top `prompts` examples
    each. Features, layers and examples are checked before anything is written."""
    with Store(config.store, create=False) as store:
        run_id, stored = collected_run(store, run_id)
        tset = transcoders(stored.transcoder.source, stored.transcoder.format)
        keys = features or audit_features(store, run_id, audit, limit)
        check_features(store, run_id, tset, keys)
        flagged = {key for keys in flagged_features(store, run_id).values() for key in keys}
        peaks = check_prompts(store, run_id, keys, prompts, flagged)
        subject = subject_model(stored.model.source, config.cache_dir, "float32")
        layout(subject, tset)
        rows = feature_graph_stage(store, subject, tset, transcoder_id(tset), run_id, peaks, config.graph)
        labels = feature_labels(store, run_id)
        targets = dict(
            store.rows(
                "SELECT graph_id, arg_max(token_id, probability) FROM graph_nodes WHERE kind = "
                "'logit' AND list_contains(?, graph_id) GROUP BY ALL",
                [[r["graph_id"] for r in rows]],
            )
        )
    peak_of = {(key, peak.index): peak for key, traced in peaks.items() for peak in traced}
    for row in rows:
        key = (row["layer"], row["feature"])
        row["label"] = labels.get(key, {}).get("label")
        row["peak"] = token_text(subject.tokenizer, peak_of[key, row["prompt_index"]].token_ids[-1])
        row["target"] = token_text(subject.tokenizer, targets[row["graph_id"]])
    return FeatureResult(run_id, rows)


def feature_rows(result: FeatureResult) -> tuple[list[str], list[tuple]]:
    """The command's table: one row per (feature, prompt)."""
    columns = ["feature", "prompt", "peak token", "top target", "share", "rank", "on path", "label"]
    rows = [
        (
            f"L{row['layer']}:{row['feature']}",
            row["prompt_index"],
            repr(row["peak"]),
            repr(row["target"]),
            f"{row['share']:.3f}",
            row["rank"] or "-",
            "yes" if row["kept"] else "no",
            row["label"] or "-",
        )
        for row in result.rows
    ]
    return columns, rows
