"""Prefect flows and deployments of the pipeline: thin wiring, the science lives in `lease/` and `pipeline/`.

Importing this package sets Prefect's environment defaults before Prefect itself is imported: its home
(SQLite database, result/cache storage) inside the repository (`.prefect/`, git-ignored) unless
`PREFECT_HOME` is set, and nothing that would reach the network (analytics, telemetry, promotions).
Variables already set by the user win.
"""
from __future__ import annotations

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


set_prefect_defaults()
os.register_at_fork(after_in_child=_drop_inherited_thread_exit_hooks)
