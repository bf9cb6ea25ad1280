"""`autolabel corpus`, `autolabel model` and `autolabel transcoder`: the sub-apps that prepare and inspect a run's
inputs (sub-apps of autolabel.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from autolabel.cli_options import ConfigOption, ModelOption, QuietOption, StoreOption, int_list, load_run_config
from autolabel.summaries import console, print_corpus_summary, print_quality, print_table

corpus_app = typer.Typer(help="Build and inspect the corpus of plain text and chat transcripts.", no_args_is_help=True)
model_app = typer.Typer(help="Inspect the subject model and its hook points.", no_args_is_help=True)
transcoder_app = typer.Typer(help="Check or train transcoders.", no_args_is_help=True)


@corpus_app.command("build")
def corpus_build(
    config: ConfigOption = None, store: StoreOption = None, model: ModelOption = None, quiet: QuietOption = False
) -> None:
    """Read the corpus sources, generate assistant turns, tag every token with its role, store it."""
    from autolabel.corpus import build_corpus
    from autolabel.models import load_subject_model
    from autolabel.store import Store

    run_config = load_run_config(config, store, model)
    subject = load_subject_model(run_config.model.source, run_config.cache_dir, run_config.model.dtype)
    with Store(run_config.store) as db:
        print_corpus_summary(build_corpus(db, run_config.corpus, subject, show_progress=not quiet))


@model_app.command("info")
def model_info(
    model: ModelOption = None,
    config: ConfigOption = None,
    layer: Annotated[int, typer.Option(help="Layer whose hook points to resolve.")] = 0,
) -> None:
    """Load the subject model and show its shape and resolved hook points."""
    from autolabel.models import HOOK_ALIASES, load_subject_model

    run_config = load_run_config(config, model=model)
    subject = load_subject_model(run_config.model.source, run_config.cache_dir, run_config.model.dtype)
    console.print(
        f"{escape(subject.model_id)}: family {subject.family}, {subject.n_layers} layers, d_model {subject.d_model}"
    )
    rows = [(alias, subject.hook_point(alias, layer).name) for alias in sorted(HOOK_ALIASES)]
    print_table(f"hook points at layer {layer}", ["name", "resolves to"], rows)


TranscoderOption = Annotated[
    str | None,
    typer.Option(
        "--transcoder",
        "-t",
        help="embedded:smollm2 or a transcoder folder/file (circuit-tracer, Gemma Scope, SAELens, sparsify).",
    ),
]


@transcoder_app.command("check")
def transcoder_check(
    transcoder: TranscoderOption = None,
    format: Annotated[
        str | None, typer.Option("--format", help="auto, circuit_tracer, clt, gemma_scope, saelens, sparsify.")
    ] = None,
    tokens: Annotated[int | None, typer.Option(help="Held-out tokens to measure on.")] = None,
    max_fvu: Annotated[float | None, typer.Option(help="Refuse above this FVU.")] = None,
    config: ConfigOption = None,
    store: StoreOption = None,
    model: ModelOption = None,
    quiet: QuietOption = False,
) -> None:
    """Measure FVU, L0 and dead fraction per layer on held-out corpus tokens; store them; refuse a bad fit."""
    from autolabel.models import load_subject_model
    from autolabel.store import Store
    from autolabel.transcoders.stage import check_stage

    run_config = load_run_config(config, store, model)
    settings = run_config.transcoder
    settings.source = transcoder or settings.source
    settings.format = format or settings.format
    settings.check_tokens = tokens or settings.check_tokens
    settings.max_fvu = settings.max_fvu if max_fvu is None else max_fvu
    subject = load_subject_model(run_config.model.source, run_config.cache_dir, run_config.model.dtype)
    with Store(run_config.store) as db:
        _, transcoder_id, quality = check_stage(db, subject, run_config, show_progress=not quiet)
    print_quality(quality)
    console.print(
        f"transcoder [bold]{transcoder_id}[/] fits (FVU <= {settings.max_fvu} on every layer); "
        "recorded in `transcoders`"
    )


@transcoder_app.command("train")
def transcoder_train(
    out: Annotated[Path, typer.Option(help="Folder to write the transcoder set to; re-run to continue.")],
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers, e.g. 6,15,24, or all.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Training tokens.")] = None,
    group_size: Annotated[
        int | None, typer.Option(min=1, help="Layers trained at once (memory: their buffers).")
    ] = None,
    max_groups: Annotated[
        int | None, typer.Option(min=1, help="Train at most this many groups now, then stop.")
    ] = None,
    config: ConfigOption = None,
    store: StoreOption = None,
    model: ModelOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train per-layer TopK/JumpReLU transcoders on the corpus, a group of layers at a time; save them in the
    circuit-tracer layout. A re-run with the same arguments continues an interrupted training."""
    from autolabel.models import load_subject_model
    from autolabel.store import Store
    from autolabel.transcoders.stage import corpus_windows, train_stage

    run_config = load_run_config(config, store, model)
    train_config = run_config.transcoder.train
    subject = load_subject_model(run_config.model.source, run_config.cache_dir, run_config.model.dtype)
    train_config.layers = (
        list(range(subject.n_layers)) if layers == "all" else (int_list(layers, "--layers") or train_config.layers)
    )
    train_config.n_tokens = tokens or train_config.n_tokens
    train_config.group_size = group_size or train_config.group_size
    with Store(run_config.store) as db:
        train, _ = corpus_windows(db, subject, run_config, not quiet, for_training=True)
        _, heldout = corpus_windows(db, subject, run_config, not quiet)
    result = train_stage(train, heldout, subject, run_config, out, not quiet, max_groups)
    print_quality(result.quality)
    if result.transcoders is None:
        console.print(f"{result.finished} of {len(result.groups)} layer groups trained; the same command continues")
        return
    done = "trained" if result.trained_now else "already trained, nothing to do"
    console.print(
        escape(f"{done}: saved to {out} (circuit-tracer layout; open with `autolabel transcoder check -t {out}`)")
    )
