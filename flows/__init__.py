"""Prefect flows and deployments of the pipeline: thin wiring, the science lives in `lease/` and `pipeline/`.

Importing this package sets Prefect's environment defaults before Prefect itself is imported: its home
(SQLite database, result/cache storage) inside the repository (`.prefect/`, git-ignored) unless
`PREFECT_HOME` is set, and nothing that would reach the network (analytics, telemetry, promotions).
Variables already set by the user win. It also mends the records of Prefect's run loggers
(`mend_run_logs`), in every process that runs the flows: `lease run`, a served or a worker's flow run.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PREFECT_DEFAULTS = {
    "PREFECT_HOME": str(REPO / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # a served deployment picks up a run within seconds
    # a fresh SQLite database is migrated at first start: slow on a busy 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def set_prefect_defaults() -> None:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # Prefect creates its home without parents and then cannot open its database: make the whole path.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


def _drop_inherited_thread_exit_hooks() -> None:
    """In a forked child, forget the parent's `threading` exit hooks.

    Prefect's background services register one (`threading._register_atexit`) that drains their queue
    through the parent's event-loop thread; in a forked child (DataLoader workers started inside a task)
    that thread does not exist, the hook raises at the child's exit and the child exits with code 1,
    which makes the DataLoader abort ("worker exited unexpectedly"). The hooks belong to the parent's
    threads, so dropping them in the child is always right.
    """
    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


# An attribute of the flow's log record of the run's result line ("report: <path>"): the last line of a
# served or worker's flow run; `lease run` prints the line itself instead, as its very last line.
RESULT_LINE = "lease_result_line"
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def without_empty_traceback(record: logging.LogRecord) -> bool:
    """A logging filter: drop the traceback of a record logged with `exc_info=True` while no exception was
    being handled, which logging prints as the line `NoneType: None`. Prefect's task engine logs a task
    that returned a Failed state (a stage's explained failure, or its stop by Ctrl-C) so ("Task run failed
    with state: ..."); a real exception's traceback stays."""
    if isinstance(record.exc_info, tuple) and record.exc_info[0] is None:
        record.exc_info = None
    return True


def mend_run_logs() -> None:
    """Filter the records of Prefect's flow- and task-run loggers where they are made, so that every
    handler (the console's, the API's copy the UI shows) gets them mended."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if without_empty_traceback not in logger.filters:
            logger.addFilter(without_empty_traceback)


set_prefect_defaults()
mend_run_logs()
os.register_at_fork(after_in_child=_drop_inherited_thread_exit_hooks)
