"""`lease bench ddp`: does training under torchrun match one process at the same global batch?

It trains the preset on planted-structure token shards (`lease.synthetic`, written as real packed
shards) three times through the `lease train` command, from one config:

* one process at seed s (the reference);
* `torchrun --nproc_per_node=N` at seed s: the same initial weights and, because the resident data
  deals each global batch out to the ranks (`lease.data.ResidentBatches`), the same images in every
  step; only the masks and the dropout draws differ, as each rank draws its own (with N = 1 nothing
  differs: the DDP wrapper and its all-reduce must then reproduce the plain process, exactly on the
  CPU and up to the run-to-run noise of the GPU's kernels);
* one process at seed s + 1: other weights, data order, masks and dropout (the yardstick, as in
  `lease bench numerics`).

Metrics are logged at every step (under torchrun, means over the ranks). The record holds the three
loss curves; over the second half of the run, the mean |difference| of the smoothed curves (torchrun
vs one process, and seed s + 1 vs one process); for every step, which ranks logged it; whether the
ranks ended with bit-identical weights; and each run's wall time. When a rank misses a step or the
ranks' weights differ at the end, the command fails and writes no record. A plot of the curves goes
beside the record.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lease.configs import DataConfig, ModelConfig, TrainConfig, train_config
from lease.data import write_token_set
from lease.launch import train_command
from benchmarks.numerics import NumericsRun, late_gap, plot_curves, smoothed, train_config_for
from benchmarks.records import results_dir, write_record
from lease.synthetic import planted_codebook, planted_token_set
from lease.typed_config import apply_overrides, to_dict

log = logging.getLogger(__name__)
STEP_LINE = re.compile(r"rank (\d+)/\d+ step (\d+)/\d+")  # what `lease.train` logs at every logged step
SMOOTH = 10  # steps in the moving mean the curves are compared on
PROGRESS_EVERY = 10  # steps between the progress lines this command logs


@dataclasses.dataclass
class TrainingRun:
    """One `lease train` process group's output."""

    curve: list[float]  # loss at every step (mean over ranks)
    images_per_s: float  # median over the second half of the steps (compiling happens in the first)
    ranks_by_step: dict[int, list[int]]  # step -> the ranks that logged it
    result: dict[str, Any]  # what `lease train` printed
    seconds: float


def training_config(run: NumericsRun, overrides: list[str], seed: int) -> TrainConfig:
    """`run` as a TrainConfig at `seed` with `overrides` (KEY=VALUE, checked here), logging every step."""
    cfg = dataclasses.replace(train_config_for(run, {}, seed), log_every=1, ckpt_every=run.steps)
    return train_config(apply_overrides(to_dict(cfg), overrides))


