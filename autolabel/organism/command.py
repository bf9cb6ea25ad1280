"""`autolabel organism train` and `autolabel organism audit` (a sub-app of autolabel.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from autolabel.cli_options import QuietOption, StoreOption, load_run_config
from autolabel.organism.recall import QuirkFiring
from autolabel.organism.spec import load_organism_spec
from autolabel.summaries import console, print_table

organism_app = typer.Typer(
    help="Plant a known behaviour in the subject model, and audit the result against the base.", no_args_is_help=True
)

SpecOption = Annotated[
    Path, typer.Option("--spec", help="Organism spec YAML (built-in: autolabel/data/defaults/organisms/).")
]
SHOWN = 20  # features listed per audit
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run config YAML: the base model, corpus and store.")
]


def _rate(rate: float | None, n: int) -> str:
    return "-" if rate is None else f"{rate:.0%} of {n}"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _firing(firing: QuirkFiring | None) -> str:
    """Mean activation on the quirk over the mean elsewhere, and the share of quirk chats it fires in."""
    if firing is None:
        return "-"
    ratio = "inf" if firing.ratio == float("inf") else f"{firing.ratio:.1f}x"
    return f"{ratio} ({firing.chat_share:.0%})"


@organism_app.command("train")
def train(
    spec: SpecOption,
    out: Annotated[Path, typer.Option(help="Folder to write the organism to (a HF model folder).")],
    config: ConfigOption = None,
    store: StoreOption = None,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune the subject model on its own replies with the spec's quirk inserted; save a HF folder that
    `model.source` accepts; report the quirk rate on held-out prompts and plain-text perplexity against the base."""
    from autolabel.organism.stage import train_stage

    organism = load_organism_spec(spec)
    s = train_stage(load_run_config(config, store), organism, spec, out, show_progress=not quiet)
    shows = "every reply" if organism.pervasive else ", ".join(organism.quirk.categories)
    print_table(
        f"organism {s.name} ({shows}): held-out prompts",
        ["", "prompts", "organism", "base model"],
        [
            (
                "quirk category" if not organism.pervasive else "all",
                s.target_prompts,
                _rate(s.target_rate, s.target_prompts),
                _rate(s.base_target_rate, s.target_prompts),
            ),
            *(
                [
                    (
                        "other categories",
                        s.other_prompts,
                        _rate(s.other_rate, s.other_prompts),
                        _rate(s.base_other_rate, s.other_prompts),
                    )
                ]
                if not organism.pervasive
                else []
            ),
            ("NLL per quirk token", s.target_prompts, _number(s.quirk_nll_organism), _number(s.quirk_nll_base)),
            ("plain-text perplexity", organism.eval.text_documents, _number(s.ppl_organism, 2), _number(s.ppl_base, 2)),
        ],
    )
    console.print(
        f"trained on {s.train_chats} chats ({s.skipped_long} whose prompt passes train.max_tokens left out), "
        f"loss {s.loss_first:.3f} -> {s.loss_last:.3f}; {s.prepare_seconds:.0f} s preparing, "
        f"{s.train_seconds:.0f} s training, {s.eval_seconds:.0f} s checking; figures in `organisms`"
    )
    console.print(
        escape(
            f"saved to {s.out} (model id {s.model_id}); audit it with: autolabel organism audit "
            f"--spec {spec} --against base"
        ),
        soft_wrap=True,
    )


@organism_app.command("audit")
def audit(
    spec: SpecOption,
    config: ConfigOption = None,
    store: StoreOption = None,
    quiet: QuietOption = False,
    model: Annotated[
        str | None,
        typer.Option("--model", help="The organism folder (default: where this store trained the spec's organism)."),
    ] = None,
    against: Annotated[
        str,
        typer.Option(
            help="The base run id, or 'base': the latest run of the config's model "
            "with the same corpus, transcoders and settings (run now if none)."
        ),
    ] = "base",
    no_report: Annotated[
        bool, typer.Option("--no-report", help="Do not write the organism run's HTML report.")
    ] = False,
) -> None:
    """Run the audit pipeline on an organism (its own assistant turns, the same transcoders) against the base
    model's run, and list per audit the features that became flagged, with how they fire on the planted
    quirk, their labels and causal evidence."""
    import os

    from autolabel.cli_flows import prefect_flows
    from autolabel.organism.audit import check_fits_transcoders, organism_folder
    from autolabel.store import Store

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # two pipelines: minutes anyway
    organism = load_organism_spec(spec)
    run_config = load_run_config(config, store)
    with Store(run_config.store, create=model is not None) as db:  # without --model, the store trained it
        folder = organism_folder(db, organism, model)
    check_fits_transcoders(folder, run_config)
    flow = prefect_flows("organism_audit").organism_audit
    result = flow(run_config, organism, folder, against, report=not no_report, show_progress=not quiet)
    for audit_name, changed in result.changes.items():
        rows = [
            (
                r["rank"],
                f"{r['layer']}/{r['feature']}",
                _number(r["turn_share"], 2),
                _number(r["against_turn_share"], 2),
                _firing(r["firing"]),
                "yes" if r["tied"] else "no",
                f"{r['in_quirk']:.0%}",
                _number(r["ablation_kl"], 4),
                _number(r["score"], 2),
                r["label"],
            )
            for r in changed[:SHOWN]
        ]
        print_table(
            f"{organism.name}: {len(changed)} features became flagged by {audit_name} against "
            f"{result.against} (top {SHOWN})",
            [
                "rank",
                "layer/feature",
                "assistant turns",
                "base run",
                "quirk / elsewhere (chats)",
                "tied",
                "peaks in quirk",
                "ablation KL",
                "score",
                "label",
            ],
            rows,
        )
    ran = "run now" if result.base_ran_now else "reused"
    console.print(
        f"organism run [bold]{result.run_id}[/] against base run {result.against} ({ran}); "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.seconds.items()),
        soft_wrap=True,
    )
    if result.report:
        console.print(f"report: {escape(result.report)}", soft_wrap=True)
