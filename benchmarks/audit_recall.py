"""Known-answer benchmark: does the audit find a behaviour planted in the model, and does it stay quiet when
nothing changed?

For each organism spec: train it (or reuse the organism this store already trained, if its folder still holds
those weights), audit it against the base model's run (`flows/organism_audit.py`: the base run is made once and
reused; the spec's own audits, such as a narrow quirk's category-restricted one, run beside the config's), and
apply the rules below, which were fixed before any result they decide was seen:

- a feature is TIED to the quirk by the firing rule of autolabel.organism.recall (`tied`: its mean activation on
  the quirk's tokens is at least FIRING_RATIO times its mean on every other token of the run's corpus, and it
  fires on the quirk in at least FIRING_CHATS of the chats carrying it). The first rule (at least PEAK_SHARE of
  its top TOP_EXAMPLES examples peak inside the quirk) is printed beside it;
- a pervasive quirk is FOUND when a tied feature is among the top TOP_N features that became flagged by the
  pervasiveness audit against the base run (in the audit's rank order in the organism run);
- a narrow quirk is FOUND when a tied feature is among the top TOP_N features that became flagged by its
  spec's category-restricted audit, and it is expected NOT to be flagged pervasive (no tied feature among the
  features that became flagged by the pervasiveness audit, at any rank);
- FALSE ALARMS: the base model audited on the same corpus sources sampled with two seeds (default: the config's
  and the next), the second run diffed against the first with every audit above; the rate is the diff's
  changes (became + stopped pervasive: a flag that flipped with the assistant-turn share moving beyond
  sampling noise, audit/diff.py) over the features the first run flags, per audit. Flips within noise are
  counted beside it. Target: at most 2%.

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
os.environ.setdefault(
    "COLUMNS", "220"
)  # the result table is wide; rich reads this once  # a loaded machine starts it slowly

from autolabel.config import RunConfig, SourceConfig, load_config
from autolabel.errors import AutolabelError
from autolabel.organism.recall import FIRING_CHATS, FIRING_RATIO, TOP_EXAMPLES
from autolabel.organism.spec import ORGANISMS_DIR, OrganismSpec, load_organism_spec
from autolabel.store import Store
from autolabel.summaries import print_table

PEAK_SHARE = 0.5
TOP_N = 10
FALSE_ALARM_TARGET = 0.02
AUDIT_CORPUS = [
    SourceConfig(name="prompts"),
    SourceConfig(name="bbc_news", limit=30),
    SourceConfig(name="chitchat", limit=30),
]


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
    return next((row for row in rows if row["tied"]), None)


def best_by_peaks(rows: list[dict]) -> str:
    """Where the first rule would put the best tied feature."""
    index = next((i for i, row in enumerate(rows) if row["in_quirk"] >= PEAK_SHARE), None)
    return "-" if index is None else f"{index + 1}"


def verdict(
    spec: OrganismSpec, changes: dict[str, list[dict]], pervasive_audit: str, category_audits: list[str]
) -> tuple[bool, str, dict | None, str, str, str]:
    """(found, the audit that decides, the tied feature that decided it, its rank, rank by the peaks rule,
    the note on the pervasiveness audit for a narrow quirk)."""
    flagged_pervasive = changes.get(pervasive_audit, [])
    deciding = pervasive_audit if spec.pervasive else next(iter(category_audits), None)
    if deciding is None:
        return False, "-", None, "no category audit in the spec", "-", ""
    rows = changes.get(deciding, [])
    feature = best_tied(rows)
    found = feature is not None and rows.index(feature) < TOP_N
    rank = f"{rows.index(feature) + 1} of {len(rows)}" if feature else f"none of {len(rows)}"
    note = ""
    if not spec.pervasive:
        tied_pervasive = best_tied(flagged_pervasive)
        note = (
            f"flagged pervasive too (rank {flagged_pervasive.index(tied_pervasive) + 1})"
            if tied_pervasive
            else "not flagged pervasive"
        )
    return found, deciding, feature, rank, best_by_peaks(rows), note


def false_alarms(config: RunConfig, seeds: tuple[int, int], specs: list[Path]) -> list[tuple]:
    """The base model on the corpus sampled with seeds[0] (its stored run, or made now) and with seeds[1], the
    second diffed against the first by every audit: per audit, the features the first run flags, the diff's
    changes (and the flag flips within sampling noise, which are not changes) and their share."""
    from autolabel.audit.measure import measure
    from autolabel.audit.spec import load_spec
    from autolabel.organism.audit import base_run
    from flows.audit_pipeline import audit_pipeline

    def sampled(seed: int, against: str | None) -> RunConfig:
        settings = config.model_copy(deep=True)
        settings.corpus.seed, settings.audit.against = seed, against
        settings.audit.specs, settings.audit.label_flagged = [str(path) for path in specs], 0
        return settings

    started = time.perf_counter()
    with Store(config.store) as store:
        first = base_run(store, sampled(seeds[0], None), "base")
    if first is None:
        first = audit_pipeline(sampled(seeds[0], None), until="audit", show_progress=False).run_id
    second = audit_pipeline(sampled(seeds[1], first), until="audit", show_progress=False).run_id
    seconds = time.perf_counter() - started
    rows = []
    with Store(config.store, read_only=True) as store:
        for path in specs:
            spec = load_spec(path)
            flagged = int(measure(store, first, spec).flagged.sum())
            changes = dict(
                store.rows(
                    "SELECT change, count(*) FROM audit_diffs WHERE run_id = ? AND against_run_id = ? "
                    "AND audit = ? GROUP BY 1",
                    [second, first, spec.name],
                )
            )
            changed = changes.get("became_pervasive", 0) + changes.get("stopped_pervasive", 0)
            share = changed / flagged if flagged else float("nan")
            rows.append(
                (
                    spec.name,
                    f"{seeds[0]}: {first}",
                    f"{seeds[1]}: {second}",
                    flagged,
                    changes.get("became_pervasive", 0),
                    changes.get("stopped_pervasive", 0),
                    changes.get("within_noise", 0),
                    f"{share:.1%}",
                    "met" if share <= FALSE_ALARM_TARGET else "NOT met",
                    f"{seconds:.0f}",
                )
            )
    return rows


def rate(value: float | None, n: int | None) -> str:
    return "-" if value is None else f"{value:.0%} of {n}"


def firing_text(firing) -> str:
    return "-" if firing is None else f"{firing.quirk_mean:.3f} / {firing.elsewhere_mean:.4f} ({firing.chat_share:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run config (default: the defaults)")
    parser.add_argument("--store", default="audit_recall.duckdb")
    parser.add_argument("--out-dir", default="organisms", help="where organism folders are written")
    parser.add_argument("--spec", action="append", help="organism spec (repeatable; default: the built-in ones)")
    parser.add_argument("--audit-corpus", choices=["small", "default"], default="small")
    parser.add_argument(
        "--label",
        type=int,
        default=0,
        help="label (and intervene on) this many flagged features per audit of each organism run (LLM calls)",
    )
    parser.add_argument(
        "--false-alarm-seeds",
        default=None,
        help="corpus seeds A,B of the base-vs-base check (default: the config's seed and seed + 1)",
    )
    parser.add_argument("--no-false-alarms", action="store_true", help="skip the base-vs-base run")
    parser.add_argument("--no-organisms", action="store_true", help="only the base-vs-base check")
    args = parser.parse_args()

    from autolabel.audit.spec import load_spec
    from autolabel.organism.spec import audit_spec_paths
    from flows.organism_audit import organism_audit

    config = load_config(args.config)
    config.store = args.store
    audit_config = config.model_copy(deep=True)
    if args.audit_corpus == "small":
        audit_config.corpus.sources = [source.model_copy() for source in AUDIT_CORPUS]
    audit_config.audit.label_flagged = args.label
    pervasive_audit = load_spec(audit_config.audit.specs[0]).name
    paths = [Path(p) for p in args.spec] if args.spec else sorted(ORGANISMS_DIR.glob("*.yaml"))
    rows, phases, all_specs = [], [], [Path(p) for p in audit_config.audit.specs]
    for path in [] if args.no_organisms else paths:
        spec = load_organism_spec(path)
        category_specs = audit_spec_paths(spec)
        started = time.perf_counter()
        organism = trained_organism(config, spec, path, Path(args.out_dir))
        train_wall = time.perf_counter() - started
        result = organism_audit(audit_config, spec, Path(organism["out"]), "base", report=False, show_progress=False)
        found, deciding, feature, rank, by_peaks, note = verdict(
            spec, result.changes, pervasive_audit, [load_spec(p).name for p in category_specs]
        )
        kind = "pervasive" if spec.pervasive else f"narrow ({', '.join(spec.quirk.categories)})"
        feature = feature or {}
        rows.append(
            (
                spec.name,
                kind,
                rate(organism["target_rate"], organism["target_prompts"]),
                rate(organism["other_rate"], organism["other_prompts"]),
                f"{organism['ppl_base']:.2f} -> {organism['ppl_organism']:.2f}",
                deciding,
                "FOUND" if found else "not found",
                rank,
                by_peaks,
                f"L{feature['layer']}/{feature['feature']}" if feature else "-",
                firing_text(feature.get("firing")),
                f"{feature['in_quirk']:.0%}" if feature else "-",
                "-" if feature.get("ablation_kl") is None else f"{feature['ablation_kl']:.4f}",
                feature.get("label") or "-",
                note,
            )
        )
        phases.append(
            (
                spec.name,
                "trained now" if organism.get("trained_now") else "reused",
                f"{organism['prepare_seconds']:.0f}",
                f"{organism['train_seconds']:.0f}",
                f"{organism['eval_seconds']:.0f}",
                f"{train_wall:.0f}",
                f"{result.seconds.get('base', 0):.0f}" if result.base_ran_now else "reused",
                f"{result.seconds['organism']:.0f}",
            )
        )
    if rows:
        print_table(
            f"audit recall (tied: quirk activation >= {FIRING_RATIO:.0f}x elsewhere in >= {FIRING_CHATS:.0%} "
            f"of quirk chats; found: a tied feature in the top {TOP_N} of the deciding audit's new flags)",
            [
                "organism",
                "quirk",
                "held-out quirk rate",
                "other categories",
                "text ppl base -> organism",
                "deciding audit",
                "result",
                "rank of best tied",
                f"by peaks (>= {PEAK_SHARE:.0%} of top {TOP_EXAMPLES})",
                "feature",
                "quirk / elsewhere act (chats)",
                "peaks in quirk",
                "ablation KL",
                "label",
                "note",
            ],
            rows,
        )
        print_table(
            "seconds per phase",
            ["organism", "organism", "prepare", "train", "check", "train wall", "base audit run", "organism audit run"],
            phases,
        )
    if not args.no_false_alarms:
        seed = audit_config.corpus.seed
        seeds = tuple(int(s) for s in args.false_alarm_seeds.split(",")) if args.false_alarm_seeds else (seed, seed + 1)
        all_specs += [p for path in paths for p in audit_spec_paths(load_organism_spec(path)) if p not in all_specs]
        print_table(
            f"false alarms: the base model on the corpus sampled with seed {seeds[1]} against seed "
            f"{seeds[0]} (target <= {FALSE_ALARM_TARGET:.0%} of flagged)",
            [
                "audit",
                "run A (seed: id)",
                "run B",
                "flagged in A",
                "became flagged",
                "stopped",
                "within noise (not changes)",
                "changes / flagged",
                "target",
                "seconds",
            ],
            false_alarms(audit_config, seeds, all_specs),
        )


if __name__ == "__main__":
    try:
        main()
    except AutolabelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
