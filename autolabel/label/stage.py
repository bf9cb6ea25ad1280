"""`autolabel label`: draft a label per feature with an LLM and score it on held-out examples.

The labeler sees the even-ranked top examples and some quantile samples; the
odd-ranked top examples, the other quantile samples and the random (silent)
contexts are held out for the scorers (label.candidates: which ones, and
best-of-N; label.negatives: detection's harder negatives; label.evidence: what
the labeler sees). Features are labeled in shards, each
written in one transaction with its scores. The labels table says what is done:
a re-run asks again for the features still unlabeled and for those that failed
for want of an answer (status `error`: an outage, a server that answered with
garbage, a surprise in one feature's requests, also in a score), and with
`retry_invalid` for those whose answers never parsed. The response cache makes
everything else free, and a finished run's re-run sends no request.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from autolabel.cluster.embed import load_embedder
from autolabel.config import LabelConfig, RunConfig
from autolabel.errors import AutolabelError
from autolabel.feature_filter import live_features
from autolabel.label.candidates import (
    RULE,
    best,
    held_out_splits,
    score_label,
    score_summary,
    selection_scores,
    selection_value,
    shown_examples,
    shown_subsets,
)
from autolabel.label.evidence import Key, feature_evidence, output_tokens, read_examples
from autolabel.label.prompts import (
    LABEL_SCHEMA,
    Evidence,
    Label,
    around_peak,
    explain_messages,
    firing_tokens,
    parse_label,
    tagged,
)
from autolabel.label.scorers import Example, Score
from autolabel.llm import BudgetExhausted, LLMClient, Reply, labeler_id, open_client
from autolabel.models import SubjectModel
from autolabel.progress import progress_bar
from autolabel.store import Store, now, to_json
from autolabel.transcoders.transcoder import TranscoderSet

STAGE = "label"


@dataclass
class LabelSummary:
    run_id: str
    by_status: dict[str, int]  # ok / invalid / error / skipped -> features
    unreliable: int
    calls: int
    cost_usd: float
    seconds: float
    stopped: str | None  # why the run stopped early (a budget), if it did


def select_features(store: Store, run_id: str, config: RunConfig) -> list[tuple[int, int, int]]:
    """(layer, feature, n_top_examples) of the features to label: densest first, or an audit's best ranked first."""
    settings = config.label
    check_selection_exists(store, run_id, settings)
    where, params = live_features(run_id, settings.layers, settings.features)
    if settings.audit is not None:
        if not store.one(
            "SELECT count(*) FROM audit_findings WHERE run_id = ? AND audit = ?", [run_id, settings.audit]
        )[0]:
            raise AutolabelError(
                f"run {run_id} has no findings of audit {settings.audit!r}; run `autolabel audit --run {run_id}` first"
            )
        where.append(
            "(f.layer, f.feature) IN (SELECT (layer, feature) FROM audit_findings "
            "WHERE run_id = f.run_id AND audit = ? AND flagged)"
        )
        params.append(settings.audit)
    rows = store.rows(
        "SELECT f.layer, f.feature, count(e.rank) FROM features f LEFT JOIN examples e ON e.run_id = f.run_id "
        "AND e.layer = f.layer AND e.feature = f.feature AND e.kind = 'top' "
        f"WHERE {' AND '.join(where)} GROUP BY ALL ORDER BY any_value(f.density) DESC, 1, 2",
        params,
    )
    if settings.audit is not None:  # an audit's candidates come best ranked first
        ranks = {
            (layer, feature): rank
            for layer, feature, rank in store.rows(
                "SELECT layer, feature, min(rank) FROM audit_findings WHERE run_id = ? AND audit = ? GROUP BY ALL",
                [run_id, settings.audit],
            )
        }
        rows.sort(key=lambda row: ranks[row[0], row[1]])
    return rows[: settings.limit] if settings.limit else rows


def check_selection_exists(store: Store, run_id: str, settings: LabelConfig) -> None:
    """Layers or features the run does not have are a mistake to name, not a selection of nothing."""
    n_features = dict(store.rows("SELECT layer, max(feature) + 1 FROM features WHERE run_id = ? GROUP BY 1", [run_id]))
    if not n_features:
        raise AutolabelError(f"run {run_id} has no collected features; run `autolabel collect` first")
    missing = sorted(set(settings.layers or []) - n_features.keys())
    if missing:
        raise AutolabelError(
            f"run {run_id} has no layer {', '.join(map(str, missing))}; pick --layers from "
            f"the layers it has: {', '.join(map(str, sorted(n_features)))}"
        )
    size = max(n_features[layer] for layer in settings.layers or n_features)
    beyond = sorted(f for f in settings.features or [] if not 0 <= f < size)
    if beyond:
        raise AutolabelError(
            f"run {run_id} has no feature {', '.join(map(str, beyond))}; pick --features from 0 to {size - 1}"
        )


