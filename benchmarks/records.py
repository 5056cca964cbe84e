"""Benchmark records: JSON files under `benchmarks/results/` with the machine, versions and command line.

Kept apart from `benchmarks.train` (which builds models and trainers) so that a harness that times a
pipeline part writes its record without importing the trainer.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
RESULTS_DIR = Path("benchmarks/results")


# Environment variables that change which kernels run or how they are compiled (TORCHINDUCTOR_*
# switches such as TORCHINDUCTOR_COMPREHENSIVE_PADDING, TF32 overrides, cuBLAS/cuDNN settings).
KERNEL_ENV_PREFIXES = ("TORCHINDUCTOR_", "TORCH_", "PYTORCH_", "CUDNN_", "CUBLAS_", "NVIDIA_TF32")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version()}  # the attention kernels' library
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["lease_commit"] = os.environ.get("LEASE_COMMIT") or _commit_of_this_tree()
    info["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(KERNEL_ENV_PREFIXES)}
    return info


def _commit_of_this_tree() -> str | None:
    """HEAD (+dirty for edits). A copied tree whose .git is another's (a GPU machine's copy) is named by
    LEASE_COMMIT instead: `LEASE_COMMIT=$(git describe --always --dirty)` where the tree was copied from."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")  # a copied or edited tree is not HEAD
    except OSError:
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()


def results_dir(out_dir: str | Path | None = None) -> Path:
    """Where records go: `out_dir`, else $LEASE_BENCH_DIR, else benchmarks/results."""
    return Path(out_dir or os.environ.get("LEASE_BENCH_DIR", RESULTS_DIR))


def write_record(name: str, record: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """Write a benchmark record with machine, versions and the command line that produced it."""
    out_dir = results_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = sys.argv[1:]
    args = args[1:] if args[:1] == ["bench"] else args  # `lease bench X` and `python -m benchmarks X` alike
    full = {"name": name, "command": "lease bench " + " ".join(shlex.quote(a) for a in args),
            "machine": machine_info(), "unix_time": int(time.time()), **record}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(full, indent=2) + "\n")
    log.info("wrote %s", path)
    return path


