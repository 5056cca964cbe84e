"""Linear probe on frozen, cached features (paper table 1, table A.2; MAE's protocol).

Head: BatchNorm1d without affine parameters (it only whitens the features), then a linear layer.
Optimiser: LARS, momentum 0.9, no weight decay, lr = base_lr × batch / 256 (base 0.1), batch 4096,
90 epochs, cosine decay per step. Every epoch runs on features resident on the device: a `randperm`
shuffles the rows and batches are slices of it (no DataLoader, no host round trip per step). The last
partial batch of each epoch is dropped as MAE's loader does; a different remainder drops each epoch.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from lease.evaluate.features import load_features, resolve_device
from lease.evaluate.knn import check_labels, num_classes_of
from lease.evaluate.lars import LARS
from lease.io import atomic_write_json
from lease.typed_config import require

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    base_lr: float = 0.1  # lr = base_lr * batch_size / 256 (when scale_lr)
    scale_lr: bool = True
    batch_size: int = 4096
    epochs: int = 90
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001
    bn_eps: float = 1e-6
    head_init_std: float = 0.01
    eval_batch_size: int = 16384
    seed: int = 0
    num_classes: int = 0  # 0: max label + 1

    def __post_init__(self) -> None:
        require(self.base_lr > 0, "base_lr", "must be > 0")
        require(self.batch_size > 1, "batch_size", "must be > 1 (BatchNorm needs more than one sample)")
        require(self.epochs > 0, "epochs", "must be > 0")
        require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", "must be in [0, epochs]")
        require(self.eval_batch_size > 0, "eval_batch_size", "must be > 0")

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256 if self.scale_lr else self.base_lr


class ProbeHead(nn.Sequential):
    """BatchNorm1d(affine=False) + Linear, initialised as MAE's probe (N(0, 0.01) truncated, zero bias)."""

    def __init__(self, dim: int, num_classes: int, bn_eps: float, init_std: float, generator: torch.Generator):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=bn_eps), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=init_std, a=-2 * init_std, b=2 * init_std, generator=generator)
        nn.init.zeros_(self[1].bias)


def cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warm-up then half-cycle cosine from `peak` to `min_lr`, per step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ProbeConfig,
                device: torch.device, desc: str = "linear probe") -> ProbeHead:
    """Train a probe head on device-resident `features` [N, D] (float32) and `labels` [N]."""
    n, dim = features.shape
    batch = min(cfg.batch_size, n)
    if batch < 2:
        raise ValueError(f"a linear probe needs at least 2 training samples (got {n})")
    steps_per_epoch = n // batch
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    head = ProbeHead(dim, num_classes, cfg.bn_eps, cfg.head_init_std,
                     torch.Generator().manual_seed(cfg.seed)).to(device)
    optimizer = LARS(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                     trust_coefficient=cfg.trust_coefficient)
    shuffle = torch.Generator(device=device).manual_seed(cfg.seed)
    head.train()
    step = 0
    with tqdm(range(cfg.epochs), desc=desc, unit="epoch", leave=False, disable=None) as bar:
        for _ in bar:
            order = torch.randperm(n, device=device, generator=shuffle)
            loss_sum = torch.zeros((), device=device)
            start = time.perf_counter()
            for i in range(steps_per_epoch):
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, total, cfg.lr, warmup, cfg.min_lr)
                idx = order[i * batch : (i + 1) * batch]
                loss = F.cross_entropy(head(features[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                step += 1
            # one host read per epoch, for the progress bar
            bar.set_postfix(loss=f"{loss_sum.item() / steps_per_epoch:.4f}",
                            img_s=f"{steps_per_epoch * batch / max(time.perf_counter() - start, 1e-9):.0f}")
    return head


@torch.no_grad()
def accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Top-1 / top-5 accuracy (%) of `head` on `features`, counted on the device."""
    head.eval()
    top = min(5, head[1].out_features)
    correct = torch.zeros(2, dtype=torch.long, device=features.device)
    for lo in range(0, features.shape[0], batch_size):
        pred = head(features[lo : lo + batch_size]).topk(top, dim=1).indices
        hits = pred == labels[lo : lo + batch_size].view(-1, 1)
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    top1, top5 = (100.0 * correct.double() / max(features.shape[0], 1)).tolist()
    return top1, top5


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, cfg: ProbeConfig | None = None,
                 device: str | torch.device | None = None) -> dict:
    """Train the probe on the train features and report top-1 / top-5 (%) on the validation features."""
    cfg = cfg or ProbeConfig()
    device = resolve_device(device)
    for name, x, y in (("train", train_features, train_labels), ("val", val_features, val_labels)):
        check_labels(y, f"{name} labels")
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name} features must be [N, D] with one label per row; got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
    num_classes = num_classes_of(train_labels, val_labels, configured=cfg.num_classes)
    start = time.perf_counter()
    x_train, y_train = train_features.to(device).float(), train_labels.to(device).long()
    head = train_probe(x_train, y_train, num_classes, cfg, device)
    top1, top5 = accuracy(head, val_features.to(device).float(), val_labels.to(device).long(), cfg.eval_batch_size)
    train_top1, _ = accuracy(head, x_train, y_train, cfg.eval_batch_size)
    seconds = time.perf_counter() - start
    log.info("linear probe: top-1 %.2f %%, top-5 %.2f %% (train top-1 %.2f %%) in %.1f s",
             top1, top5, train_top1, seconds)
    return {"top1": top1, "top5": top5, "train_top1": train_top1, "num_train": int(train_features.shape[0]),
            "num_val": int(val_features.shape[0]), "num_classes": num_classes, "lr": cfg.lr,
            "seconds": round(seconds, 3)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lease.evaluate import add_config_arguments, add_config_flag, add_device_argument

    parser.add_argument("--train-features", type=Path, required=True, help="feature artifact dir of the train split")
    parser.add_argument("--val-features", type=Path, required=True, help="feature artifact dir of the val split")
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write")
    add_config_flag(parser, "--epochs", ProbeConfig, "training epochs", int)
    add_config_flag(parser, "--batch-size", ProbeConfig, "images per step", int)
    add_device_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lease.evaluate import config_from_args
    from lease.typed_config import to_dict

    cfg = config_from_args(ProbeConfig, args, epochs=args.epochs, batch_size=args.batch_size)
    train_x, train_y = load_features(args.train_features)
    val_x, val_y = load_features(args.val_features)
    result = linear_probe(train_x, train_y, val_x, val_y, cfg, args.device)
    atomic_write_json(args.out, {"protocol": "linear_probe", "config": to_dict(cfg), **result})
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval linear-probe", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
