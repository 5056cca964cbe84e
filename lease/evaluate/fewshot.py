"""Few-shot linear probes (paper table 2, table A.4): n ∈ {5, 10, 13, 25} labelled images per class.

For each n and seed, exactly n training images per class are drawn (without replacement) and a linear
probe (`linear_probe.train_probe`: BatchNorm without affine + linear, LARS lr 1.0, batch 16, 10 epochs,
cosine) is trained on their cached features; top-1 on the full validation split is averaged over the seeds.

Learning rate: table A.4 prints "base learning rate 1.0". Scaled by batch / 256 like the linear probe's
rate, it would be 0.0625; LARS moves each weight matrix by lr × 0.001 of its norm per step, so in 10
short epochs such a head barely leaves its initialisation. The rate is therefore used as given
(`scale_lr: false`); `scale_lr: true` gives the scaled reading.

A shot count that some class cannot fill (fewer than n training images) is dropped with a warning and
named in the result's `skipped_shots` (`on_short_class: skip`, the default: a small folder still gets the
shot counts it can fill, and no row reports a protocol it did not run); `error` stops the run instead, and
`all` keeps the count with every image of the short classes (recorded in the result).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lease.evaluate.features import load_features, resolve_device
from lease.evaluate.knn import check_labels, num_classes_of
from lease.evaluate.linear_probe import ProbeConfig, accuracy, train_probe
from lease.io import atomic_write_json
from lease.typed_config import require

log = logging.getLogger(__name__)


@dataclass
class FewShotConfig:
    shots: list[int] = field(default_factory=lambda: [5, 10, 13, 25])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    base_lr: float = 1.0
    scale_lr: bool = False  # see the module docstring
    batch_size: int = 16
    epochs: int = 10
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001
    on_short_class: Literal["skip", "error", "all"] = "skip"
    num_classes: int = 0  # 0: max label + 1

    def __post_init__(self) -> None:
        require(len(self.shots) > 0 and min(self.shots) > 0, "shots", "need at least one positive shot count")
        require(len(self.seeds) > 0, "seeds", "need at least one seed")

    def probe(self, seed: int) -> ProbeConfig:
        return ProbeConfig(base_lr=self.base_lr, scale_lr=self.scale_lr, batch_size=self.batch_size, epochs=self.epochs,
                           momentum=self.momentum, weight_decay=self.weight_decay,
                           trust_coefficient=self.trust_coefficient, seed=seed, num_classes=self.num_classes)


def short_class_reason(labels: torch.Tensor, shots: int, num_classes: int) -> str | None:
    """Why `shots` per class cannot be drawn from `labels` (None when every class has enough)."""
    counts = torch.bincount(labels, minlength=num_classes)
    short = (counts < shots).nonzero().flatten()
    if not short.numel():
        return None
    worst = int(short[counts[short].argmin()])
    return (f"{short.numel()} of {num_classes} classes have fewer than {shots} training samples "
            f"(class {worst} has {int(counts[worst])})")


def fillable_shots(labels: torch.Tensor, cfg: FewShotConfig, num_classes: int) -> tuple[list[int], dict[str, str]]:
    """The shot counts to run, and (`on_short_class: skip`) the dropped ones with their reasons."""
    if cfg.on_short_class != "skip":
        return list(cfg.shots), {}
    keep, skipped = [], {}
    for shots in cfg.shots:
        if (reason := short_class_reason(labels, shots, num_classes)) is None:
            keep.append(shots)
        else:
            skipped[str(shots)] = reason
            log.warning("few-shot: %d-shot skipped: %s", shots, reason)
    return keep, skipped


def summarise(rows: dict[str, dict], skipped: dict[str, str], cfg: FewShotConfig, num_classes: int) -> dict:
    """The result file's fields shared by the cached-feature and the online few-shot probes."""
    return {"shots": rows, "average": statistics.fmean(r["top1"] for r in rows.values()) if rows else None,
            "skipped_shots": skipped, "seeds": list(cfg.seeds), "num_classes": num_classes,
            "on_short_class": cfg.on_short_class}


