"""`lease bench numerics`: does a model switch change training more than a change of seed does?

Speed switches that change rounding (`model.residual_dtype=autocast`) or random streams
(`model.dropout_impl`) cannot be checked against golden numbers. So the preset is trained three times
on the same planted-structure tokens (`lease.synthetic`) through the real `Trainer.step`:

* the baseline at seed s;
* the baseline at seed s + 1: other initial weights, data order, masks and dropout (the yardstick);
* the switched model at seed s, which starts from the baseline's weights.

The losses stay on the device until the end. The record holds the three loss curves; over the second
half of the run, the mean |difference| of the smoothed curves (switched vs baseline, and seed s + 1 vs
baseline); and each trained model's loss on held-out planted samples, in eval mode with the same
fixed masks for all three, which the per-step mask ratio does not make noisy. A plot of the curves
goes beside the record. Each training is saved as it ends (`--runs` trains a subset: three processes
may train the three at once on one GPU), and a stopped comparison reuses what it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.records import results_dir, write_record
from lease.configs import OptimConfig, TrainConfig, model_config
from lease.data import ResidentBatches, TokenSet
from lease.io import atomic_write_json
from lease.synthetic import planted_codebook, planted_token_set
from lease.train import Dist, Trainer, build_model, pick_device
from lease.typed_config import apply_overrides

log = logging.getLogger(__name__)
HELDOUT_SEED_OFFSET = 10**6  # held-out samples: a generator seed no training run of a sweep uses


@dataclasses.dataclass
class NumericsRun:
    """One comparison: preset, batch, steps and the planted data's shape."""

    preset: str = "vit_base"
    batch_size: int = 256
    steps: int = 300
    dtype: str = "bf16"
    compile: bool = True
    seed: int = 0
    batches_per_epoch: int = 16  # distinct batches in the token set
    heldout_batches: int = 4  # batches of other planted samples, scored after training
    num_classes: int = 100
    synonyms: int = 8  # codes per planted concept: vocab_gen / synonyms concepts = codebook size
    codebook_dim: int = 768  # DINOv2-B's feature width, as `lease bench train`
    warmup_fraction: float = 0.2
    smooth: int = 20  # steps in the moving mean the curves are compared on


def train_config_for(run: NumericsRun, overrides: dict[str, Any], seed: int) -> TrainConfig:
    warmup_epochs = run.warmup_fraction * run.steps / run.batches_per_epoch
    return TrainConfig(preset=run.preset, model=model_config(run.preset, **overrides), batch_size=run.batch_size,
                       max_steps=run.steps, dtype=run.dtype, compile=run.compile, seed=seed,
                       optim=OptimConfig(warmup_epochs=warmup_epochs))


def train_and_evaluate(cfg: TrainConfig, tokens: TokenSet, heldout: TokenSet, centroids: torch.Tensor,
                       device: torch.device) -> tuple[torch.Tensor, float]:
    """Per-step training loss of `cfg.max_steps` steps from initial weights drawn with `cfg.seed`, and
    the trained model's loss on `heldout`."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, centroids)
    batches = ResidentBatches(tokens, cfg.batch_size, device, seed=cfg.seed)
    trainer = Trainer(cfg, model, device, Dist(), batches.steps_per_epoch)
    data = batches.iterate(0)
    curve = torch.stack([trainer.step(next(data))["loss"] for _ in range(cfg.max_steps)]).cpu()
    return curve, heldout_loss(trainer, ResidentBatches(heldout, cfg.batch_size, device, seed=0))


@torch.no_grad()
def heldout_loss(trainer: Trainer, heldout: ResidentBatches) -> float:
    """Eq. 5 in eval mode (no dropout) over every held-out batch, masked at the mean ratio with masks
    drawn from a fixed seed: the same masks for every model compared."""
    model = trainer.model.eval()
    masks = torch.Generator(device=trainer.device).manual_seed(0)
    data, total = heldout.iterate(0), torch.zeros((), device=trainer.device)
    for _ in range(heldout.steps_per_epoch):
        batch = next(data)
        plan = trainer.plan_at_mean_ratio(batch.vq.shape[0], masks)
        with trainer.autocast():
            total += model(batch.vq, batch.disc, plan).loss.float()
    model.train()
    return float(total) / heldout.steps_per_epoch


def smoothed(curve: torch.Tensor, window: int) -> torch.Tensor:
    """Moving mean over `window` steps (shorter at the start)."""
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), curve.double().cumsum(0)])
    ends = torch.arange(1, len(curve) + 1)
    starts = (ends - window).clamp_min(0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def late_gap(a: torch.Tensor, b: torch.Tensor, window: int) -> float:
    """Mean |a − b| of the smoothed curves over the second half of the run."""
    half = len(a) // 2
    return float((smoothed(a, window) - smoothed(b, window))[half:].abs().mean())


RUN_NAMES = {"baseline": "baseline", "baseline, next seed": "next-seed", "switched": "switched"}


def runs_of(run: NumericsRun, overrides: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(label, seed, model overrides) of the three trainings."""
    return [("baseline", run.seed, {}), ("baseline, next seed", run.seed + 1, {}), ("switched", run.seed, overrides)]


