"""`autolabel intervene`: ablate and steer features on real prompts, store what the output does, and score
each label by whether a judge can tell the steered continuation from the clean one.

Each feature is one shard of stage `intervene`, written in one transaction with every row of its prompts,
so a stopped run resumes at the next feature and a finished one writes nothing again. A shard's name
carries a hash of the settings that shape its rows, so changing them (or the model's dtype) reruns the
features; the judge's shards (`steering:...`) also carry the judge model and the label's hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass, field

from autolabel.config import RunConfig
from autolabel.intervene.evidence import Effect, ablation_effects
from autolabel.intervene.judge import SCORER, Pair, steering_score
from autolabel.intervene.run import Outcome, Setting, run_prompts
from autolabel.intervene.targets import Key, check_features, flagged_features, select_prompts
from autolabel.label.prompts import Label
from autolabel.label.stage import score_row
from autolabel.llm import BudgetExhausted, LLMClient, labeler_id, open_client
from autolabel.models import SubjectModel
from autolabel.progress import progress_bar
from autolabel.store import Store, now, to_json
from autolabel.transcoders.transcoder import TranscoderSet

STAGE = "intervene"


@dataclass
class FeatureResult:
    layer: int
    feature: int
    label: str | None
    ablation: Effect | None  # KL at the peak token, over the prompts where the feature fires
    ablation_neutral: float | None  # mean KL of ablation on silent contexts (about 0 unless it fires there)
    steering_kl: dict[float, float]  # multiple -> mean KL over all prompts
    score: float | None  # the `steering` balanced accuracy
    score_status: str | None


@dataclass
class InterveneSummary:
    run_id: str
    features: list[FeatureResult]
    computed: int  # features run now
    reused: int  # features whose rows were already stored with these settings
    judged: int  # steering scores written now
    unlabeled: int  # features with no label to judge
    calls: int
    cost_usd: float
    seconds: float
    stopped: str | None = None  # why judging stopped early (a budget), if it did
    notes: list[str] = field(default_factory=list)


def settings_key(config: RunConfig, subject: SubjectModel) -> str:
    """Names what a feature's rows depend on besides the run (which fixes model, transcoder and examples)."""
    settings = config.intervene
    spec = {
        "multiples": settings.multiples,
        "prompts": settings.prompts,
        "max_new_tokens": settings.max_new_tokens,
        "repetition_penalty": settings.repetition_penalty,
        "top_tokens": settings.top_tokens,
        "dtype": subject.dtype,
    }
    return hashlib.sha256(to_json(spec).encode()).hexdigest()[:10]


def feature_settings(store: Store, run_id: str, keys: list[Key], settings: str) -> dict[Key, str]:
    """Each feature's settings hash, marked when an audit flagged it (its prompts then prefer assistant turns)."""
    flagged = {key for keys in flagged_features(store, run_id).values() for key in keys}
    return {key: settings + ("+assistant" if key in flagged else "") for key in keys}


def done_features(store: Store, run_id: str, settings: dict[Key, str]) -> set[Key]:
    """Features whose shard is committed and whose stored rows were all made with their current settings."""
    committed = store.committed_shards(run_id, STAGE)
    made = {}
    for layer, feature, used in store.rows(
        "SELECT DISTINCT layer, feature, settings FROM interventions WHERE run_id = ?", [run_id]
    ):
        made.setdefault((layer, feature), set()).add(used)
    return {
        key
        for key, used in settings.items()
        if f"{key[0]}:{key[1]}:{used}" in committed and made.get(key, {used}) == {used}
    }


def outcome_row(run_id: str, outcome: Outcome, tokenizer, settings: str) -> dict:
    prompt = outcome.prompt
    return {
        "run_id": run_id,
        "layer": prompt.layer,
        "feature": prompt.feature,
        "prompt_kind": prompt.kind,
        "prompt_index": prompt.index,
        "setting": outcome.setting.name,
        "multiple": outcome.setting.multiple,
        "doc_id": prompt.doc_id,
        "role": prompt.role,
        "prompt_tokens": list(prompt.tokens),
        "prompt_text": tokenizer.decode(list(prompt.tokens)),
        "act": outcome.act,
        "new_act": outcome.new_act,
        "kl": outcome.kl,
        "kl_firing": outcome.kl_firing,
        "n_firing": outcome.n_firing,
        "top_up": to_json(outcome.top_up),
        "top_down": to_json(outcome.top_down),
        "clean_text": outcome.clean_text,
        "intervened_text": outcome.intervened_text,
        "settings": settings,
        "created_at": now(),
    }