def write_planted_inputs(run: NumericsRun, model: ModelConfig, work: Path) -> DataConfig:
    """Planted token shards and a planted codebook for `model` under `work`, device-resident in training."""
    tokens = planted_token_set(run.batch_size * run.batches_per_epoch, run.num_classes, model.seq_len,
                               model.vocab_gen, run.synonyms, seed=run.seed)
    write_token_set(work / "shards", tokens, per_shard=run.batch_size)
    np.save(work / "codebook.npy", planted_codebook(model.vocab_gen // run.synonyms, run.codebook_dim, seed=run.seed))
    return DataConfig(shards=str(work / "shards"), codebook=str(work / "codebook.npy"), gpu_resident="on")


def write_config(cfg: TrainConfig, work: Path) -> Path:
    path = work / f"train-seed{cfg.seed}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def ranks_by_step(train_log: str) -> dict[int, list[int]]:
    seen: dict[int, set[int]] = {}
    for rank, step in STEP_LINE.findall(train_log):
        seen.setdefault(int(step), set()).add(int(rank))
    return {step: sorted(ranks) for step, ranks in sorted(seen.items())}


def launch(config: Path, out: Path, torchrun_nproc: int | None = None, cpu: bool = False) -> TrainingRun:
    """`lease train` as a plain process, or under torchrun with `torchrun_nproc` processes; with `cpu`
    the GPUs are hidden from it. Its log goes to out/train.log as it runs, and rank 0's progress to
    this log every `PROGRESS_EVERY` steps."""
    if out.exists():
        shutil.rmtree(out)  # metrics.jsonl is appended to: start each run afresh
    out.mkdir(parents=True)
    cmd = train_command(config, out, torchrun_nproc)
    log.info("running %s", " ".join(cmd))
    start = time.perf_counter()
    with (out / "result.json").open("w") as stdout, (out / "train.log").open("w") as train_log:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else None
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
        for line in proc.stderr:
            train_log.write(line)
            step = STEP_LINE.search(line)
            if step and step.group(1) == "0" and int(step.group(2)) % PROGRESS_EVERY == 0:
                log.info("  %s", line[step.start():].strip())
        proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); the end of its log "
                         f"({out / 'train.log'}):\n{(out / 'train.log').read_text()[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log.info("done in %.0f s: %d steps, last loss %.4f", seconds, len(rows), rows[-1]["loss"])
    speeds = [row["images_per_s"] for row in rows[len(rows) // 2:]]
    printed = (out / "result.json").read_text()
    return TrainingRun(curve=[row["loss"] for row in rows], images_per_s=float(np.median(speeds)),
                       ranks_by_step=ranks_by_step((out / "train.log").read_text()),
                       result=json.loads(printed[printed.index("{"):]), seconds=seconds)


def check_ranks(ddp: TrainingRun, nproc: int, steps: int) -> None:
    """Every rank logged every step, and the ranks ended with the same weights; else stop, saying which."""
    expected = list(range(nproc))
    missing = {s: ddp.ranks_by_step.get(s, []) for s in range(1, steps + 1) if ddp.ranks_by_step.get(s) != expected}
    if missing:
        raise SystemExit(f"ranks out of step: steps where not all of {expected} logged (step: ranks) {missing}")
    if "ranks_in_sync" not in ddp.result:
        raise SystemExit("`lease train` under torchrun trained without a process group (no DDP)")
    if not ddp.result["ranks_in_sync"]:
        raise SystemExit(f"the {nproc} ranks ended with different weights: gradients were not averaged alike")


def compare(run: NumericsRun, nprocs: list[int], overrides: list[str], work: Path,
            cpu: bool = False) -> dict[int, dict[str, Any]]:
    """The plain process and its next seed once, a torchrun run per process count, and each count's
    result: the gaps between the curves (module docstring); with `cpu`, on the CPU."""
    cfg, next_seed_cfg = (training_config(run, overrides, seed) for seed in (run.seed, run.seed + 1))
    data = write_planted_inputs(run, cfg.model, work)
    config, next_seed_config = (write_config(dataclasses.replace(c, data=data), work) for c in (cfg, next_seed_cfg))
    single = launch(config, work / "one-process", cpu=cpu)
    next_seed = launch(next_seed_config, work / "one-process-next-seed", cpu=cpu)
    results = {}
    for nproc in nprocs:
        ddp = launch(config, work / f"torchrun-{nproc}", torchrun_nproc=nproc, cpu=cpu)
        check_ranks(ddp, nproc, run.steps)
        results[nproc] = summarize(run, nproc, overrides, single, ddp, next_seed)
    return results


def summarize(run: NumericsRun, nproc: int, overrides: list[str], single: TrainingRun, ddp: TrainingRun,
              next_seed: TrainingRun) -> dict[str, Any]:
    runs = {"one process": single, f"torchrun, nproc {nproc}": ddp, "one process, next seed": next_seed}
    curves = {label: torch.tensor(r.curve) for label, r in runs.items()}
    ddp_gap, seed_gap = (round(late_gap(curves[label], curves["one process"], run.smooth), 5)
                         for label in (f"torchrun, nproc {nproc}", "one process, next seed"))
    shape = {k: v for k, v in dataclasses.asdict(run).items() if k != "heldout_batches"}  # no held-out set here
    return {**shape, "overrides": overrides, "nproc": nproc, "backend": ddp.result["backend"],
            "ranks_by_step": ddp.ranks_by_step, "ranks_in_sync": ddp.result["ranks_in_sync"],
            "gap_torchrun_vs_one_process": ddp_gap, "gap_next_seed_vs_one_process": seed_gap,
            "final_loss": {k: round(float(smoothed(v, run.smooth)[-1]), 4) for k, v in curves.items()},
            "images_per_s": {k: round(r.images_per_s, 1) for k, r in runs.items()},
            "seconds": {k: round(r.seconds, 1) for k, r in runs.items()},
            "curves": {k: [round(x, 5) for x in r.curve] for k, r in runs.items()}}


def record_name(run: NumericsRun, nproc: int) -> str:
    return f"ddp-{run.preset}-b{run.batch_size}-{run.dtype}-x{nproc}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = NumericsRun()
    parser.add_argument("--nproc", type=int, nargs="+", default=[2],
                        help="processes under torchrun (one per GPU), one record per count sharing the plain "
                             "runs; 1 checks the DDP path itself on one GPU")
    parser.add_argument("--preset", default=defaults.preset)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch, all runs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["bf16", "fp32"])
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--cpu", action="store_true",
                        help="train on the CPU (gloo) even where there are GPUs, as the tests do")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--work", default=None, help="where shards, configs and run logs go (default: a temporary "
                                                     "directory, removed after a run that succeeds)")
    parser.add_argument("--out-dir", default=None, help="where the record and plot go (default benchmarks/results)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="TrainConfig overrides for all three runs, e.g. model.residual_dtype=autocast")


def check_arguments(args: argparse.Namespace) -> None:
    if min(args.nproc) < 1:
        raise SystemExit("--nproc must be >= 1")
    for nproc in args.nproc:
        if args.batch_size % nproc:
            raise SystemExit(f"--batch-size {args.batch_size} does not split evenly over --nproc {nproc}")
    if args.steps < 2 * SMOOTH:
        raise SystemExit(f"--steps must be >= {2 * SMOOTH} (the curves are compared smoothed over {SMOOTH} "
                         "steps, on the run's second half)")
    gpus = 0 if args.cpu else torch.cuda.device_count()
    if gpus and gpus < max(args.nproc):
        raise SystemExit(f"--nproc {max(args.nproc)} needs {max(args.nproc)} GPUs (one process per GPU); "
                         f"this machine has {gpus}")


def run_cli(args: argparse.Namespace) -> int:
    check_arguments(args)
    run = NumericsRun(preset=args.preset, batch_size=args.batch_size, steps=args.steps, dtype=args.dtype,
                      compile=args.compile == "on", seed=args.seed, smooth=SMOOTH)
    training_config(run, args.overrides, run.seed)  # a bad override fails here, naming the key, before any work
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lease-ddp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = compare(run, args.nproc, args.overrides, work, cpu=args.cpu)
    except BaseException:
        log.error("the runs' configs and logs are kept in %s", work)
        raise
    if not args.work:
        shutil.rmtree(work)
    for nproc, result in results.items():
        name = record_name(run, nproc)
        write_record(name, {"results": result}, args.out_dir)
        plot_curves(result["curves"], run.smooth,
                    f"{run.preset} b{run.batch_size} {run.dtype}: torchrun vs one process",
                    results_dir(args.out_dir) / f"{name}.png")
        log.info("%s: |Δ loss| torchrun vs one process %.4f, next seed vs one process %.4f (second half, "
                 "smoothed); every rank logged every step; weights identical across ranks", name,
                 result["gap_torchrun_vs_one_process"], result["gap_next_seed_vs_one_process"])
    return 0
