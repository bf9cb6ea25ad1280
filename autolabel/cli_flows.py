"""The commands' one door into the Prefect flows in `flows/`: the library never imports them, so a stage runs
without Prefect, and what Prefect needs around a command-line flow run is set up here, where it starts."""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from autolabel.errors import AutolabelError


class ExpectedErrors(logging.Filter):
    """Bad input (an AutolabelError) carries a message that names the fix; Prefect's traceback of it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AutolabelError):
            record.exc_info, record.exc_text = None, None
        return True


def prefect_flows(module: str = "audit_pipeline") -> ModuleType:
    """`flows.<module>`, for a flow run from this process: Prefect's analytics off, and its log handlers (made
    when Prefect is first imported) told to drop the traceback of bad input, which the command prints as
    one line and exit code 2."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    flows = importlib.import_module(f"flows.{module}")
    for name in (None, "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ExpectedErrors) for f in handler.filters):
                handler.addFilter(ExpectedErrors())
    return flows