def intervene_stage(
    store: Store,
    subject: SubjectModel,
    tset: TranscoderSet,
    run_id: str,
    features: list[Key],
    config: RunConfig,
    show_progress: bool = True,
) -> InterveneSummary:
    """Ablate and steer `features` of a collected run (checked first: nothing is written for a bad one)."""
    started = time.perf_counter()
    settings = config.intervene
    max_acts = check_features(store, run_id, tset, features)
    made_with = feature_settings(store, run_id, features, settings_key(config, subject))
    done = done_features(store, run_id, made_with)
    todo = [k for k in features if k not in done]
    prompts = {k: select_prompts(store, run_id, k, settings.prompts, made_with[k].endswith("+assistant")) for k in todo}
    steps = [Setting("ablate", 0.0)] + [Setting("steer", m) for m in settings.multiples]
    with progress_bar("prompts", disable=not show_progress) as bar:
        task = bar.add_task("intervening", total=sum(len(p) for p in prompts.values()))
        for start in range(0, len(todo), settings.group_features):
            group = todo[start : start + settings.group_features]
            outcomes = run_prompts(
                subject,
                tset,
                [p for k in group for p in prompts[k]],
                steps,
                max_acts,
                settings,
                lambda _: bar.advance(task),
            )
            for layer, feature in group:
                used = made_with[(layer, feature)]
                rows = [
                    outcome_row(run_id, o, subject.tokenizer, used)
                    for o in outcomes
                    if (o.prompt.layer, o.prompt.feature) == (layer, feature)
                ]
                store.write_shard(
                    run_id,
                    STAGE,
                    f"{layer}:{feature}:{used}",
                    {"interventions": rows},
                    replace=True,
                    clear={"interventions": {"run_id": run_id, "layer": layer, "feature": feature}},
                )
    judged = unlabeled = calls = 0
    cost, stopped, notes = 0.0, None, []
    if settings.judge and settings.multiples:
        judged, unlabeled, calls, cost, stopped = judge_features(store, run_id, made_with, config, subject.tokenizer)
        if unlabeled:
            notes.append(
                f"{unlabeled} features have no label yet, so no steering score: `autolabel label --run {run_id}` first"
            )
    return InterveneSummary(
        run_id,
        feature_results(store, run_id, features),
        len(todo),
        len(done),
        judged,
        unlabeled,
        calls,
        cost,
        time.perf_counter() - started,
        stopped,
        notes,
    )


def latest_labels(store: Store, run_id: str) -> dict[Key, tuple[str, Label]]:
    """(layer, feature) -> (labeler, label) of each feature's current label."""
    rows = store.rows(
        "SELECT layer, feature, labeler, label, explanation FROM current_labels WHERE run_id = ?", [run_id]
    )
    return {
        (layer, feature): (labeler, Label(label, explanation or ""))
        for layer, feature, labeler, label, explanation in rows
    }


def judge_features(
    store: Store, run_id: str, made_with: dict[Key, str], config: RunConfig, tokenizer
) -> tuple[int, int, int, float, str | None]:
    """Score the labeled features not yet judged: (judged now, unlabeled, requests, USD, why it stopped)."""
    settings = config.intervene
    multiple = settings.judge_multiple or max(settings.multiples)
    labels = latest_labels(store, run_id)
    current = {
        row[0]
        for row in store.rows(
            "SELECT details_json->>'shard' FROM scores WHERE run_id = ? AND scorer = ?", [run_id, SCORER]
        )
    }
    committed = store.committed_shards(run_id, STAGE)
    pending = []
    judge = labeler_id(config.llm)
    for (layer, feature), used in made_with.items():
        if (layer, feature) not in labels:
            continue
        labeler, label = labels[(layer, feature)]
        label_hash = hashlib.sha256(to_json([labeler, label.label, label.explanation]).encode()).hexdigest()[:10]
        shard = f"{SCORER}:{layer}:{feature}:{used}:{judge}:{label_hash}"
        if shard in committed and shard in current:
            continue
        rows = store.rows(
            "SELECT prompt_tokens, clean_text, intervened_text FROM interventions WHERE run_id = ? AND layer = ? "
            "AND feature = ? AND setting = 'steer' AND multiple = ? ORDER BY prompt_kind, prompt_index",
            [run_id, layer, feature, multiple],
        )
        pairs = [
            Pair(tokenizer.decode(tokens[-settings.judge_context_tokens :]), clean, steered)
            for tokens, clean, steered in rows
        ]
        pending.append(((layer, feature), shard, labeler, label, pairs))
    unlabeled = sum(key not in labels for key in made_with)
    if not pending:
        return 0, unlabeled, 0, 0.0, None

    async def judge_all(client: LLMClient) -> tuple[int, str | None]:
        for n_done, ((layer, feature), shard, labeler, label, pairs) in enumerate(pending):
            rng = random.Random(f"{settings.seed}:{layer}:{feature}")
            try:
                score = await steering_score(client, label, pairs, rng)
            except BudgetExhausted as err:
                return n_done, str(err)
            score.details |= {"shard": shard, "multiple": multiple, "label": label.label, "judge": judge}
            row = score_row(run_id, layer, feature, labeler, score, config.label.unreliable_below)
            store.write_shard(run_id, STAGE, shard, {"scores": [row]}, replace=True)
        return len(pending), None

    with open_client(store, config.llm, run_id, STAGE) as client:
        judged, stopped = asyncio.run(judge_all(client))
    return judged, unlabeled, client.calls, client.cost_usd, stopped


def feature_results(store: Store, run_id: str, features: list[Key]) -> list[FeatureResult]:
    """What the command prints per feature, read back from the store (rows of earlier runs included)."""
    ablation = ablation_effects(store, run_id, role=None)
    neutral = {
        (layer, feature): kl
        for layer, feature, kl in store.rows(
            "SELECT layer, feature, avg(kl) FROM interventions WHERE run_id = ? AND setting = 'ablate' "
            "AND prompt_kind = 'neutral' GROUP BY ALL",
            [run_id],
        )
    }
    steering: dict[Key, dict[float, float]] = {}
    for layer, feature, multiple, kl in store.rows(
        "SELECT layer, feature, multiple, avg(kl) FROM interventions WHERE run_id = ? AND setting = 'steer' "
        "GROUP BY ALL ORDER BY ALL",
        [run_id],
    ):
        steering.setdefault((layer, feature), {})[multiple] = kl
    scores = {
        (layer, feature): (v, s)
        for layer, feature, v, s in store.rows(
            "SELECT layer, feature, value, status FROM current_scores WHERE run_id = ? AND scorer = ?", [run_id, SCORER]
        )
    }
    labels = latest_labels(store, run_id)
    results = []
    for key in features:
        label = labels[key][1].label if key in labels else None
        results.append(
            FeatureResult(
                *key, label, ablation.get(key), neutral.get(key), steering.get(key, {}), *scores.get(key, (None, None))
            )
        )
    return results
