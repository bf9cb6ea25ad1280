"""The `autolabel` command: one app assembled from the command modules (cli_pipeline.py: the flow's commands,
cli_commands.py: one stage each, cli_inputs.py and organism/command.py: the sub-apps), and main, which turns bad input
into one line and exit code 2."""

from __future__ import annotations

import logging
import sys

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from autolabel.cli_commands import commands_app
from autolabel.cli_inputs import corpus_app, model_app, transcoder_app
from autolabel.cli_pipeline import pipeline_app
from autolabel.errors import AutolabelError
from autolabel.organism.command import organism_app

app = typer.Typer(
    help="Label and audit the features of transcoders of language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Unnamed, so their commands are the app's own; in this order, `autolabel --help` lists them as before the split.
app.add_typer(pipeline_app)
app.add_typer(commands_app)
app.add_typer(corpus_app, name="corpus")
app.add_typer(model_app, name="model")
app.add_typer(transcoder_app, name="transcoder")
app.add_typer(organism_app, name="organism")

err_console = Console(stderr=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record, not the one it was made with."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def _log_to_stderr() -> None:
    """Stage progress outside a flow goes to the `autolabel` logger (see autolabel/progress.py): show it."""
    logger = logging.getLogger("autolabel")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main() -> None:
    _log_to_stderr()
    try:
        app()
    except AutolabelError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ValidationError as err:  # an option that overwrote a config value with one the config refuses
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        err_console.print(f"[bold red]error:[/] invalid setting: {escape(problems)}", highlight=False, soft_wrap=True)
        sys.exit(2)
