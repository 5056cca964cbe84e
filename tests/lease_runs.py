"""Helpers for tests that start real `lease run` processes on a tiny demo configuration."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import RECORD_NAME, Record

REPO = Path(__file__).resolve().parents[1]
TINY = ["demo_data.num_classes=4", "demo_data.train_per_class=6", "demo_data.val_per_class=2",
        "demo_data.image_size=32", "features.num_images=16", "features.patches_per_image=16",
        "features.num_workers=0", "kmeans.k=8", "kmeans.iters=3", "tokenize.num_workers=1",
        "tokenize.images_per_shard=2", "pack.samples_per_shard=16", "finetune.train.batch_size=8",
        "finetune.train.epochs=1", "finetune.augment.num_workers=0"]
TIMEOUT = 300


def start_run(artifacts: Path, home: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`lease run --flow tokenize` on TINY in its own session (the run, its loader workers, its Prefect
    server), on the CPU, one thread per process, its output in `log`."""
    env = dict(os.environ, PREFECT_HOME=str(home), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with log.open("w") as fh:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--flow", "tokenize", "--config",
                                 "demo", *TINY, f"artifacts={artifacts}", *extra], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(artifacts: Path, tmp_path: Path, name: str, *extra: str) -> tuple[int, str]:
    log = tmp_path / f"{name}.log"
    run = start_run(artifacts, tmp_path / "prefect", log, *extra)
    return run.wait(TIMEOUT), log.read_text()


@contextlib.contextmanager
def make_server(home: Path):
    """`make server` as a user starts it (in the background, returning once it answers), on a free port
    with its own PREFECT_HOME; yields its API URL, and `make server-stop` stops it at the end."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # -o: the checkout is installed already (a copied virtualenv may look older than the files)
    make = ["make", "-s", "-o", ".venv/.installed-stamp"]
    settings = [f"PREFECT_HOME={home}", f"PREFECT_PORT={port}"]
    home.mkdir(parents=True, exist_ok=True)
    with (home / "make-server.log").open("w") as log:  # a file: the server it leaves behind holds it open
        subprocess.run([*make, "server", *settings], cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT,
                       timeout=180)
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        subprocess.run([*make, "server-stop", *settings], cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT, timeout=60)


def wait_until(condition, what: str, *procs: subprocess.Popen, logs: tuple[Path, ...] = ()) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
            pytest.fail(f"{what} did not happen\n{tails}")
        time.sleep(0.05)


def stage_rows(text: str) -> list[dict]:
    """The stage table of the run whose output is `text`, from the run record it names."""
    record = re.search(r"stage table \((\S+\.json)\)", text).group(1)
    return json.loads(Path(record).read_text())["stages"]


def statuses(log: Path) -> dict[str, str]:
    return {row["name"]: row["status"] for row in stage_rows(log.read_text())}


def output_digests(directory: Path, root: Path) -> dict[str, str]:
    """sha256 of each recorded output; the manifest's rows instead, with image paths below the artifacts
    root made relative (the demo images lie in each root's own demo-data artifact)."""
    digests = {rel: out["sha256"] for rel, out in Record.load(directory / RECORD_NAME).outputs.items()}
    if "manifest.parquet" in digests:
        rows = pq.read_table(directory / "manifest.parquet").to_pylist()
        digests["manifest.parquet"] = json.dumps([{**row, "location": row["location"].replace(str(root), "<root>")}
                                                  for row in rows], sort_keys=True)
    return digests
