"""Full fine-tuning of the encoder on online-tokenized views (paper table 3, table A.3; MAE/MAGE's recipe).

Table A.3: AdamW (wd 0.05), lr = 2.5e-4 × batch / 256, layer-wise lr decay 0.65, batch 1024, 100 epochs,
5 warm-up epochs then cosine, label smoothing 0.1, RandAug(9, 0.5), mixup 0.8, cutmix 1.0, no random
erasing, drop path 0.1. The pieces are timm's: `create_transform` (the `randaug` view of
`lease.evaluate.online`), `Mixup` (on the pixel batch, before the VQGAN, as MAGE mixes images),
`SoftTargetCrossEntropy`, `DropPath`, `param_groups_layer_decay` (block i of depth d gets
lr × 0.65^(d − i), i = 0 … d−1, the embedding 0.65^(d+1), the head 1) and `CosineLRScheduler`, per step.

The classifier is MAE's with global pool: the mean of the pre-final-norm patch tokens, a LayerNorm
(`fc_norm`, trained here), a linear head. As in the authors' fine-tuning model (timm's ViT with its drop
and attention-drop rates at 0 around MAGE's BERT embedding), the token embedding keeps its dropout and
the blocks have none besides drop path; a pretraining config's block dropouts stay off in train mode.

Checkpoints are written after every epoch; every epoch's views, mixup draws and drop-path masks are seeded
from (seed, epoch), so a resumed run continues exactly.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from lease.checkpoints import load_checkpoint, save_checkpoint
from lease.evaluate.features import autocast_for
from lease.evaluate.online import AugmentConfig, AugmentedImages, OnlineTokenizer, epoch_loader, to_unit, view_transform
from lease.io import atomic_write_json
from lease.typed_config import require

log = logging.getLogger(__name__)
CHECKPOINT, RESULT = "finetune.pt", "finetune.json"


@dataclass
class FinetuneConfig:
    base_lr: float = 2.5e-4  # × batch_size / 256
    batch_size: int = 1024
    epochs: int = 100
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    drop_path: float = 0.1
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.base_lr > 0, "base_lr", "must be > 0")
        require(self.batch_size > 1 and self.batch_size % 2 == 0, "batch_size", "must be even (mixup pairs a batch)")
        require(self.epochs > 0, "epochs", "must be > 0")
        require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", "must be in [0, epochs]")
        require(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
        require(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


class FinetuneClassifier(nn.Module):
    """The pretrained token embedding and blocks (with stochastic depth), MAE's global pool and a head."""

    def __init__(self, encoder: nn.Module, num_classes: int, drop_path: float):
        super().__init__()
        # the encoder's own embedding (word + position + 2-D sin-cos); `encoder` must be on the device already
        self.embed_fn, dim, depth = encoder.embed, encoder.cfg.embed_dim, encoder.cfg.depth
        self.token_emb, self.blocks = encoder.token_emb, encoder.blocks
        # timm's stochastic-depth rule: the drop rate grows linearly with the block index
        self.drop_paths = nn.ModuleList(DropPath(r) for r in torch.linspace(0, drop_path, depth).tolist())
        self.fc_norm = nn.LayerNorm(dim, eps=encoder.cfg.ln_eps)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init
        nn.init.zeros_(self.head.bias)
        self.cls_token_id = encoder.cfg.cls_token_id

    def train(self, mode: bool = True) -> FinetuneClassifier:
        """Train mode for the embedding's dropout, the drop paths and the head; the blocks' own dropouts
        (attention, projection, MLP) stay off, as in the authors' fine-tuning ViT."""
        super().train(mode)
        self.blocks.eval()
        return self

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for timm's layer-wise lr decay as MAE's `param_groups_lrd` numbers them: the embedding 0,
        block i → i + 1, norm + head their own last layer (timm's ViT would merge them into the last block)."""
        return {"stem": r"^token_emb", "blocks": r"^blocks\.(\d+)", "head": r"^fc_norm|^head"}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([torch.full_like(ids[:, :1], self.cls_token_id), ids], dim=1)
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        x = self.embed_fn(ids, positions)
        for block, drop in zip(self.blocks, self.drop_paths):  # Block.forward with a drop path on each branch
            x = x + drop(block.attn(block.norm1(x)))
            x = x + drop(block.mlp(block.norm2(x)))
        return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))


