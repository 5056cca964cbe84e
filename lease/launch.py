"""Pretraining as a distributed job: the `lease train` command line, and `torchrun` started and watched
by the caller (the pipeline's pretrain stage).

`pretrain.nproc_per_node` processes per machine (0: one per visible GPU), `pretrain.nnodes` machines
meeting at `pretrain.rdzv_endpoint` (c10d rendezvous). A world of one process trains in the caller's
own process instead: DDP would only cost time there. The job's log lines reach the caller's log as they
come; a stop of the caller (Ctrl-C, SIGTERM) is passed on to the job, whose ranks agree to checkpoint
and stop, and the next run resumes with `--resume`.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from lease.configs import TrainConfig
from lease.typed_config import to_dict

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 120  # how long the job may take to checkpoint after a stop before it is killed


def train_command(config: Path, out: Path, torchrun_nproc: int | None = None, nnodes: int = 1,
                  rdzv_endpoint: str = "", module: str = "lease.train") -> list[str]:
    """The `lease train` command line (`module`: the trainer's module, e.g. lease.condgen): this Python
    alone, or under torchrun with `torchrun_nproc` processes per node (one machine standalone, or `nnodes`
    meeting at `rdzv_endpoint`)."""
    if torchrun_nproc is None:
        launcher = [sys.executable]
    else:
        where = ["--standalone"] if nnodes == 1 and not rdzv_endpoint else \
            [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        launcher = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={torchrun_nproc}"]
    return [*launcher, "-m", module, "--config", str(config), "--out", str(out)]


def processes_per_node(cfg: TrainConfig) -> int:
    """`nproc_per_node`, with 0 resolved to the visible GPUs (1 on a machine without any)."""
    return cfg.nproc_per_node or max(1, torch.cuda.device_count())


def runs_distributed(cfg: TrainConfig) -> bool:
    return cfg.nnodes > 1 or processes_per_node(cfg) > 1


def run_torchrun(cfg: TrainConfig, out: Path, resume: bool, module: str = "lease.train",
                 config_data: dict | None = None) -> dict:
    """Train `cfg` under torchrun in `out` (its config saved there as YAML); returns rank 0's result.
    `module` and `config_data` (default `cfg` itself) name another trainer and the config it reads."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "train_config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg) if config_data is None else config_data, sort_keys=False))
    cmd = train_command(config, out, processes_per_node(cfg), cfg.nnodes, cfg.rdzv_endpoint, module) + \
        (["--resume"] if resume else [])
    log.info("launching %s", " ".join(cmd))
    # In the caller's process group: a terminal's Ctrl-C reaches torchrun, which relays it to the ranks.
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in job.stderr:  # the ranks' log, as it comes
            log.info("%s", line.rstrip())
        printed = job.stdout.read()
        job.wait()
    except BaseException:  # a stop reached this process: the job checkpoints and stops too
        _stop(job)
        raise
    if job.returncode:
        raise RuntimeError(f"torchrun exited {job.returncode}: `{' '.join(cmd)}` (its log is above)")
    return json.loads(printed[printed.index("{"):])


def _stop(job: subprocess.Popen) -> None:
    """SIGTERM to torchrun (it passes it to the ranks, which checkpoint), then wait for them."""
    if job.poll() is not None:
        return
    job.send_signal(signal.SIGTERM)
    try:
        job.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("the training job did not stop within %d s: killing it", STOP_GRACE_SECONDS)
        job.kill()
        job.wait()
