"""Where a partitioned stage's part tasks run (`runner` in the pipeline config).

- `runner.kind: local` (the default): in the flow's own process, one part after another; no cluster.
- `runner.kind: dask`: on the workers of a Dask cluster through prefect-dask's `DaskTaskRunner`: the
  scheduler at `runner.address` (a multi-machine cluster the user runs), or a cluster started here for
  the stage: dask-cuda's `LocalCUDACluster` (one worker per visible GPU, each seeing only its own) on a
  machine with GPUs, else `distributed.LocalCluster` with `runner.workers` (default 2) single-threaded
  worker processes. Workers keep their tokenizers loaded between parts (`pipeline.tokenize`).

The cluster is started only when a partitioned stage has parts to build, so a cached run starts none.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from pipeline.config import PipelineConfig, RunnerConfig

log = logging.getLogger(__name__)
CPU_WORKERS = 2  # a local CPU cluster's default size


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def current_api_url() -> str:
    """The Prefect API this flow reports to: the configured server, or the temporary one Prefect started."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or SubprocessASGIServer().api_url


def local_cluster_settings(runner: RunnerConfig, device: str) -> tuple[str, dict[str, Any]]:
    """(cluster class, its arguments) for a cluster on this machine. Its workers report their task runs
    to the flow's Prefect API (otherwise each would start a temporary server of its own)."""
    env = {name: value for name, value in os.environ.items() if name.startswith("PREFECT_")}
    env["PREFECT_API_URL"] = current_api_url()
    gpus = visible_gpus() if device != "cpu" else 0
    if gpus:
        return "dask_cuda.LocalCUDACluster", {"n_workers": runner.workers or gpus, "threads_per_worker": 1,
                                              "env": env}
    return "distributed.LocalCluster", {"n_workers": runner.workers or CPU_WORKERS, "threads_per_worker": 1,
                                        "processes": True, "dashboard_address": None, "env": env}


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_thread_settings(workers: int) -> dict[str, int]:
    """Dask config giving each of `workers` local worker processes its share of this machine's cores for
    torch's CPU threads: Dask's nannies otherwise start workers with OMP_NUM_THREADS=1 (meant for many
    one-thread workers, not one per GPU whose part runs torch)."""
    share = max(1, (os.cpu_count() or 1) // max(1, workers))
    return {f"distributed.nanny.pre-spawn-environ.{name}": share for name in THREAD_VARIABLES}


@contextlib.contextmanager
def part_runner(cfg: PipelineConfig) -> Iterator[tuple[Any, int]]:
    """(the task runner for part tasks, or None to run them in this process; the number of workers)."""
    if cfg.runner.kind == "local":
        yield None, 1
        return
    from prefect_dask import DaskTaskRunner

    import dask

    if cfg.runner.address:
        runner = DaskTaskRunner(address=cfg.runner.address)
    else:
        cluster_class, kwargs = local_cluster_settings(cfg.runner, cfg.device)
        log.info("starting a Dask cluster: %s with %d workers", cluster_class, kwargs["n_workers"])
        runner = DaskTaskRunner(cluster_class=cluster_class, cluster_kwargs=kwargs)
    # Non-daemonic workers, so that a part can start its own image-decoding processes (DataLoader workers).
    settings = {"distributed.worker.daemon": False}
    if not cfg.runner.address:
        settings.update(worker_thread_settings(kwargs["n_workers"]))
    with dask.config.set(settings), runner:
        workers = len(runner.client.scheduler_info()["workers"])
        log.info("Dask cluster with %d workers (dashboard %s)", workers, runner.client.dashboard_link)
        yield runner, workers