def optimizer_for(model: FinetuneClassifier, cfg: FinetuneConfig) -> torch.optim.AdamW:
    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=on_cuda)


def mixup_for(cfg: FinetuneConfig, num_classes: int) -> Mixup:
    """timm's Mixup / CutMix (one of the two per batch, switch probability 0.5) with label smoothing."""
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def _seed_epoch(cfg: FinetuneConfig, epoch: int) -> None:
    """Mixup draws from numpy, drop path from torch: both from (seed, epoch), so a resume is exact."""
    entropy = np.random.SeedSequence([cfg.seed, epoch]).generate_state(2)
    np.random.seed(int(entropy[0]))
    torch.manual_seed(int(entropy[1]))


def train_step(model: nn.Module, tokenizer: OnlineTokenizer, optimizer: torch.optim.Optimizer,
               mixup: Mixup, images: torch.Tensor, labels: torch.Tensor, dtype: str) -> torch.Tensor:
    """One step on a uint8 image batch: mixup/cutmix on the pixels, VQGAN codes, `classifier_update`;
    returns the loss (on the device, not read)."""
    device = tokenizer.device
    x, soft = mixup(to_unit(images, device), labels.to(device, non_blocking=True))
    return classifier_update(model, optimizer, tokenizer(x), soft, dtype)


def classifier_update(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, soft: torch.Tensor,
                      dtype: str) -> torch.Tensor:
    """Soft-target cross-entropy of the classifier on code ids, backward, AdamW; returns the loss."""
    with autocast_for(ids.device, dtype):
        loss = SoftTargetCrossEntropy()(model(ids), soft)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def evaluate(model: FinetuneClassifier, tokenizer: OnlineTokenizer, val: AugmentedImages, aug: AugmentConfig,
             dtype: str) -> tuple[float, float]:
    """Top-1 / top-5 (%) on the val views, counted on the device."""
    model.eval()
    device = tokenizer.device
    correct = torch.zeros(2, dtype=torch.long, device=device)
    for images, labels in epoch_loader(val, 0, aug.batch_size, aug.num_workers, shuffle=False):
        with autocast_for(device, dtype):
            logits = model(tokenizer(images))
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.to(device).view(-1, 1)
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    top1, top5 = (100.0 * correct.double() / max(len(val), 1)).tolist()
    return top1, top5


