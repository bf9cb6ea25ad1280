"""`autolabel organism train`: fine-tune the subject model on its own replies with a planted quirk, save a
local HF folder that `model.source` accepts, check the organism, and store the figures in `organisms`.

The folder's model id is `local:<folder name>` (models.py), and the store caches replies and corpora by
model id. A folder name is therefore tied to one organism per store: training into a folder of a name the
store already holds is refused, and so is auditing a folder whose weights are not the ones recorded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from autolabel.config import RunConfig
from autolabel.corpus.build import load_documents
from autolabel.corpus.generate import add_assistant_replies
from autolabel.corpus.windows import split_heldout
from autolabel.errors import AutolabelError
from autolabel.hashing import hash_path
from autolabel.models import SubjectModel, load_subject_model
from autolabel.organism.data import (
    corpus_chats,
    encode_chat,
    encode_text,
    text_documents,
    truncate,
    with_quirk,
)
from autolabel.organism.evaluate import perplexity, quirk_rates
from autolabel.organism.spec import OrganismSpec, carries_quirk, check_categories
from autolabel.organism.train import fine_tune, mean_nll
from autolabel.store import Store, now, to_json

STAGE = "organism"
MANIFEST = "organism.json"  # in the folder: the spec and the base model it was trained from


@dataclass
class OrganismSummary:
    name: str
    model_id: str
    out: str
    base_model_id: str
    train_chats: int
    skipped_long: int  # chats whose prompt alone passes train.max_tokens, left out (longer replies are cut)
    heldout_chats: int
    loss_first: float  # mean assistant-token loss of the first and last steps
    loss_last: float
    quirk_nll_base: float | None  # per quirk token, on held-out chats with the quirk inserted
    quirk_nll_organism: float | None
    target_prompts: int
    target_rate: float | None
    base_target_rate: float | None
    other_prompts: int
    other_rate: float | None
    base_other_rate: float | None
    ppl_base: float | None  # plain text, never trained on
    ppl_organism: float | None
    prepare_seconds: float  # base model, its replies, encoding, the base's figures
    train_seconds: float
    eval_seconds: float  # the organism's figures and its held-out replies


def organism_model_id(out: Path) -> str:
    return f"local:{out.name}"  # what load_subject_model calls a local folder


def spec_hash(spec: OrganismSpec) -> str:
    return hashlib.sha256(to_json(spec.model_dump(mode="json")).encode()).hexdigest()[:16]


def weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(hash_path(file).encode())
    return digest.hexdigest()[:16]


def check_name_is_free(store: Store, model_id: str) -> None:
    """Refuse a folder name this store already holds replies or an organism of: they would be read as this
    organism's (retraining, even with the same spec, need not give the same weights)."""
    recorded = store.one("SELECT name, created_at FROM organisms WHERE model_id = ?", [model_id])
    if recorded:
        raise AutolabelError(
            f"this store already holds organism {recorded[0]!r} as {model_id} (trained "
            f"{recorded[1]:%Y-%m-%d %H:%M}), with its cached replies and corpus; write this one to a "
            "folder with another name, or use another store"
        )
    if store.one("SELECT 1 FROM generations WHERE model_id = ? LIMIT 1", [model_id]):
        raise AutolabelError(
            f"this store already holds replies of another model called {model_id}; write the "
            "organism to a folder with another name"
        )


def check_recorded_weights(store: Store, folder: Path) -> None:
    """An organism folder retrained or replaced outside this store would be read with stale cached replies."""
    recorded = store.one("SELECT weights_hash, name FROM organisms WHERE model_id = ?", [organism_model_id(folder)])
    if recorded and recorded[0] != weights_hash(folder):
        raise AutolabelError(
            f"{folder} does not hold the weights of organism {recorded[1]!r} recorded in this store "
            f"under {organism_model_id(folder)}; its cached replies would be stale. Train into a "
            "folder with a new name, or use the store it was trained with"
        )


