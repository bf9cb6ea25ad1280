"""Known-answer benchmark: does the assistant-pervasiveness audit find a behaviour planted in the model?

For each organism spec: train it (or reuse the organism this store already trained, if its folder still holds
those weights), audit it against the base model's run (`flows/organism_audit.py`: the base run is made once and
reused), and apply the rules below, which were fixed before any result was seen:

- a feature is TIED to the quirk when at least TIED_SHARE of its top TOP_EXAMPLES examples peak on a token
  inside the quirk's text (the spec's detector, matched in the organism's assistant turns; no LLM involved);
- a pervasive quirk is FOUND when a tied feature is among the top TOP_N features that became pervasive against
  the base run (ordered by the audit's rank in the organism run);
- a narrow quirk is FOUND when a tied feature is among the top TOP_N features whose assistant-turn firing
  became specific to the quirk's categories (recall.became_specific: share of those categories' turns minus the
  highest share elsewhere, organism run minus base run), and it is expected NOT to be flagged pervasive (no
  tied feature among the features that became pervasive).

Prints one row per organism: the held-out quirk rate and plain-text perplexity from training, how many
features became pervasive, found / not found, the rank of the best tied feature, and seconds per phase.

    .venv/bin/python benchmarks/audit_recall.py --store /tmp/recall.duckdb --out-dir /tmp/organisms

Training reads the default corpus's chats (their base replies come from the store's generation cache); the
audits run on AUDIT_CORPUS (the six prompt sets and 60 plain-text documents) unless --audit-corpus default,
which is about four times the tokens to generate and collect for each model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("COLUMNS", "220")  # the result table is wide; rich reads this once  # a loaded machine starts it slowly

from autolabel.config import RunConfig, SourceConfig, load_config
from autolabel.errors import AutolabelError
from autolabel.organism.spec import ORGANISMS_DIR, OrganismSpec, load_organism_spec
from autolabel.store import Store
from autolabel.summaries import print_table

TIED_SHARE = 0.5
TOP_EXAMPLES = 20  # = autolabel.organism.audit.TOP_EXAMPLES, the share the audit command reports
TOP_N = 10
AUDIT_CORPUS = [SourceConfig(name="prompts"), SourceConfig(name="bbc_news", limit=30),
                SourceConfig(name="chitchat", limit=30)]


def stored_organism(config: RunConfig, folder: Path) -> dict | None:
    from autolabel.organism.stage import organism_model_id

    with Store(config.store) as store:
        columns, rows = store.query("SELECT * FROM organisms WHERE model_id = ?", [organism_model_id(folder)])
    return dict(zip(columns, rows[0], strict=True)) if rows else None


def trained_organism(config: RunConfig, spec: OrganismSpec, path: Path, out_dir: Path) -> dict:
    """The organisms row of `spec`, training it first unless this store has it (the audit checks that the
    folder still holds the recorded weights)."""
    from autolabel.organism.stage import train_stage

    folder = (out_dir / spec.name).resolve()
    row = stored_organism(config, folder)
    if row is None:
        train_stage(config, spec, path, folder)
        row = stored_organism(config, folder) | {"trained_now": True}
    return row


def best_tied(rows: list[dict]) -> dict | None:
    """The best-ranked row whose top examples peak inside the quirk often enough."""
    return next((row for row in rows if row["in_quirk"] >= TIED_SHARE), None)


def verdict(spec: OrganismSpec, became: list[dict], specific: list[dict]) -> tuple[bool, dict | None, str, str]:
    """(found, the tied feature that decided it, where it ranks, the note on the other list)."""
    tied_pervasive = best_tied(became)
    if spec.pervasive:
        found = tied_pervasive is not None and became.index(tied_pervasive) < TOP_N
        rank = f"{became.index(tied_pervasive) + 1} of {len(became)}" if tied_pervasive else f"none of {len(became)}"
        return found, tied_pervasive, rank, ""
    tied_specific = best_tied(specific)  # the audit command checks the top rows of the category ranking only
    found = tied_specific is not None and specific.index(tied_specific) < TOP_N
    rank = f"{specific.index(tied_specific) + 1}" if tied_specific else f"none in the top {len(specific)}"
    flagged = "flagged pervasive too" if tied_pervasive else "not flagged pervasive"
    return found, tied_specific, rank, flagged


def rate(value: float | None, n: int | None) -> str:
    return "-" if value is None else f"{value:.0%} of {n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run config (default: the defaults)")
    parser.add_argument("--store", default="audit_recall.duckdb")
    parser.add_argument("--out-dir", default="organisms", help="where organism folders are written")
    parser.add_argument("--spec", action="append", help="organism spec (repeatable; default: the built-in ones)")
    parser.add_argument("--audit-corpus", choices=["small", "default"], default="small")
    parser.add_argument("--label", type=int, default=0, help="label this many flagged features per run (LLM calls)")
    args = parser.parse_args()

    from flows.organism_audit import organism_audit

    config = load_config(args.config)
    config.store = args.store
    audit_config = config.model_copy(deep=True)
    if args.audit_corpus == "small":
        audit_config.corpus.sources = [source.model_copy() for source in AUDIT_CORPUS]
    audit_config.audit.label_flagged = args.label
    paths = [Path(p) for p in args.spec] if args.spec else sorted(ORGANISMS_DIR.glob("*.yaml"))
    rows, phases = [], []
    for path in paths:
        spec = load_organism_spec(path)
        started = time.perf_counter()
        organism = trained_organism(config, spec, path, Path(args.out_dir))
        train_wall = time.perf_counter() - started
        result = organism_audit(audit_config, spec, Path(organism["out"]), "base", report=False, show_progress=False)
        found, feature, rank, note = verdict(spec, result.became, result.specific)
        kind = "pervasive" if spec.pervasive else f"narrow ({', '.join(spec.quirk.categories)})"
        rows.append((spec.name, kind, rate(organism["target_rate"], organism["target_prompts"]),
                     rate(organism["other_rate"], organism["other_prompts"]),
                     f"{organism['ppl_base']:.2f} -> {organism['ppl_organism']:.2f}", len(result.became),
                     "FOUND" if found else "not found", rank,
                     f"L{feature['layer']}/{feature['feature']}" if feature else "-",
                     f"{feature['in_quirk']:.0%}" if feature else "-", (feature or {}).get("label") or "-", note))
        phases.append((spec.name, "trained now" if organism.get("trained_now") else "reused",
                       f"{organism['prepare_seconds']:.0f}", f"{organism['train_seconds']:.0f}",
                       f"{organism['eval_seconds']:.0f}", f"{train_wall:.0f}",
                       f"{result.seconds.get('base', 0):.0f}" if result.base_ran_now else "reused",
                       f"{result.seconds['organism']:.0f}"))
    print_table(f"audit recall (tied: >= {TIED_SHARE:.0%} of top {TOP_EXAMPLES} examples peak in the quirk; "
                f"found: a tied feature in the top {TOP_N})",
                ["organism", "quirk", "held-out quirk rate", "other categories", "text ppl base -> organism",
                 "became pervasive", "result", "rank of best tied", "feature", "peaks in quirk", "label", "note"], rows)
    print_table("seconds per phase", ["organism", "organism", "prepare", "train", "check", "train wall",
                                      "base audit run", "organism audit run"], phases)


if __name__ == "__main__":
    try:
        main()
    except AutolabelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