def finetune(encoder: nn.Module, tokenizer: OnlineTokenizer, train: AugmentedImages, val: AugmentedImages,
             num_classes: int, cfg: FinetuneConfig, aug: AugmentConfig, out_dir: str | Path,
             stop_after: int | None = None) -> dict:
    """Fine-tune on online randaug views of `train`, evaluating `val` after every epoch; resumes from
    `out_dir/finetune.pt` when present. `stop_after` ends after that many epochs of this call."""
    out_dir, device = Path(out_dir), tokenizer.device
    torch.manual_seed(cfg.seed)
    model = FinetuneClassifier(encoder, num_classes, cfg.drop_path).to(device)
    optimizer = optimizer_for(model, cfg)
    steps_per_epoch = len(train) // cfg.batch_size
    require(steps_per_epoch > 0, "batch_size", f"is more than the {len(train)} training images")
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=cfg.min_lr,
                                  warmup_t=cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=0.0, t_in_epochs=False)
    mixup = mixup_for(cfg, num_classes)
    history, start_epoch = [], 0
    if (out_dir / CHECKPOINT).is_file():
        state = load_checkpoint(out_dir / CHECKPOINT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        log.info("fine-tune: resuming after epoch %d", start_epoch)
    tokenizer = tokenizer.resized(cfg.batch_size)
    # compiled with the VQGAN (on CUDA), for the training step only: evaluation batches would add graphs
    train_model = torch.compile(model) if tokenizer.compiled else model
    last = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, last):
        _seed_epoch(cfg, epoch)
        model.train()
        started, step = time.perf_counter(), epoch * steps_per_epoch
        for images, labels in epoch_loader(train, epoch, cfg.batch_size, aug.num_workers, shuffle=True,
                                           pin_memory=device.type == "cuda"):
            scheduler.step_update(step)
            loss = train_step(train_model, tokenizer, optimizer, mixup, images, labels, cfg.dtype)
            step += 1
        rate = steps_per_epoch * cfg.batch_size / max(time.perf_counter() - started, 1e-9)
        top1, top5 = evaluate(model, tokenizer, val, aug, cfg.dtype)
        history.append({"epoch": epoch + 1, "top1": top1, "top5": top5, "loss": float(loss.detach()),
                        "train_images_per_s": round(rate, 1)})
        log.info("fine-tune epoch %d/%d: top-1 %.2f %%, top-5 %.2f %%, %.0f img/s", epoch + 1, cfg.epochs, top1,
                 top5, rate)
        save_checkpoint(out_dir / CHECKPOINT, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                               "epoch": epoch + 1, "history": history})
    # finetune.json (INTERFACES.md): top1, top5, epochs (done), protocol; then the details
    result = {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "epochs": len(history),
              "epochs_done": len(history), "completed": len(history) == cfg.epochs, "history": history, "lr": cfg.lr,
              "num_train": len(train), "num_val": len(val), "num_classes": num_classes}
    atomic_write_json(out_dir / RESULT, {"protocol": "finetune", **result})
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lease.evaluate import add_config_arguments, add_device_argument
    from lease.evaluate.generate import add_vqgan_arguments

    parser.add_argument("--checkpoint", type=Path, required=True, help="a lease training checkpoint")
    add_vqgan_arguments(parser)
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest stage's manifest.parquet")
    parser.add_argument("--out", type=Path, required=True, help="directory for finetune.pt and finetune.json")
    parser.add_argument("--num-workers", type=int, default=8, help="image decode workers")
    add_device_argument(parser)
    add_config_arguments(parser)


Views = tuple[AugmentedImages, AugmentedImages]  # (train randaug views, val views)


def manifest_views(manifest: Path, aug: AugmentConfig, seed: int) -> Views:
    """A manifest's train split as RandAug views and its val split as validation views."""
    from lease.images import decode_location
    from lease.manifests import read_manifest

    views = []
    for split, view in (("train", "randaug"), ("val", "val")):
        rows = read_manifest(manifest, split=split)
        views.append(AugmentedImages(rows["location"].to_pylist(), rows["label"].to_pylist(), view_transform(aug, view),
                                     decode_location, seed=seed))
    return views[0], views[1]


def run(args: argparse.Namespace) -> int:
    """`lease eval finetune`: table A.3 on a manifest's train/val images (resumes an interrupted run)."""
    from lease.checkpoints import model_from_checkpoint
    from lease.evaluate import config_from_args
    from lease.evaluate.features import resolve_device
    from lease.evaluate.generate import load_vqgan_from_args
    from lease.evaluate.knn import num_classes_of

    cfg = config_from_args(FinetuneConfig, args)
    device = resolve_device(args.device)
    aug = AugmentConfig(num_workers=args.num_workers, seed=cfg.seed)
    train, val = manifest_views(args.manifest, aug, cfg.seed)
    vqgan = load_vqgan_from_args(args, device, compile=device.type == "cuda")
    encoder = model_from_checkpoint(args.checkpoint, device)
    finetune(encoder, OnlineTokenizer(vqgan, aug.batch_size), train, val, num_classes_of(train.labels, val.labels),
             cfg, aug, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval finetune", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