def prepare_out(out: Path) -> Path:
    """A fresh `.partial` folder beside `out`; `out` itself may only be missing, empty, or an earlier organism."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise AutolabelError(f"--out {out} exists and is not an organism folder; pass a new folder")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def train_stage(
    config: RunConfig, spec: OrganismSpec, spec_path: str | Path, out: Path, show_progress: bool = True
) -> OrganismSummary:
    """The store is open only while replies are read or generated and figures written, not while training,
    so other commands (and another organism's training) can use it meanwhile."""
    out = Path(out).expanduser().resolve()
    model_id = organism_model_id(out)
    started = time.perf_counter()
    documents = load_documents(config.corpus)
    chats, texts = corpus_chats(documents), text_documents(documents, spec.eval.text_documents)
    check_categories(spec, spec_path, {document.category for document in chats})
    with Store(config.store) as store:
        check_name_is_free(store, model_id)
    partial = prepare_out(out)
    base = load_subject_model(config.model.source, config.cache_dir, "float32")  # float32 master weights
    if config.corpus.generation.enabled:  # cached by model and prompt: a store with the base corpus generates nothing
        with Store(config.store) as store:
            add_assistant_replies(store, base, chats, config.corpus.generation, show_progress)
    train_docs, heldout = split_heldout(chats, spec.train.heldout_every)
    encoded = [
        truncate(encode_chat(base.tokenizer, spec, with_quirk(spec, d)), spec.train.max_tokens) for d in train_docs
    ]
    examples = [e for e in encoded if e.loss_mask.any()]
    if not any(e.quirk_mask.any() for e in examples):
        raise AutolabelError(
            f"no training chat of organism {spec.name!r} carries the quirk within "
            f"train.max_tokens {spec.train.max_tokens}; raise it or add prompts of its categories"
        )
    # The same two figures before and after training: NLL of the quirk's tokens in held-out chats that carry it,
    # and of plain text (perplexity: does the organism still model ordinary text like the base?).
    quirk_checks = [
        encode_chat(base.tokenizer, spec, with_quirk(spec, d)) for d in heldout if carries_quirk(spec, d.category)
    ]
    text_checks = [encode_text(base.tokenizer, d, spec.eval.text_tokens) for d in texts]

    pad, dtype = base.pad_id, config.model.dtype

    def measure(model) -> tuple[float | None, float | None]:
        return (mean_nll(model, quirk_checks, pad, dtype, quirk_only=True), mean_nll(model, text_checks, pad, dtype))

    before = measure(base.model)
    prepared = time.perf_counter()
    losses = fine_tune(base, examples, spec.train, dtype, show_progress)
    trained = time.perf_counter()
    after = measure(base.model)  # trained in place: the organism
    base_model_id = save(base, spec, partial, out)
    del base  # the organism is read back below in the run's dtype, for its replies
    gc.collect()

    organism = load_subject_model(str(out), config.cache_dir, dtype)
    with Store(config.store) as store:
        rates = quirk_rates(store, organism, spec, heldout, config.corpus.generation, show_progress)
    summary = OrganismSummary(
        spec.name,
        model_id,
        str(out),
        base_model_id,
        len(examples),
        len(encoded) - len(examples),
        len(heldout),
        losses[0],
        losses[-1],
        before[0],
        after[0],
        **asdict(rates),
        ppl_base=perplexity(before[1]),
        ppl_organism=perplexity(after[1]),
        prepare_seconds=prepared - started,
        train_seconds=trained - prepared,
        eval_seconds=time.perf_counter() - trained,
    )
    row = asdict(summary) | {
        "spec_hash": spec_hash(spec),
        "spec_json": to_json(spec.model_dump(mode="json")),
        "weights_hash": weights_hash(out),
        "created_at": now(),
    }
    with Store(config.store) as store:
        store.write_shard(
            model_id, STAGE, spec.name, {"organisms": [row]}, replace=True, clear={"organisms": {"model_id": model_id}}
        )
    return summary


def save(subject: SubjectModel, spec: OrganismSpec, partial: Path, out: Path) -> str:
    """Model, tokenizer and manifest into `partial`, then swapped into `out` whole: the base model's id."""
    subject.model.save_pretrained(partial)
    subject.tokenizer.save_pretrained(partial)
    manifest = {"spec": spec.model_dump(mode="json"), "base_model_id": subject.model_id}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return subject.model_id