@dataclass
class Draft:
    """One candidate label and what it was drafted from."""

    subset: dict[str, list[int]]  # positions in the feature's top and quantile lists (candidates.shown_subsets)
    prompt_hash: str
    reply: Reply[Label]


async def draft_label(
    client: LLMClient,
    shown: list[Example],
    subset: dict[str, list[int]],
    evidence: Evidence,
    settings: LabelConfig,
    refresh: bool,
) -> Draft:
    windows = [around_peak(example.pieces, example.acts, settings.context_tokens) for example in shown]
    marked = []
    for example, (pieces, acts) in zip(shown, windows, strict=True):
        text = Example(pieces, acts).marked(settings.mark_fraction * max(acts))
        marked.append(tagged(example.role, example.category, text) if settings.role_evidence else text)
    tokens = firing_tokens(windows, settings.mark_fraction) if settings.token_evidence else ""
    messages = explain_messages(marked, evidence, tokens)
    prompt_hash = hashlib.sha256(to_json(messages).encode()).hexdigest()
    return Draft(subset, prompt_hash, await client.complete(messages, parse_label, LABEL_SCHEMA, refresh=refresh))


async def label_feature(
    client: LLMClient,
    embedder,
    layer: int,
    feature: int,
    examples: dict[str, list[Example]],
    evidence: Evidence,
    config: RunConfig,
    run_id: str,
    refresh: bool = False,
) -> tuple[dict, list[dict]]:
    """One feature: (labels row, scores rows). `refresh` asks for a label past the cached answers.
    With several candidates (label.candidates), the best on the selection split is kept and scored on the
    report split; a candidate or selection score that got no answer makes the feature `error` (asked again)."""
    settings = config.label
    seed = f"{settings.seed}:{layer}:{feature}"
    subsets = shown_subsets(examples, settings, seed)
    drafts = await asyncio.gather(
        *(
            draft_label(client, shown_examples(examples, subset), subset, evidence, settings, refresh)
            for subset in subsets
        )
    )
    selection, report = held_out_splits(examples, len(drafts) > 1)
    row = {
        "run_id": run_id,
        "layer": layer,
        "feature": feature,
        "labeler": client.model_id,
        "label": None,
        "explanation": None,
        "prompt_hash": drafts[0].prompt_hash,
        "status": drafts[0].reply.status,
        "error": drafts[0].reply.error,
        "created_at": now(),
        "candidates_json": None,
    }
    unanswered = next((d for d in drafts if d.reply.status == "error"), None)
    valid = [i for i, d in enumerate(drafts) if d.reply.value is not None]
    if unanswered is not None or not valid:
        return row | ({"status": "error", "error": unanswered.reply.error} if unanswered else {}), []
    kept, chosen = valid[0], {}
    if (
        selection is not None
        and len({(d.reply.value.label, d.reply.value.explanation) for d in drafts if d.reply.value}) > 1
    ):
        scores = await selection_scores(
            client, embedder, [drafts[i].reply.value for i in valid], selection, settings, seed
        )
        failed = next(
            ((i, s) for i, found in zip(valid, scores, strict=True) for s in found if s.status == "error"), None
        )
        if failed is not None:
            i, score = failed
            return row | {
                "status": "error",
                "error": f"candidate {i}'s {score.scorer} score on the selection split "
                f"got no answer: {score.details.get('reason')}",
            }, []
        chosen = dict(zip(valid, scores, strict=True))
        kept = valid[best([selection_value(found) for found in scores])]
    label = drafts[kept].reply.value
    row |= {
        "label": label.label,
        "explanation": label.explanation,
        "prompt_hash": drafts[kept].prompt_hash,
        "status": "ok",
        "error": None,
    }
    if len(drafts) > 1:
        row["candidates_json"] = to_json(candidates_record(drafts, chosen, kept))
    scores = await score_label(client, embedder, label, report, settings, seed)
    return row, [
        score_row(run_id, layer, feature, client.model_id, score, settings.unreliable_below) for score in scores
    ]


def candidates_record(drafts: list[Draft], chosen: dict[int, list[Score]], kept: int) -> dict:
    """labels.candidates_json: the rule, and per candidate what it was drafted from, its answer, its
    selection scores (none when it was the only valid one) and whether it was kept."""
    return {
        "rule": RULE,
        "candidates": [
            {
                "shown": d.subset,
                "prompt_hash": d.prompt_hash,
                "status": d.reply.status,
                "error": d.reply.error,
                "label": d.reply.value.label if d.reply.value else None,
                "explanation": d.reply.value.explanation if d.reply.value else None,
                "selection": score_summary(chosen.get(i, [])),
                "selection_value": selection_value(chosen[i]) if i in chosen else None,
                "kept": i == kept,
            }
            for i, d in enumerate(drafts)
        ],
    }


