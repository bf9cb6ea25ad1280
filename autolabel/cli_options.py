"""Options and helpers every `autolabel` command module shares (cli_pipeline.py, cli_commands.py, cli_inputs.py,
organism/command.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autolabel.config import RunConfig, load_config
from autolabel.errors import AutolabelError

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run config YAML (defaults: the embedded offline run).")
]
StoreOption = Annotated[str | None, typer.Option("--store", help="DuckDB file (overrides the config).")]
ModelOption = Annotated[
    str | None, typer.Option("--model", help="embedded:smollm2, a HF folder, a .gguf file or a hub id.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def load_run_config(config: Path | None, store: str | None = None, model: str | None = None) -> RunConfig:
    """The run config of --config (or the defaults), with --store and --model laid over it."""
    run_config = load_config(config)
    if store:
        run_config.store = store
    if model:
        run_config.model.source = model
    return run_config


def int_list(value: str | None, option: str) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError as err:
        raise AutolabelError(f"{option} must be comma-separated integers such as 6,15, not {value!r}") from err
