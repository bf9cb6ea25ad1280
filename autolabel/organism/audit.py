"""`autolabel organism audit`: the default audit pipeline run on an organism, diffed against the base model's
run with the same corpus sources, transcoders and settings (run first when the store has none).

The organism is only a different `model.source`: its corpus gets its own assistant turns (the corpus id
depends on the model id), collection uses the same transcoders, and `audit.against` names the base run.
Everything here is run lookup and the configs the flow (flows/organism_audit.py) runs with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from autolabel.config import RunConfig
from autolabel.errors import AutolabelError
from autolabel.intervene.evidence import ablation_effects
from autolabel.models import SubjectModel
from autolabel.organism.recall import TOP_EXAMPLES, became_flagged, peak_in_quirk, quirk_chats, quirk_firing, tied
from autolabel.organism.spec import OrganismSpec, audit_spec_paths
from autolabel.organism.stage import check_recorded_weights
from autolabel.pipeline import collected_run, collected_runs
from autolabel.store import Store
from autolabel.transcoders.stage import open_transcoders
from autolabel.transcoders.transcoder import TranscoderSet


@dataclass
class OrganismAudit:
    spec: str
    folder: str
    run_id: str
    against: str
    base_ran_now: bool
    # audit name -> the features that became flagged against the base run, by audit rank, each with `in_quirk`
    # (share of top-example peaks inside the quirk), its quirk firing, `tied`, label, score and ablation KL
    changes: dict[str, list[dict]]
    report: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # base, organism, report


def organism_folder(store: Store, spec: OrganismSpec, model: str | None) -> Path:
    """`--model`, or the folder this store trained the spec's organism into."""
    if model is None:
        row = store.one("SELECT out FROM organisms WHERE name = ? ORDER BY created_at DESC LIMIT 1", [spec.name])
        if row is None:
            raise AutolabelError(
                f"this store has no organism {spec.name!r}; train it with `autolabel organism train "
                f"--spec ... --out DIR` or pass --model DIR"
            )
        model = row[0]
    folder = Path(model).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise AutolabelError(
            f"organism folder {folder} has no config.json; pass the folder `autolabel organism train --out` wrote"
        )
    check_recorded_weights(store, folder)
    return folder


def check_fits_transcoders(folder: Path, config: RunConfig) -> None:
    """The organism's width and depth against the transcoders', before anything runs or is written."""
    model = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = model.get("text_config", model)
    tset = open_transcoders(config.transcoder.source, config.transcoder.format)
    widths = {tset[layer].d_in for layer in tset.layers}
    if widths != {model.get("hidden_size")} or max(tset.layers) >= model.get("num_hidden_layers", 0):
        raise AutolabelError(
            f"organism {folder} (hidden_size {model.get('hidden_size')}, "
            f"{model.get('num_hidden_layers')} layers) does not fit transcoder "
            f"{config.transcoder.source} (d_in {sorted(widths)}, layers {tset.layers}); fine-tune "
            "the model the transcoders were made for, or pass its transcoders"
        )


def same_collection(stored: RunConfig, config: RunConfig) -> bool:
    return (
        stored.model == config.model
        and stored.corpus == config.corpus
        and stored.collect == config.collect
        and (stored.transcoder.source, stored.transcoder.format) == (config.transcoder.source, config.transcoder.format)
    )


def base_run(store: Store, config: RunConfig, against: str) -> str | None:
    """The run to diff against: `against` itself, or with "base" the latest collected run of `config`'s
    model with the same corpus sources, transcoders and collect settings (None: there is none yet)."""
    if against != "base":
        return collected_run(store, against)[0]
    return next((run_id for run_id, stored in collected_runs(store) if same_collection(stored, config)), None)


def base_config(config: RunConfig) -> RunConfig:
    return config.model_copy(update={"audit": config.audit.model_copy(update={"against": None})}, deep=True)


def organism_config(config: RunConfig, folder: Path, against: str, spec: OrganismSpec) -> RunConfig:
    """The organism's run: its folder as the model, diffed against `against`, with the spec's own audits too."""
    specs = config.audit.specs + [str(path) for path in audit_spec_paths(spec)]
    return config.model_copy(
        update={
            "model": config.model.model_copy(update={"source": str(folder)}),
            "audit": config.audit.model_copy(update={"against": against, "specs": specs}),
        },
        deep=True,
    )


def findings(
    store: Store,
    spec: OrganismSpec,
    run_id: str,
    against: str,
    subject: SubjectModel,
    tset: TranscoderSet,
    audits: list[str],
) -> dict[str, list[dict]]:
    """Per audit: every feature that became flagged against the base run, with what ties it to the quirk
    (recall.py) and the run's causal evidence where interventions ran."""
    corpus_id = store.one("SELECT corpus_id FROM runs WHERE run_id = ?", [run_id])[0]
    chats = quirk_chats(store, corpus_id, subject.tokenizer, spec)
    masks = {doc_id: chat.quirk_mask for doc_id, chat in chats.items()}
    changes = {audit: became_flagged(store, run_id, against, audit) for audit in audits}
    keys = sorted({(row["layer"], row["feature"]) for rows in changes.values() for row in rows})
    shares = peak_in_quirk(store, run_id, masks, TOP_EXAMPLES, keys)
    firing = quirk_firing(store, run_id, subject, tset, list(chats.values()), keys)
    effects = ablation_effects(store, run_id)
    for rows in changes.values():
        for row in rows:
            key = (row["layer"], row["feature"])
            effect = effects.get(key)
            row |= {
                "in_quirk": shares.get(key, 0.0),
                "firing": firing.get(key),
                "tied": tied(firing.get(key)),
                "ablation_kl": effect.mean if effect else None,
                "causal": effect.causal if effect else None,
            }
    return changes