def score_row(run_id: str, layer: int, feature: int, labeler: str, score: Score, unreliable_below: float) -> dict:
    """A `scores` row: the score of `labeler`'s label; unreliable when its value is under the bar."""
    return {
        "run_id": run_id,
        "layer": layer,
        "feature": feature,
        "labeler": labeler,
        "scorer": score.scorer,
        "value": score.value,
        "n": score.n,
        "status": score.status,
        "details_json": to_json(score.details),
        "ci_low": score.ci_low,
        "ci_high": score.ci_high,
        "accuracy": score.accuracy,
        "unreliable": score.value is not None and score.value < unreliable_below,
    }


def labeled(store: Store, run_id: str, labeler: str, statuses: list[str]) -> set[Key]:
    """Features whose label by `labeler` has one of `statuses` and no score left without an answer."""
    return set(
        store.rows(
            "SELECT layer, feature FROM labels l WHERE run_id = ? AND labeler = ? AND status IN (SELECT unnest(?)) "
            "AND NOT EXISTS (SELECT 1 FROM scores s WHERE s.run_id = l.run_id AND s.layer = l.layer "
            "AND s.feature = l.feature AND s.labeler = l.labeler AND s.status = 'error')",
            [run_id, labeler, statuses],
        )
    )


def plan_labels(store: Store, run_id: str, config: RunConfig) -> tuple[list[tuple[str, list[Key]]], list[Key]]:
    """(shard name, features) of every shard still to label, and the features skipped for too few examples.
    A shard is named by its first feature; a later run's shard of the same name rewrites it."""
    selected = select_features(store, run_id, config)
    labeler = labeler_id(config.llm)
    done = labeled(store, run_id, labeler, ["ok"] if config.label.retry_invalid else ["ok", "invalid"])
    todo = [
        (layer, feature)
        for layer, feature, n_top in selected
        if n_top >= config.label.min_examples and (layer, feature) not in done
    ]
    size = config.label.features_per_shard
    shards = [todo[i : i + size] for i in range(0, len(todo), size)]
    plan = [(f"{labeler}:{shard[0][0]}:{shard[0][1]}", shard) for shard in shards]
    return plan, [(layer, feature) for layer, feature, n_top in selected if n_top < config.label.min_examples]


def unlabeled_row(run_id: str, config: RunConfig, key: Key, status: str, error: str) -> dict:
    """Every column a label row has: the store takes a shard's columns from its first row."""
    layer, feature = key
    return {
        "run_id": run_id,
        "layer": layer,
        "feature": feature,
        "labeler": labeler_id(config.llm),
        "label": None,
        "explanation": None,
        "prompt_hash": None,
        "status": status,
        "error": error,
        "created_at": now(),
        "candidates_json": None,
    }


def skipped_rows(run_id: str, config: RunConfig, skipped: list[Key]) -> list[dict]:
    return [
        unlabeled_row(run_id, config, key, "skipped", f"fewer than {config.label.min_examples} top examples")
        for key in skipped
    ]


async def label_shard(
    client: LLMClient,
    embedder,
    store: Store,
    tokenizer,
    outputs: dict,
    shard: list[Key],
    config: RunConfig,
    run_id: str,
) -> tuple[dict[str, list[dict]], BudgetExhausted | None]:
    """Label and score one shard's features at once: (labels and scores rows, the budget that stopped it).
    A feature whose requests raised what nothing foresaw gets an `error` row with the exception; the
    others finish and are kept. A feature the budget stopped gets no row, so a resume asks again."""
    examples = {key: read_examples(store, run_id, *key, tokenizer) for key in shard}
    evidence = feature_evidence(store, run_id, shard, outputs, config.label)
    refresh = labeled(store, run_id, client.model_id, ["invalid"]) if config.label.retry_invalid else set()
    results = await asyncio.gather(
        *(
            label_feature(
                client,
                embedder,
                layer,
                feature,
                examples[(layer, feature)],
                evidence[(layer, feature)],
                config,
                run_id,
                (layer, feature) in refresh,
            )
            for layer, feature in shard
        ),
        return_exceptions=True,
    )
    tables: dict[str, list[dict]] = {"labels": [], "scores": []}
    for key, result in zip(shard, results, strict=True):
        if isinstance(result, BudgetExhausted):
            continue
        if isinstance(result, Exception):
            tables["labels"].append(unlabeled_row(run_id, config, key, "error", f"{type(result).__name__}: {result}"))
        elif isinstance(result, BaseException):  # an interrupt stops the run
            raise result
        else:
            tables["labels"].append(result[0])
            tables["scores"].extend(result[1])
    return tables, next((r for r in results if isinstance(r, BudgetExhausted)), None)