def sample_few_shot(labels: torch.Tensor, shots: int, seed: int, num_classes: int = 0,
                    on_short_class: str = "error") -> torch.Tensor:
    """Indices of `shots` random samples per class (sorted by class), drawn on the labels' device.

    Vectorised: a random permutation, a stable sort by label, and each sample's rank inside its class;
    ranks below `shots` are kept. Classes 0..num_classes-1 with fewer samples raise (or give all).
    """
    if on_short_class not in ("skip", "error", "all"):
        raise ValueError(f"on_short_class must be 'skip', 'error' or 'all'; got {on_short_class!r}")
    check_labels(labels, "labels")
    num_classes = num_classes_of(labels, configured=num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    if on_short_class != "all" and (reason := short_class_reason(labels, shots, num_classes)):
        raise ValueError(f"{reason}: use a larger train split, fewer shots, or on_short_class=all to take every "
                         "sample of those classes")
    gen = torch.Generator(device=labels.device).manual_seed(seed)
    perm = torch.randperm(labels.numel(), device=labels.device, generator=gen)
    by_class = perm[torch.sort(labels[perm], stable=True).indices]
    class_start = torch.cumsum(counts, 0) - counts
    sorted_labels = labels[by_class]
    rank = torch.arange(labels.numel(), device=labels.device) - class_start[sorted_labels]
    return by_class[rank < shots]


def few_shot(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
             val_labels: torch.Tensor, cfg: FewShotConfig | None = None,
             device: str | torch.device | None = None) -> dict:
    """Top-1 (%) per shot count, mean and standard deviation over seeds, and the average over shot counts."""
    cfg = cfg or FewShotConfig()
    device = resolve_device(device)
    check_labels(val_labels, "val labels")
    num_classes = num_classes_of(train_labels, val_labels, configured=cfg.num_classes)
    x_train, y_train = train_features.to(device).float(), train_labels.to(device).long()
    x_val, y_val = val_features.to(device).float(), val_labels.to(device).long()
    rows = {}
    shot_counts, skipped = fillable_shots(y_train, cfg, num_classes)
    for shots in shot_counts:
        per_seed = []
        for seed in cfg.seeds:
            idx = sample_few_shot(y_train, shots, seed, num_classes, cfg.on_short_class)
            probe_cfg = dataclasses.replace(cfg.probe(seed), num_classes=num_classes)
            head = train_probe(x_train[idx], y_train[idx], num_classes, probe_cfg, device,
                               desc=f"{shots}-shot seed {seed}")
            per_seed.append(accuracy(head, x_val, y_val, probe_cfg.eval_batch_size)[0])
        rows[str(shots)] = {"top1": statistics.fmean(per_seed), "std": statistics.pstdev(per_seed),
                            "per_seed": per_seed, "num_train": int(idx.numel())}
        log.info("%d-shot: top-1 %.2f ± %.2f %% over %d seeds", shots, rows[str(shots)]["top1"],
                 rows[str(shots)]["std"], len(per_seed))
    return summarise(rows, skipped, cfg, num_classes)


def few_shot_table(result: dict, name: str = "ours", reference: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown table shaped like the paper's table 2: one row per model, columns shots… and Avg."""
    shots = list(result["shots"])
    lines = ["| Method | " + " | ".join(shots) + " | Avg. |", "|---" * (len(shots) + 2) + "|"]
    for ref_name, ref in (reference or {}).items():
        cells = [f"{ref[s]:.2f}" if s in ref else "–" for s in shots]
        avg = f"{ref['avg']:.2f}" if "avg" in ref else "–"
        lines.append(f"| {ref_name} | " + " | ".join(cells) + f" | {avg} |")
    cells = [f"{result['shots'][s]['top1']:.2f} ± {result['shots'][s]['std']:.2f}" for s in shots]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['average']:.2f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lease.evaluate import add_config_arguments, add_device_argument

    parser.add_argument("--train-features", type=Path, required=True, help="feature artifact dir of the train split")
    parser.add_argument("--val-features", type=Path, required=True, help="feature artifact dir of the val split")
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write")
    add_device_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lease.evaluate import config_from_args
    from lease.typed_config import to_dict

    cfg = config_from_args(FewShotConfig, args)
    train_x, train_y = load_features(args.train_features)
    val_x, val_y = load_features(args.val_features)
    result = few_shot(train_x, train_y, val_x, val_y, cfg, args.device)
    atomic_write_json(args.out, {"protocol": "fewshot", "config": to_dict(cfg), **result})
    log.info("\n%s", few_shot_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval fewshot", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
