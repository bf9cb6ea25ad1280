"""Progress for long work: a rich bar on a terminal, plain log lines everywhere else.

A scheduled run writes to a log, not a terminal, and a bar there prints nothing until it ends
(or floods the log with redraws). Without a TTY each task logs its start, its progress at most
every 10% or every 30 s, and its end, through Prefect's logger inside a flow run (so the lines
show in the Prefect UI) and the `autolabel` logger outside one.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOG_EVERY_FRACTION = 0.1
LOG_EVERY_S = 30.0


class _Rate(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        return f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:
        pass
    return logging.getLogger("autolabel")


@dataclass
class _LoggedTask:
    description: str
    total: float | None
    completed: float
    started: float = field(default_factory=time.monotonic)
    logged_at: float = field(default_factory=time.monotonic)
    logged_step: int = 0  # progress steps (of every_fraction) already logged


class LogProgress:
    """The part of rich's Progress the stages use (add_task, advance, update), written as log lines."""

    def __init__(
        self,
        unit: str,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        every_s: float = LOG_EVERY_S,
        every_fraction: float = LOG_EVERY_FRACTION,
    ):
        self.unit, self.every_s, self.every_fraction = unit, every_s, every_fraction
        self.logger = logger or _logger()
        self.tasks: list[_LoggedTask] = []

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for task in self.tasks:
                self._log(task, "done")

    def add_task(self, description: str, total: float | None = None, completed: float = 0) -> int:
        self.tasks.append(_LoggedTask(description, total, completed))
        total_text = f" of {total:,.0f} {self.unit}" if total else ""
        self.logger.info(
            f"{description}: started{total_text}" + (f" ({completed:,.0f} done before)" if completed else "")
        )
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, advance: float = 0, description: str | None = None, **_) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        task.description = description or task.description
        step = int(task.completed / task.total / self.every_fraction + 1e-9) if task.total else 0
        if time.monotonic() - task.logged_at >= self.every_s or step > task.logged_step:
            self._log(task, "progress")
            task.logged_at, task.logged_step = time.monotonic(), step

    def _log(self, task: _LoggedTask, what: str) -> None:
        elapsed = time.monotonic() - task.started
        rate = f", {task.completed / elapsed:,.0f} {self.unit}/s" if elapsed > 0 and task.completed else ""
        share = f" ({task.completed / task.total:.0%})" if task.total else ""
        total = f"/{task.total:,.0f}" if task.total else ""
        self.logger.info(
            f"{task.description}: {what} {task.completed:,.0f}{total} {self.unit}{share} in {elapsed:,.0f} s{rate}"
        )


def progress_bar(unit: str, disable: bool = False) -> Progress | LogProgress:
    """A bar when stderr is a terminal; log lines when it is not (unless `disable`: then nothing at all)."""
    if not disable and not sys.stderr.isatty():
        return LogProgress(unit)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=disable,
        transient=False,
    )
