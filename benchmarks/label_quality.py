"""Labels measured against known answers: features whose meaning is known by construction.

    .venv/bin/python benchmarks/label_quality.py --store CORPUS.duckdb [--workdir DIR]
        [--labeler smollm2] [--labeler labeler:qwen2.5-coder-1.5b] [--labeler MODEL.gguf]
        [--base-url URL --labeler MODEL] [--flagged STORE [--flagged-run ID]] [--known] [--no-role-evidence]
        [--no-token-evidence] [--scorers detection,fuzzing,embedding] [--candidates N] [--hard-negatives SHARE]

1. Concepts. The layer-15 MLP inputs of the default corpus's tokens (in --store; built
   there first when it has none) are captured: every held-out window and every other
   training window. Each concept below (word families, one token, punctuation, a turn's
   role, a document category) gets a direction: a logistic regression on standardised
   inputs of the training documents, its threshold the one with the best F1 there;
   precision and recall are measured on the held-out documents (every 5th by a stable
   hash of its id, as transcoder checks hold them out).
2. A transcoder set that autolabel loads: one ReLU feature per concept at layer 15,
   encoder = the direction with its bias shifted by the threshold (the feature fires
   exactly where the direction's logit passes it), decoder = the unit direction; written
   with save_circuit_tracer.
3. The real path: `autolabel collect` on a copy of the store, then per labeler, in its
   own process (its own peak RSS) on its own copy of the collected store (no shared
   cache), the label stage labels and scores every concept feature.
4. Recovery: a concept counts as recovered when its feature's label contains one of
   the concept's keywords, or when the MiniLM cosine between label and the concept's
   description is at least RECOVERED_COSINE (see `recovered`).
5. With --known, each concept feature is also scored with a label known to be right (its concept's
   description) and one known to be wrong (the next concept's) on the same held-out texts: a scorer
   worth the name ranks the right one above the wrong one for nearly every feature.
Steps 1-3 are cached in --workdir; delete it to start over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from autolabel.config import LabelConfig, LLMConfig, RunConfig, TranscoderConfig, config_yaml, load_config
from autolabel.store import Store

LAYER = 15
HELDOUT_EVERY = 5
AUTOLABEL = Path(sys.executable).parent / "autolabel"


@dataclass(frozen=True)
class Concept:
    name: str
    kind: str
    description: str  # what a right label says; MiniLM compares labels with it
    keywords: tuple[str, ...]  # regexes matched as whole words, case-insensitive, in the label
    words: tuple[str, ...] = ()  # the concept's tokens (stripped, lowercased) ...
    pattern: str | None = None  # ... or a regex a stripped token matches in full ...
    role: str | None = None  # ... or every token of this role ...
    category: str | None = None  # ... (and) of this document category

    def truth(self, pieces: np.ndarray, roles: np.ndarray, categories: np.ndarray) -> np.ndarray:
        """[n] bool: which tokens are the concept, from their text, role and document category."""
        mask = np.ones(len(pieces), dtype=bool) if (self.role or self.category) else np.zeros(len(pieces), bool)
        if self.words:
            mask |= np.isin(np.char.lower(np.char.strip(pieces)), self.words)
        if self.pattern:
            mask |= np.array([re.fullmatch(self.pattern, p.strip()) is not None for p in pieces])
        if self.role:
            mask &= roles == self.role
        if self.category:
            mask &= categories == self.category
        return mask


# "may" and "march" are left out (mostly the verbs), as is "us" from the countries (mostly the pronoun).
MONTHS_AND_DAYS = (
    "january",
    "february",
    "april",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
)
# The keyword lists and descriptions were fixed before any label was seen. A keyword is what a
# reader would accept as naming the concept, not merely a word its examples contain.
CONCEPTS = [
    Concept(
        "numbers",
        "word family",
        "numbers and digits",
        (r"numbers?", r"numerals?", r"digits?", r"numeric(al)?", r"numbering"),
        pattern=r"\d+([.,]\d+)*",
    ),
    Concept(
        "colours",
        "word family",
        "colour names",
        (r"colou?rs?", r"hues?"),
        words=("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey", "gray"),
    ),
    Concept(
        "days and months",
        "word family",
        "days of the week and months of the year",
        (r"days?", r"weekdays?", r"months?", r"calendar", r"dates?"),
        words=MONTHS_AND_DAYS,
    ),
    Concept(
        "countries",
        "word family",
        "countries and nationalities",
        (r"countr(y|ies)", r"nations?", r"nationalit(y|ies)", r"national"),
        words=(
            "uk",
            "usa",
            "britain",
            "england",
            "france",
            "germany",
            "china",
            "japan",
            "india",
            "russia",
            "italy",
            "spain",
            "ireland",
            "scotland",
            "wales",
            "australia",
            "america",
            "canada",
            "iraq",
            "iran",
            "british",
            "american",
            "french",
            "german",
            "chinese",
            "japanese",
            "indian",
            "russian",
            "italian",
            "spanish",
            "irish",
            "scottish",
            "welsh",
            "australian",
            "canadian",
            "european",
        ),
    ),
    Concept(
        "family",
        "word family",
        "family members and relatives",
        (r"famil(y|ies)", r"relatives?", r"parents?", r"siblings?", r"kinship", r"mothers?", r"fathers?"),
        words=(
            "mother",
            "father",
            "mom",
            "mum",
            "dad",
            "sister",
            "brother",
            "son",
            "daughter",
            "wife",
            "husband",
            "parent",
            "parents",
            "family",
            "grandmother",
            "grandfather",
            "aunt",
            "uncle",
            "cousin",
            "kids",
            "children",
            "child",
            "sisters",
            "brothers",
            "sons",
            "daughters",
        ),
    ),
    Concept(
        "said",
        "one token",
        "the word said",
        (r"said", r"says?", r"saying", r"speech", r"quotes?", r"quotations?"),
        words=("said",),
    ),
    Concept(
        "question marks",
        "punctuation",
        "question marks",
        (r"questions?", r"question marks?", r"interrogative", r"quer(y|ies)"),
        pattern=r".*\?.*",
    ),
    Concept(
        "assistant turn",
        "role",
        "the assistant's reply in a chat",
        (r"assistant'?s?", r"responses?", r"repl(y|ies)", r"answers?", r"chatbot", r"AI"),
        role="assistant",
    ),
    Concept("user turn", "role", "the user's message in a chat", (r"users?'?s?", r"human", r"prompts?"), role="user"),
    Concept(
        "news",
        "document category",
        "news article text",
        (r"news", r"articles?", r"journalism", r"reports?", r"reporting", r"press", r"headlines?", r"BBC"),
        role="text",
        category="news",
    ),
    Concept(
        "harmful requests",
        "document category",
        "harmful or dangerous requests",
        (
            r"harm(ful)?",
            r"dangerous",
            r"illegal",
            r"unsafe",
            r"malicious",
            r"weapons?",
            r"violen(t|ce)",
            r"crim(e|inal)",
            r"unethical",
        ),
        role="user",
        category="harmful_request",
    ),
]
RECOVERED_COSINE = 0.5  # fixed before any label was seen, like the keywords
# A concept whose direction does not find it on held-out tokens has no known answer: it is fitted and
# reported, but gets no feature. Fixed after seeing the directions' precision and recall, before any label.
MIN_PRECISION, MIN_RECALL, MIN_HELDOUT_POSITIVES = 0.6, 0.5, 10


def recovered(label: str, concept: Concept, cosine: float) -> bool:
    keyword = any(re.search(rf"\b{k}\b", label, re.IGNORECASE) for k in concept.keywords)
    return keyword or cosine >= RECOVERED_COSINE


# -- 1. concept directions on the subject model's real activations ------------------------------


def capture(corpus_store: Path, workdir: Path, base: RunConfig) -> dict[str, np.ndarray]:
    """Layer-15 MLP inputs of the counted tokens (not a window's first) of every held-out window and every other
    training window, with each token's text, role, category and split; cached in workdir/acts.npz."""
    cached = workdir / "acts.npz"
    if cached.is_file():
        return dict(np.load(cached))
    from autolabel.collect.stage import CorpusIndex, make_batch
    from autolabel.config import ROLES
    from autolabel.corpus import build_corpus
    from autolabel.corpus.windows import iter_windows, split_heldout
    from autolabel.models import load_subject_model
    from autolabel.transcoders.activations import batch_windows

    config = base
    subject = load_subject_model(config.model.source, config.cache_dir, config.model.dtype)
    vocab = np.array([subject.tokenizer.decode([i]) for i in range(len(subject.tokenizer))])
    point = subject.hook_point("mlp_in", LAYER)
    with Store(corpus_store) as store:
        corpus_id = build_corpus(store, config.corpus, subject, show_progress=False).corpus_id
        index = CorpusIndex.read(store, corpus_id)
        train, held = split_heldout(list(iter_windows(store, corpus_id)), HELDOUT_EVERY)
    train = train[::2]  # every other training window is plenty to fit on, and halves the forward passes
    parts: dict[str, list] = {"x": [], "tokens": [], "roles": [], "categories": [], "heldout": []}
    with torch.inference_mode():
        for is_held, windows in ((False, train), (True, held)):
            for group in batch_windows(windows, 16):
                input_ids, mask, batch = make_batch(group, index, subject.pad_id)
                x = subject.capture(input_ids, mask, [point])[point]  # [B, S, d_model]
                valid = batch.valid
                parts["x"].append(x[valid].to(torch.float16).numpy())
                parts["tokens"].append(batch.tokens[valid].numpy())
                parts["roles"].append(np.array(list(ROLES))[batch.roles[valid].numpy()])
                window_category = batch.categories[:, None].expand_as(valid)  # [B, S]
                parts["categories"].append(np.array(index.categories)[window_category[valid].numpy()])
                parts["heldout"].append(np.full(int(valid.sum()), is_held))
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    arrays["pieces"] = vocab[arrays.pop("tokens")]
    np.savez(cached, **arrays)
    return arrays


def fit_direction(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """(w [d], b): a logistic regression on standardised inputs, folded back so that logit = x @ w + b.
    All positives (up to 40k) and 40k negatives: the threshold, chosen later on every token, sets the balance."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(y), np.flatnonzero(~y)
    rows = np.concatenate([rng.permutation(positives)[:40_000], rng.permutation(negatives)[:40_000]])
    sample = x[rows].astype(np.float64)
    mean, scale = sample.mean(0), sample.std(0) + 1e-6
    model = LogisticRegression(C=0.1, max_iter=1000).fit((sample - mean) / scale, y[rows])
    w = model.coef_[0] / scale
    return w, float(model.intercept_[0] - mean @ w)


def logits(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    return np.concatenate(
        [x[i : i + 65536].astype(np.float32) @ w.astype(np.float32) + b for i in range(0, len(x), 65536)]
    )


def best_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[np.argmax(f1[:-1])])


def build_concept_set(acts: dict[str, np.ndarray], workdir: Path) -> None:
    """Fit every concept; write the transcoder set to workdir/concepts and one row per feature to concepts.json."""
    from autolabel.transcoders.formats import save_circuit_tracer
    from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

    x, held = acts["x"], acts["heldout"]
    directions, biases, rows = [], [], []
    for concept in CONCEPTS:
        y = concept.truth(acts["pieces"], acts["roles"], acts["categories"])
        w, b = fit_direction(x[~held], y[~held])
        scores = logits(x, w, b)
        threshold = best_threshold(scores[~held], y[~held])
        fired, truth = scores[held] > threshold, y[held]
        row = {
            **{k: v for k, v in asdict(concept).items() if k in ("name", "kind", "description")},
            "positives_heldout": int(truth.sum()),
            "tokens_heldout": int(held.sum()),
            "precision": float((fired & truth).sum() / max(fired.sum(), 1)),
            "recall": float((fired & truth).sum() / max(truth.sum(), 1)),
        }
        kept = (
            row["precision"] >= MIN_PRECISION
            and row["recall"] >= MIN_RECALL
            and row["positives_heldout"] >= MIN_HELDOUT_POSITIVES
        )
        rows.append({**row, "feature": len(directions) if kept else None})
        if kept:
            directions.append(w)
            biases.append(b - threshold)  # relu(x @ w + b - threshold) > 0 exactly where the logit passes it
    W = torch.tensor(np.stack(directions), dtype=torch.float32)  # [n_concepts, d_model]
    transcoder = Transcoder(
        LAYER,
        W.T.contiguous(),
        torch.tensor(biases, dtype=torch.float32),
        W / W.norm(dim=1, keepdim=True),
        torch.zeros(W.shape[1]),
        activation="relu",
    )
    tset = TranscoderSet(
        {LAYER: transcoder}, metadata={"concepts": [r["name"] for r in rows if r["feature"] is not None]}
    )
    save_circuit_tracer(tset, workdir / "concepts", "SmolLM2-135M-Instruct")
    (workdir / "concepts.json").write_text(json.dumps(rows, indent=1))


# -- 2. collection and labeling through autolabel's own stages ---------------------------------


def collect(corpus_store: Path, workdir: Path, base: RunConfig) -> tuple[Path, str]:
    """`autolabel collect` of the concept set over the corpus, in a copy of the store: (store, run_id)."""
    collected = workdir / "collected.duckdb"
    if not collected.is_file():
        shutil.copy(corpus_store, workdir / "collecting.duckdb")
        config = base.model_copy(
            update={
                "store": str(workdir / "collecting.duckdb"),
                # a handful of concept features cannot reconstruct the MLP: the fit check is moot here
                "transcoder": TranscoderConfig(source=str(workdir / "concepts"), max_fvu=1e9),
            }
        )
        (workdir / "collect.yaml").write_text(config_yaml(config))
        # Prefect's temporary API server gets 20 s to start by default, too few on a loaded 2-core machine.
        env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", **os.environ}
        subprocess.run([str(AUTOLABEL), "collect", "-c", str(workdir / "collect.yaml"), "-q"], check=True, env=env)
        (workdir / "collecting.duckdb").rename(collected)
    with Store(collected, create=False) as store:
        run_id = store.one(
            "SELECT run_id FROM shards WHERE stage = 'collect' AND shard = 'final' ORDER BY committed_at DESC"
        )[0]
    return collected, run_id


def llm_config(labeler: str, base_url: str | None) -> LLMConfig:
    """`smollm2` (the default local labeler), `labeler:NAME`, a .gguf path, or with --base-url a model name."""
    if base_url:
        return LLMConfig(base_url=base_url, model=labeler)
    # A larger GGUF on 2 shared cores answers a long labeling prompt in minutes, not seconds: two slots, no timeout
    # that would drop a request the server goes on computing.
    local = {"timeout_s": 1800.0, "concurrency": 2}
    if labeler == "smollm2":
        return LLMConfig()
    return LLMConfig(gguf=labeler, **local)


def label_settings(args: argparse.Namespace, **fields) -> LabelConfig:
    """The label config of a run: the concept layer and what the command line varies."""
    return LabelConfig(
        layers=[LAYER],
        role_evidence=not args.no_role_evidence,
        token_evidence=not args.no_token_evidence,
        scorers=args.scorers.split(","),
        candidates=args.candidates,
        hard_negatives=args.hard_negatives,
        **fields,
    )


def variant(args: argparse.Namespace) -> str:
    """What sets this run apart from the defaults, for names of results and stores."""
    default = LabelConfig()
    return "".join(
        [
            " (no role evidence)" if args.no_role_evidence else "",
            " (no token evidence)" if args.no_token_evidence else "",
            f" (scorers {args.scorers})" if args.scorers.split(",") != default.scorers else "",
            f" (candidates {args.candidates})" if args.candidates != default.candidates else "",
            f" (hard negatives {args.hard_negatives:g})" if args.hard_negatives != default.hard_negatives else "",
        ]
    )


def label_worker(store_path: str, run_id: str, labeler: str, base_url: str | None, settings: LabelConfig) -> dict:
    """In its own process: label and score every concept feature; time, requests and peak RSS."""
    from autolabel.pipeline import label_run

    config = RunConfig(store=store_path, label=settings, llm=llm_config(labeler, base_url))
    started = time.perf_counter()
    summary = label_run(config, run_id, show_progress=False)
    return {
        "seconds": time.perf_counter() - started,
        "requests": summary.calls,
        "by_status": summary.by_status,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def known_worker(
    store_path: str, run_id: str, labeler: str, base_url: str | None, concepts: list[dict], settings: LabelConfig
) -> dict:
    """In its own process: each concept feature's detection and fuzzing scores for a label known to be right
    (its concept's description) and one known to be wrong (the next concept's), on the same held-out texts.
    A scorer that can tell a good label from a bad one ranks the right label above the wrong one nearly always.
    Detection's hard negatives (label.hard_negatives) follow each label's own words."""
    import asyncio

    from autolabel.label.candidates import held_out_splits, score_label
    from autolabel.label.evidence import read_examples
    from autolabel.label.prompts import Label
    from autolabel.llm import open_client
    from autolabel.pipeline import subject_model

    config = RunConfig(
        store=store_path,
        label=settings.model_copy(update={"scorers": ["detection", "fuzzing"]}),
        llm=llm_config(labeler, base_url),
    )
    tokenizer = subject_model(config.model.source, config.cache_dir, config.model.dtype).tokenizer
    started, rows = time.perf_counter(), []
    with Store(store_path) as store, open_client(store, config.llm, run_id, "known") as client:

        async def score_all() -> None:
            for i, concept in enumerate(concepts):
                examples = read_examples(store, run_id, LAYER, concept["feature"], tokenizer)
                _, held_out = held_out_splits(examples, choosing=False)
                wrong = concepts[(i + 1) % len(concepts)]["description"]
                for which, text in (("right", concept["description"]), ("wrong", wrong)):
                    scores = await score_label(
                        client, None, Label(text, ""), held_out, config.label, f"known:{concept['feature']}"
                    )  # the same activating texts
                    rows.extend(
                        {
                            "concept": concept["name"],
                            "label": which,
                            "scorer": score.scorer,
                            "value": score.value,
                            "status": score.status,
                        }
                        for score in scores
                    )

        asyncio.run(score_all())
    return {"rows": rows, "seconds": time.perf_counter() - started, "requests": client.calls}


def print_known(name: str, known: dict) -> dict:
    """Per scorer: features whose right label outscored the wrong one (a degenerate or failed score is no win)."""
    by_key = {(r["concept"], r["scorer"], r["label"]): r["value"] for r in known["rows"]}
    concepts = sorted({r["concept"] for r in known["rows"]})
    print(
        f"\n{name}: known-right against known-wrong labels, AUROC ({known['seconds']:.0f} s, "
        f"{known['requests']} requests)"
    )
    print(f"  {'concept':<18}{'det right':>10}{'det wrong':>10}{'fuzz right':>11}{'fuzz wrong':>11}")
    for concept in concepts:
        values = [
            by_key.get((concept, scorer, which)) for scorer in ("detection", "fuzzing") for which in ("right", "wrong")
        ]
        shown = ["-" if v is None else f"{v:.2f}" for v in values]
        print(f"  {concept:<18}{shown[0]:>10}{shown[1]:>10}{shown[2]:>11}{shown[3]:>11}")
    wins = {}
    for scorer in ("detection", "fuzzing"):
        pairs = [(by_key.get((c, scorer, "right")), by_key.get((c, scorer, "wrong"))) for c in concepts]
        wins[scorer] = sum(r is not None and (w is None or r > w) for r, w in pairs)
        print(f"  {scorer}: the right label ranks above the wrong one for {wins[scorer]}/{len(concepts)} features")
    return wins


def slug(labeler: str) -> str:
    """A labeler (a name, a path) as part of a file name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", labeler)[-60:]


def passed_on(args: argparse.Namespace) -> list[str]:
    """The options a worker process needs to label as this run does."""
    flags = ["--no-role-evidence"] * args.no_role_evidence + ["--no-token-evidence"] * args.no_token_evidence
    return flags + [
        "--scorers",
        args.scorers,
        "--candidates",
        str(args.candidates),
        "--hard-negatives",
        str(args.hard_negatives),
    ]


def run_labeler(
    collected: Path, run_id: str, labeler: str, base_url: str | None, workdir: Path, args: argparse.Namespace
) -> dict:
    store_path = workdir / f"label-{slug(labeler + variant(args))}.duckdb"
    shutil.copy(collected, store_path)  # a fresh copy: no cached answers, no other labeler's scores
    command = [sys.executable, __file__, "--worker", str(store_path), "--run", run_id, "--labeler", labeler]
    command += passed_on(args)
    out = subprocess.run(
        command + (["--base-url", base_url] if base_url else []), check=True, stdout=subprocess.PIPE, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with Store(store_path, create=False) as store:
        result["labels"] = {
            f: (label, status)
            for f, label, status in store.rows(
                "SELECT feature, label, status FROM labels WHERE run_id = ? AND layer = ?", [run_id, LAYER]
            )
        }
        result["candidates"] = {
            f: [c["label"] or "" for c in json.loads(record)["candidates"]]
            for f, record in store.rows(
                "SELECT feature, candidates_json FROM labels WHERE "
                "run_id = ? AND layer = ? AND candidates_json IS NOT NULL",
                [run_id, LAYER],
            )
        }
        result["scores"] = store.rows(
            "SELECT feature, scorer, value, accuracy, status FROM scores WHERE run_id = ? AND layer = ?",
            [run_id, LAYER],
        )
    return result


def run_known(
    collected: Path,
    run_id: str,
    labeler: str,
    base_url: str | None,
    workdir: Path,
    concepts: list[dict],
    args: argparse.Namespace,
) -> dict:
    store_path = workdir / f"known-{slug(labeler + variant(args))}.duckdb"
    shutil.copy(collected, store_path)
    (workdir / "known-concepts.json").write_text(json.dumps(concepts))
    command = [
        sys.executable,
        __file__,
        "--known-worker",
        str(store_path),
        "--run",
        run_id,
        "--labeler",
        labeler,
        "--workdir",
        str(workdir),
        *passed_on(args),
    ]
    out = subprocess.run(
        command + (["--base-url", base_url] if base_url else []), check=True, stdout=subprocess.PIPE, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- 3. report ---------------------------------------------------------------------------------


def recoveries(labels: list[str], concepts: list[dict], embedder) -> tuple[list[bool], np.ndarray]:
    """(recovered, cosine to the concept's description) of one label per concept feature."""
    n = len(concepts)
    vectors = embedder.encode(labels + [c["description"] for c in concepts], normalize_embeddings=True)
    cosines = (vectors[:n] * vectors[n:]).sum(1)
    by_name = {concept.name: concept for concept in CONCEPTS}
    return [
        bool(label) and recovered(label, by_name[c["name"]], float(cos))
        for label, c, cos in zip(labels, concepts, cosines, strict=True)
    ], cosines


def candidate_recovery(result: dict, concepts: list[dict], embedder) -> dict:
    """With best-of-N: concepts the first candidate alone recovers (what one candidate drafts) and those
    some candidate recovers (what a perfect choice would keep)."""
    drafted = [result["candidates"].get(c["feature"], []) for c in concepts]
    if not any(drafted):
        return {}
    width = max(map(len, drafted))
    hits = [recoveries([d[i] if i < len(d) else "" for d in drafted], concepts, embedder)[0] for i in range(width)]
    return {
        "recovered_first_candidate": sum(hits[0]),
        "recovered_any_candidate": sum(map(any, zip(*hits, strict=True))),
    }


def summarise(name: str, result: dict, concepts: list[dict], embedder) -> dict:
    """Recovery per concept feature (`concepts`: the kept ones) and the labeler's means."""
    n = len(concepts)
    labels = [result["labels"].get(c["feature"], (None, "missing"))[0] or "" for c in concepts]
    hits, cosines = recoveries(labels, concepts, embedder)
    scorers = ("detection", "fuzzing", "embedding")
    means = {
        s: np.mean([v for _, scorer, v, _, status in result["scores"] if scorer == s and status == "ok"] or [np.nan])
        for s in scorers
    }
    accuracy = {
        f"{s}_accuracy": np.mean(
            [a for _, scorer, _, a, _ in result["scores"] if scorer == s and a is not None] or [np.nan]
        )
        for s in scorers
    }
    not_ok = {s: sum(scorer == s and status != "ok" for _, scorer, _, _, status in result["scores"]) for s in scorers}
    return {
        "labeler": name,
        "recovered": sum(hits),
        "n": n,
        **means,
        **accuracy,
        "not_ok": not_ok,
        "s_per_feature": result["seconds"] / n,
        "requests_per_feature": result["requests"] / n,
        "peak_rss_mb": result["peak_rss_mb"],
        "seconds": result["seconds"],
        **candidate_recovery(result, concepts, embedder),
        "per_concept": [
            {"concept": c["name"], "label": label, "cosine": float(cos), "recovered": hit}
            for c, label, cos, hit in zip(concepts, labels, cosines, hits, strict=True)
        ],
    }


def flagged_scores(store_path: str, run_id: str | None) -> None:
    """Mean scores of the labels on a run's flagged features (the default run labels the best-ranked 24), per
    labeler: a run labeled by two labelers shows each one's own scores."""
    with Store(store_path, create=False) as store:
        run_id = (
            run_id
            or store.one(
                "SELECT run_id FROM runs WHERE run_id IN (SELECT run_id FROM audit_findings) "
                "ORDER BY started_at DESC LIMIT 1"
            )[0]
        )
        rows = store.con.execute(
            "SELECT labeler, scorer, avg(value), avg(accuracy), count(value), count(*) FROM scores "
            "WHERE run_id = ? AND (layer, feature) IN (SELECT (layer, feature) FROM audit_findings "
            "WHERE run_id = ? AND flagged) GROUP BY ALL ORDER BY ALL",
            [run_id, run_id],
        ).fetchall()
    print(f"\nmean scores on the flagged features of run {run_id} ({store_path}): AUROC, held-out accuracy")
    for labeler, scorer, mean, accuracy, n_ok, n in rows:
        print(
            f"  {labeler:<34}{scorer:<12}{mean or float('nan'):6.3f}{accuracy or float('nan'):7.3f}  "
            f"({n_ok} scored of {n})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--store",
        default="/tmp/autolabel-label-quality/corpus.duckdb",
        help="a store with the default corpus (built there when missing)",
    )
    parser.add_argument("--workdir", default="/tmp/autolabel-label-quality/work")
    parser.add_argument("--config", help="a run config whose model and corpus to use (default: the embedded run)")
    parser.add_argument(
        "--labeler",
        action="append",
        help="smollm2, labeler:NAME or a .gguf path (repeatable); with --base-url, the endpoint's model name",
    )
    parser.add_argument("--base-url", help="an OpenAI-compatible endpoint (its key in $OPENAI_API_KEY)")
    parser.add_argument("--flagged", help="a store whose flagged features' mean scores to print")
    parser.add_argument("--flagged-run", help="the run of --flagged (default: the latest audited)")
    parser.add_argument("--known", action="store_true", help="also score known-right and known-wrong labels")
    parser.add_argument(
        "--no-role-evidence",
        action="store_true",
        help="label without the examples' role tags and the role statistics (label.role_evidence)",
    )
    parser.add_argument(
        "--no-token-evidence",
        action="store_true",
        help="label without the counts of which tokens fire (label.token_evidence)",
    )
    parser.add_argument(
        "--scorers",
        default=",".join(LabelConfig().scorers),
        help="comma-separated scorers to run (label.scorers); 'embedding' alone asks one request per feature",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=LabelConfig().candidates,
        help="best-of-N: candidate labels drafted per feature (label.candidates)",
    )
    parser.add_argument(
        "--hard-negatives",
        type=float,
        default=LabelConfig().hard_negatives,
        help="share of detection's negatives that mention the label's words (label.hard_negatives)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--known-worker", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(label_worker(args.worker, args.run, args.labeler[0], args.base_url, label_settings(args))))
        return
    if args.known_worker:
        concepts = json.loads((Path(args.workdir) / "known-concepts.json").read_text())
        print(
            json.dumps(
                known_worker(
                    args.known_worker, args.run, args.labeler[0], args.base_url, concepts, label_settings(args)
                )
            )
        )
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store, base = Path(args.store), load_config(args.config)
    if not store.is_file():
        store.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(AUTOLABEL), "corpus", "build", "--store", str(store), "-q"]
            + (["-c", args.config] if args.config else []),
            check=True,
        )
    started = time.perf_counter()
    if not (workdir / "concepts.json").is_file():
        build_concept_set(capture(store, workdir, base), workdir)
    fitted = json.loads((workdir / "concepts.json").read_text())
    concepts = [c for c in fitted if c["feature"] is not None]
    print(
        f"concept directions at layer {LAYER} ({time.perf_counter() - started:.0f} s); held-out tokens "
        f"(a feature needs precision >= {MIN_PRECISION}, recall >= {MIN_RECALL}, {MIN_HELDOUT_POSITIVES} positives):"
    )
    print(f"  {'feature':<8}{'concept':<18}{'kind':<20}{'positives':>10}{'precision':>10}{'recall':>8}")
    for c in fitted:
        print(
            f"  {'-' if c['feature'] is None else c['feature']:<8}{c['name']:<18}{c['kind']:<20}"
            f"{c['positives_heldout']:>10}{c['precision']:>10.2f}{c['recall']:>8.2f}"
        )
    started = time.perf_counter()
    collected, run_id = collect(store, workdir, base)
    print(f"collected run {run_id} in {collected} ({time.perf_counter() - started:.0f} s)")

    from autolabel.cluster.embed import load_embedder

    embedder = load_embedder()
    results = []
    for labeler in args.labeler or ["smollm2"]:
        name = labeler + variant(args)
        result = run_labeler(collected, run_id, labeler, args.base_url, workdir, args)
        summary = summarise(name, result, concepts, embedder)
        if args.known:
            summary["known_wins"] = print_known(
                name, run_known(collected, run_id, labeler, args.base_url, workdir, concepts, args)
            )
        (workdir / f"result-{slug(name)}.json").write_text(json.dumps(summary, indent=1))
        results.append(summary)
        print(f"\n{name}: {summary['recovered']}/{summary['n']} concepts recovered")
        if "recovered_first_candidate" in summary:
            print(
                f"  by the first candidate alone {summary['recovered_first_candidate']}/{summary['n']}, "
                f"by some candidate {summary['recovered_any_candidate']}/{summary['n']}"
            )
        for row in summary["per_concept"]:
            print(
                f"  {'yes' if row['recovered'] else 'no ':<4}{row['concept']:<18}cos {row['cosine']:.2f}  "
                f"{row['label']!r}"
            )
    print("\nAUROC (held-out balanced accuracy); scores not ok: degenerate or failed")
    print(
        f"{'labeler':<30}{'recovered':>10}{'detection':>13}{'fuzzing':>13}{'embedding':>13}{'not ok':>8}"
        f"{'s/feat':>8}{'req/feat':>9}{'RSS MB':>8}"
    )
    for r in results:
        cells = "".join(f"{r[s]:>6.2f} ({r[s + '_accuracy']:.2f})" for s in ("detection", "fuzzing", "embedding"))
        print(
            f"{r['labeler'][-30:]:<30}{r['recovered']:>7}/{r['n']:<2}{cells}{sum(r['not_ok'].values()):>8}"
            f"{r['s_per_feature']:>8.1f}{r['requests_per_feature']:>9.1f}{r['peak_rss_mb']:>8.0f}"
        )
    if args.flagged:
        flagged_scores(args.flagged, args.flagged_run)


if __name__ == "__main__":
    main()