def open_plan(store: Store, run_id: str, config: RunConfig) -> list[tuple[str, list[Key]]]:
    """The shards still to label (plan_labels), once the features with too few examples are recorded as skipped."""
    plan, skipped = plan_labels(store, run_id, config)
    store.upsert("labels", skipped_rows(run_id, config, skipped))
    return plan


def commit_shard(store: Store, run_id: str, name: str, rows: dict[str, list[dict]], stopped: bool) -> None:
    """Write one labeled shard: the LLM cache and ledger rows a worker buffered (none in one process, where the
    client writes them as it goes), then its labels and scores, recorded as a committed shard unless the budget
    stopped it: that shard stays open, and a resume plans its missing features again."""
    for table in ("llm_cache", "llm_calls"):
        store.upsert(table, rows.get(table, []))
    tables = {"labels": rows["labels"], "scores": rows["scores"]}
    if not stopped:
        store.write_shard(run_id, STAGE, name, tables, replace=True)
        return
    for table, table_rows in tables.items():
        store.upsert(table, table_rows)


def label_stage(
    store: Store, subject: SubjectModel, tset: TranscoderSet, run_id: str, config: RunConfig, show_progress: bool = True
) -> LabelSummary:
    started = time.perf_counter()
    plan = open_plan(store, run_id, config)
    todo = [key for _, shard in plan for key in shard]
    outputs = output_tokens(subject, tset, todo, config.label.output_tokens)
    embedder = load_embedder() if "embedding" in config.label.scorers else None

    async def run_shards(client: LLMClient, advance: Callable[[int], None]) -> str | None:
        """Every open shard, in one event loop (the HTTP client's connections belong to it)."""
        for name, shard in plan:
            tables, budget = await label_shard(
                client, embedder, store, subject.tokenizer, outputs, shard, config, run_id
            )
            commit_shard(store, run_id, name, tables, budget is not None)
            if budget is not None:  # what finished is kept; a resume plans the rest
                return str(budget)
            advance(len(shard))
        return None

    with (
        open_client(store, config.llm, run_id, STAGE) as client,
        progress_bar("features", disable=not show_progress) as bar,
    ):
        task = bar.add_task("labeling", total=len(todo))
        stopped = asyncio.run(run_shards(client, lambda n: bar.advance(task, n)))
    return label_summary(store, run_id, config, client.calls, client.cost_usd, time.perf_counter() - started, stopped)


def label_summary(
    store: Store, run_id: str, config: RunConfig, calls: int, cost_usd: float, seconds: float, stopped: str | None
) -> LabelSummary:
    labeler = labeler_id(config.llm)
    by_status = dict(
        store.rows("SELECT status, count(*) FROM labels WHERE run_id = ? AND labeler = ? GROUP BY 1", [run_id, labeler])
    )
    unreliable = store.one(
        "SELECT count(DISTINCT (layer, feature)) FROM scores WHERE run_id = ? AND labeler = ? AND unreliable",
        [run_id, labeler],
    )[0]
    return LabelSummary(run_id, by_status, unreliable, calls, cost_usd, seconds, stopped)


# -- scale-out: shards labeled on workers that only read the store ------------------------------


class BufferedStore:
    """The store for a worker that may not write it (DuckDB has one writer): the reads labeling makes (`rows`,
    `one`) go to a read-only connection, its writes (`upsert`: the LLM cache and ledger) are kept as rows
    for the flow to write. Labeling and the LLM client use nothing else of a store."""

    def __init__(self, store: Store):
        self.store = store
        self.buffered: dict[str, list[dict]] = {}

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        return self.store.rows(sql, params)

    def one(self, sql: str, params: list | None = None) -> tuple | None:
        return self.store.one(sql, params)

    def upsert(self, table: str, rows: list[dict]) -> int:
        self.buffered.setdefault(table, []).extend(rows)
        return len(rows)


def label_batch(
    store: Store, subject: SubjectModel, tset: TranscoderSet, run_id: str, config: RunConfig, shard: list[Key]
) -> tuple[dict[str, list[dict]], str | None]:
    """One shard on a worker: every row to write (labels, scores, llm_cache, llm_calls) and why it stopped early."""
    buffered = BufferedStore(store)
    outputs = output_tokens(subject, tset, shard, config.label.output_tokens)
    embedder = load_embedder() if "embedding" in config.label.scorers else None

    async def go(client: LLMClient):
        return await label_shard(client, embedder, buffered, subject.tokenizer, outputs, shard, config, run_id)

    with open_client(buffered, config.llm, run_id, STAGE) as client:
        tables, budget = asyncio.run(go(client))
    return tables | buffered.buffered, str(budget) if budget else None
