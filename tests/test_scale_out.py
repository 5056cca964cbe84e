"""The partitioned tokenize stage on a real Dask cluster (2 worker processes, prefect-dask): a worker killed
mid-run costs only the parts that had not finished, and the 6 parts on 2 workers pack the same outputs as
one process. A codebook
sweep reuses the VQGAN codes: only DINOv2 + assignment run again, and the pack is a fresh run's."""
import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest

from lease_runs import TIMEOUT, TINY, output_digests, run_to_end, stage_rows, start_run, wait_until
from pipeline.artifacts import RECORD_NAME, Record
from pipeline.config import load_pipeline_config
from pipeline.stages import PART_SUFFIX, TOKENIZE_STAGES, run_in_process

# a Dask cluster and two tiny tokenization flows, on one `make server`
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("runs_use_the_server")]

DASK = ["runner.kind=dask", "runner.workers=2"]


@pytest.fixture(scope="module")
def single_root(tmp_path_factory):
    return tmp_path_factory.mktemp("single")


@pytest.fixture(scope="module")
def single(single_root):
    """One process, one part: the digests every fan-out must reproduce."""
    cfg = load_pipeline_config("demo", [*TINY, f"artifacts={single_root}", "tokenize.partitions=1"])
    return {o.name: (o.key, output_digests(Path(o.path), single_root)) for o in run_in_process(cfg, TOKENIZE_STAGES)}


def in_process(root: Path, *extra: str) -> dict:
    cfg = load_pipeline_config("demo", [*TINY, f"artifacts={root}", *extra])
    return {o.name: o for o in run_in_process(cfg, TOKENIZE_STAGES)}


def test_a_new_codebook_reruns_only_the_assignment_and_packs_a_fresh_runs_bytes(tmp_path, single, single_root):
    """The fixture's fresh run fused both passes; a sweep from its artifacts keeps the VQGAN codes."""
    root = tmp_path / "artifacts"
    shutil.copytree(single_root, root, symlinks=True)
    swept = in_process(root, "kmeans.k=6")
    assert {name: o.status for name, o in swept.items()} == {
        "demo-data": "cached", "demo-assets": "cached", "manifest": "cached", "features": "cached", "kmeans": "ran",
        "vq-codes": "cached", "tokenize": "ran", "pack": "ran"}
    assert swept["tokenize"].result["vqgan_runs"] == 0 and swept["tokenize"].result["disc_codes"] == 6

    # Back to the fixture's codebook with its token shards gone: made from the kept codes, in two parts,
    # they are the fresh fused run's bytes.
    for name in ("tokenize", f"tokenize{PART_SUFFIX}", "pack"):
        shutil.rmtree(root / name)
    again = in_process(root, "tokenize.partitions=2")
    assert again["vq-codes"].status == "cached" and again["tokenize"].status == "ran"
    assert again["tokenize"].result["vqgan_runs"] == 0 and again["tokenize"].result["partitions"] == 2
    for name in ("tokenize", "pack"):
        assert output_digests(Path(again[name].path), root) == single[name][1], f"{name} differs"


def part_records(artifacts: Path) -> dict[str, Record]:
    return {path.parent.name: Record.load(path)
            for path in (artifacts / f"tokenize{PART_SUFFIX}").glob(f"*/{RECORD_NAME}")}


def assert_same_as_single(artifacts: Path, text: str, single: dict) -> None:
    """The run's tokenize and pack artifacts (keys from its stage table) hold the single process's bytes."""
    keys = {row["name"]: row["key"] for row in stage_rows(text)}
    for name in ("tokenize", "pack"):
        digests = output_digests(artifacts / name / keys[name], artifacts)
        assert digests == single[name][1], f"{name} differs from one process"


def dask_worker_processes(run_pid: int) -> list[psutil.Process]:
    """The cluster's worker processes: the run's spawned Python children (its Prefect server is not one)."""
    return [p for p in psutil.Process(run_pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())]


def test_a_killed_worker_costs_only_the_parts_that_had_not_finished(tmp_path, single):
    artifacts, log = tmp_path / "artifacts", tmp_path / "first.log"
    fast = ["tokenize.partitions=6", "tokenize.num_workers=0"]  # decoding in the worker itself: quicker here
    run = start_run(artifacts, tmp_path / "prefect", log, *DASK, *fast)
    wait_until(lambda: part_records(artifacts), "a first finished part", run, logs=(log,))
    finished = part_records(artifacts)
    workers = dask_worker_processes(run.pid)
    assert workers, "no Dask worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    run.wait(TIMEOUT)  # Dask may finish the run on the other worker, or the run fails: either way, rerun
    assert "tokenize: 6 parts on 2 Dask workers" in log.read_text()  # more parts than workers: same bytes below
    code, text = run_to_end(artifacts, tmp_path, "rerun", *DASK, *fast)
    assert code == 0, text[-3000:]
    records = part_records(artifacts)
    assert len(records) == 6
    assert {key: records[key] for key in finished} == finished  # the same records: not rebuilt
    assert_same_as_single(artifacts, text, single)