def part_key(run: NumericsRun, changes: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"run": dataclasses.asdict(run), "overrides": changes, "seed": seed}


def save_part(path: Path, run: NumericsRun, changes: dict[str, Any], seed: int, curve: torch.Tensor,
              heldout: float) -> None:
    """One finished training's curve and held-out loss, so a stopped or split comparison keeps it."""
    atomic_write_json(path, {**part_key(run, changes, seed), "curve": curve.tolist(), "heldout_loss": heldout})


def finished_part(path: Path | None, run: NumericsRun, changes: dict[str, Any],
                  seed: int) -> tuple[torch.Tensor, float] | None:
    """The saved training of exactly this run, switch and seed, if there is one."""
    if path is None or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if {k: saved.get(k) for k in ("run", "overrides", "seed")} != json.loads(json.dumps(part_key(run, changes, seed))):
        log.warning("%s was trained with other settings: training again", path)
        return None
    return torch.tensor(saved["curve"]), float(saved["heldout_loss"])


def compare(run: NumericsRun, overrides: dict[str, Any], device: torch.device, parts_dir: Path | None = None,
            only: list[str] | None = None) -> dict[str, Any]:
    """The three curves and the gaps between them (module docstring).

    With `parts_dir`, each finished training is saved there and a saved one is reused rather than trained
    again; with `only` (names of RUN_NAMES), just those trainings run. Until all three exist the result is
    `{"missing_runs": [...]}`: separate processes can train the three at once, sharing the GPU while one
    compiles, and a last call writes the record."""
    cfg = model_config(run.preset)
    tokens = planted_token_set(run.batch_size * run.batches_per_epoch, run.num_classes, cfg.seq_len,
                               cfg.vocab_gen, run.synonyms, seed=run.seed)
    centroids = torch.from_numpy(planted_codebook(cfg.vocab_gen // run.synonyms, run.codebook_dim, seed=run.seed))
    heldout = planted_token_set(run.batch_size * run.heldout_batches, run.num_classes, cfg.seq_len, cfg.vocab_gen,
                                run.synonyms, seed=run.seed + HELDOUT_SEED_OFFSET)
    curves, heldout_losses = {}, {}
    for label, seed, changes in runs_of(run, overrides):
        part = parts_dir / f"{RUN_NAMES[label]}.json" if parts_dir else None
        done = finished_part(part, run, changes, seed)
        if done is not None:
            log.info("%s: reusing the finished run in %s", label, part)
            curves[label], heldout_losses[label] = done
            continue
        if only is not None and RUN_NAMES[label] not in only:
            continue
        log.info("training %s (seed %d%s) for %d steps", label, seed,
                 "".join(f", {k}={v}" for k, v in changes.items()), run.steps)
        started = time.perf_counter()
        curves[label], heldout_losses[label] = train_and_evaluate(train_config_for(run, changes, seed), tokens,
                                                                  heldout, centroids, device)
        log.info("%s: %.0f s (compilation included), final smoothed loss %.4f", label,
                 time.perf_counter() - started, float(smoothed(curves[label], run.smooth)[-1]))
        if part is not None:
            save_part(part, run, changes, seed, curves[label], heldout_losses[label])
    missing = [RUN_NAMES[label] for label, _, _ in runs_of(run, overrides) if label not in curves]
    if missing:
        return {"missing_runs": missing}
    base, base_heldout = curves["baseline"], heldout_losses["baseline"]
    return {**dataclasses.asdict(run), "overrides": overrides, "device": str(device),
            "gap_switched_vs_baseline": round(late_gap(curves["switched"], base, run.smooth), 5),
            "gap_next_seed_vs_baseline": round(late_gap(curves["baseline, next seed"], base, run.smooth), 5),
            "heldout_loss": {k: round(v, 5) for k, v in heldout_losses.items()},
            "heldout_gap_switched": round(abs(heldout_losses["switched"] - base_heldout), 5),
            "heldout_gap_next_seed": round(abs(heldout_losses["baseline, next seed"] - base_heldout), 5),
            "final_loss": {k: round(float(smoothed(v, run.smooth)[-1]), 4) for k, v in curves.items()},
            "curves": {k: [round(float(x), 4) for x in v] for k, v in curves.items()}}


def plot_curves(curves: dict[str, list[float]], smooth: int, title: str, path: Path) -> Path:
    """Loss curves, each as a `smooth`-step moving mean, in one PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(smoothed(torch.tensor(curve), smooth).numpy(), label=label)
    ax.set(xlabel="step", ylabel=f"training loss ({smooth}-step mean)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def record_name(run: NumericsRun, overrides: dict[str, Any]) -> str:
    return f"numerics-{run.preset}-b{run.batch_size}-{run.dtype}" + "".join(f"-{k}_{v}" for k, v in overrides.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = NumericsRun()
    parser.add_argument("--model", nargs="+", required=True, metavar="KEY=VALUE",
                        help="the ModelConfig switch(es) to compare against the preset, e.g. residual_dtype=autocast")
    parser.add_argument("--preset", default=defaults.preset)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["bf16", "fp32"])
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--runs", nargs="+", choices=list(RUN_NAMES.values()), default=None,
                        help="train only these of the three (each is saved beside the record as it ends and reused "
                             "by a later call; the record is written once all three exist)")
    parser.add_argument("--out-dir", default=None, help="where the record and plot go (default benchmarks/results)")


def run_cli(args: argparse.Namespace) -> int:
    if args.steps < 2 * NumericsRun.smooth:
        raise SystemExit(f"--steps must be >= {2 * NumericsRun.smooth} (the curves are compared smoothed over "
                         f"{NumericsRun.smooth} steps, on the run's second half)")
    overrides = apply_overrides({}, args.model)
    model_config(args.preset, **overrides)  # fails now, naming the key, rather than after the baseline runs
    run = NumericsRun(preset=args.preset, batch_size=args.batch_size, steps=args.steps, dtype=args.dtype,
                      compile=args.compile == "on", seed=args.seed)
    name = record_name(run, overrides)
    parts = results_dir(args.out_dir) / f"{name}.parts"
    result = compare(run, overrides, pick_device(Dist()), parts, args.runs)
    if "missing_runs" in result:
        log.info("%s: still to train: %s (saved runs are in %s)", name, ", ".join(result["missing_runs"]), parts)
        return 0
    write_record(name, {"results": result}, args.out_dir)
    shutil.rmtree(parts, ignore_errors=True)  # the record now holds every curve
    switch = ", ".join(f"{k}={v}" for k, v in overrides.items())
    plot_curves(result["curves"], run.smooth, f"{run.preset} b{run.batch_size} {run.dtype}: {switch}",
                results_dir(args.out_dir) / f"{name}.png")
    log.info("%s: |Δ loss| switched vs baseline %.4f, next seed vs baseline %.4f (training, second half); "
             "held out %.4f vs %.4f", name, result["gap_switched_vs_baseline"], result["gap_next_seed_vs_baseline"],
             result["heldout_gap_switched"], result["heldout_gap_next_seed"])
    return 0
