"""Which measurement a probe number comes from: `evaluate.protocol: authors | paper | fast`.

- `authors`: what the authors' published scripts do (DESIGN.md "Evaluation"): every step tokenizes
  RandomResizedCrop + flip views online (`lease.evaluate.online`), the encoder runs with its embedding
  dropout on (their model is in train mode; the blocks here stay deterministic), the feature is `mean_ln`
  (MAE's global pool), 10 warm-up epochs, the best validation epoch is reported; validation views are
  Resize 292 → CenterCrop 256. Few-shot runs the same script, so its lr 1.0 is scaled by batch / 256.
- `paper`: the same, where tables A.2 / A.4 say otherwise: 0 warm-up epochs, the last epoch.
- `fast`: the probes on cached centre-crop tokens (`linear_probe`, `fewshot`), the demo's default.

`online_probe` trains the BatchNorm + linear head of `linear_probe` with LARS on features of online views;
validation features are computed once (eval mode, val views) and scored after every epoch on the device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from lease.evaluate.features import autocast_for, encoder_features, eval_mode
from lease.evaluate.fewshot import FewShotConfig, fillable_shots, sample_few_shot, summarise
from lease.evaluate.lars import LARS
from lease.evaluate.linear_probe import ProbeConfig, ProbeHead, accuracy, cosine_lr
from lease.evaluate.online import AugmentConfig, AugmentedImages, OnlineTokenizer, epoch_loader

log = logging.getLogger(__name__)

Protocol = Literal["authors", "paper", "fast"]
PROTOCOLS = ("authors", "paper", "fast")


@dataclass(frozen=True)
class OnlineSettings:
    """What an online protocol fixes (the rest comes from the probe / few-shot configs)."""

    warmup_epochs: float
    select: Literal["best", "last"]
    embed_dropout: bool
    pool: str = "mean_ln"
    fewshot_scale_lr: bool | None = None  # None: the few-shot config's scale_lr


ONLINE = {"authors": OnlineSettings(warmup_epochs=10, select="best", embed_dropout=True, fewshot_scale_lr=True),
          "paper": OnlineSettings(warmup_epochs=0, select="last", embed_dropout=True)}


@contextlib.contextmanager
def embedding_dropout(model: torch.nn.Module, on: bool):
    """Eval mode, except the token embedding (its dropout) when `on`; the previous mode comes back after."""
    with eval_mode(model):
        model.token_emb.train(on)
        yield model


@functools.cache
def compiled_encoder_features() -> Callable[..., torch.Tensor]:
    """`encoder_features` under torch.compile, made once: graphs are cached per model, pool and train/eval
    mode; a second batch size (a few-shot subset, a short last batch) compiles one dynamic-shape graph."""
    return torch.compile(encoder_features)


def online_features(model: torch.nn.Module, tokenizer: OnlineTokenizer, images: torch.Tensor, pool: str,
                    dtype: str) -> torch.Tensor:
    """float32 [B, D] features of a batch of views (no gradients). The encoder is compiled when the VQGAN
    is (on CUDA): eager, its forward takes about a third of a probe step (benchmarks/README.md)."""
    features = compiled_encoder_features() if tokenizer.compiled else encoder_features
    with torch.inference_mode(), autocast_for(tokenizer.device, dtype):
        return features(model, tokenizer(images), pool).float()


def feature_bank(model, tokenizer: OnlineTokenizer, data: AugmentedImages, aug: AugmentConfig, pool: str,
                 dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every image of `data` (epoch 0 views, eval mode), on the tokenizer's device."""
    feats, labels = [], []
    with eval_mode(model):
        for images, y in epoch_loader(data, 0, aug.batch_size, aug.num_workers, shuffle=False,
                                      pin_memory=tokenizer.device.type == "cuda"):
            feats.append(online_features(model, tokenizer, images, pool, dtype))
            labels.append(y.to(tokenizer.device, non_blocking=True))
    return torch.cat(feats), torch.cat(labels)


def online_probe(model, tokenizer: OnlineTokenizer, train: AugmentedImages, val: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, cfg: ProbeConfig, aug: AugmentConfig, settings: OnlineSettings,
                 dtype: str = "auto") -> dict:
    """Train a probe head on online views of `train`; top-1/top-5 (%) on the `val` bank after every epoch,
    reported at the best or the last epoch (`settings.select`)."""
    device = tokenizer.device
    batch = min(cfg.batch_size, len(train))
    tokenizer = tokenizer.resized(batch)
    steps_per_epoch = len(train) // batch
    if batch < 2 or steps_per_epoch == 0:
        raise ValueError(f"an online probe needs at least 2 training images per batch (got {len(train)} images)")
    total, warmup = steps_per_epoch * cfg.epochs, round(min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch)
    head = ProbeHead(model.cfg.embed_dim, num_classes, cfg.bn_eps, cfg.head_init_std,
                     torch.Generator().manual_seed(cfg.seed)).to(device)
    optimizer = LARS(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                     trust_coefficient=cfg.trust_coefficient)
    per_epoch, step, start = [], 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        head.train()
        with embedding_dropout(model, settings.embed_dropout):
            for images, labels in epoch_loader(train, epoch, batch, aug.num_workers, shuffle=True,
                                               pin_memory=device.type == "cuda"):
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, total, cfg.lr, warmup, cfg.min_lr)
                feats = online_features(model, tokenizer, images, settings.pool, dtype)
                loss = F.cross_entropy(head(feats), labels.to(device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        per_epoch.append(accuracy(head, *val, cfg.eval_batch_size))  # one host read per epoch
    best = chosen_epoch([top1 for top1, _ in per_epoch], settings.select)
    seconds = time.perf_counter() - start
    log.info("online probe: top-1 %.2f %% at epoch %d (%s of %d), %.0f train img/s", per_epoch[best][0], best + 1,
             settings.select, cfg.epochs, step * batch / max(seconds, 1e-9))
    return {"top1": per_epoch[best][0], "top5": per_epoch[best][1], "epoch": best + 1, "select": settings.select,
            "top1_per_epoch": [t1 for t1, _ in per_epoch], "num_train": len(train), "num_val": int(val[1].numel()),
            "num_classes": num_classes, "lr": cfg.lr, "warmup_epochs": cfg.warmup_epochs,
            "train_images_per_s": round(step * batch / max(seconds, 1e-9), 1), "seconds": round(seconds, 3)}


def chosen_epoch(top1_per_epoch: list[float], select: str) -> int:
    """Index of the reported epoch: the best validation top-1 (the first of ties) or the last."""
    if select == "best":
        return max(range(len(top1_per_epoch)), key=top1_per_epoch.__getitem__)
    return len(top1_per_epoch) - 1


def probe_config(cfg: ProbeConfig, settings: OnlineSettings) -> ProbeConfig:
    return dataclasses.replace(cfg, warmup_epochs=min(settings.warmup_epochs, cfg.epochs))


def online_few_shot(model, tokenizer: OnlineTokenizer, train: AugmentedImages, val: tuple[torch.Tensor, torch.Tensor],
                    num_classes: int, cfg: FewShotConfig, aug: AugmentConfig, settings: OnlineSettings,
                    dtype: str = "auto") -> dict:
    """Few-shot probes on online views: per shot count and seed, a `sample_few_shot` subset of `train`."""
    scale = cfg.scale_lr if settings.fewshot_scale_lr is None else settings.fewshot_scale_lr
    rows = {}
    shot_counts, skipped = fillable_shots(train.labels, cfg, num_classes)
    for shots in shot_counts:
        per_seed = []
        for seed in cfg.seeds:
            idx = sample_few_shot(train.labels, shots, seed, num_classes, cfg.on_short_class).tolist()
            subset = AugmentedImages([train.locations[i] for i in idx], train.labels[idx].tolist(), train.transform,
                                     train.decode, seed=seed)
            probe = probe_config(dataclasses.replace(cfg.probe(seed), scale_lr=scale, num_classes=num_classes),
                                 settings)
            per_seed.append(online_probe(model, tokenizer, subset, val, num_classes, probe, aug, settings,
                                         dtype)["top1"])
        rows[str(shots)] = {"top1": statistics.fmean(per_seed), "std": statistics.pstdev(per_seed),
                            "per_seed": per_seed, "num_train": len(idx)}
    return {**summarise(rows, skipped, cfg, num_classes), "scale_lr": scale}


@dataclass
class OnlineViews:
    """The images an online protocol probes: train views (augmented), val views, and the VQGAN encoding them."""

    train: AugmentedImages
    val: AugmentedImages
    tokenizer: OnlineTokenizer


def online_probes(protocol: Protocol, model, views: OnlineViews, probe: ProbeConfig, fewshot: FewShotConfig,
                  aug: AugmentConfig, dtype: str = "auto") -> dict[str, dict]:
    """The linear probe and few-shot results of an online `protocol` (authors or paper)."""
    from lease.evaluate.knn import num_classes_of

    settings = ONLINE[protocol]
    val = feature_bank(model, views.tokenizer, views.val, aug, settings.pool, dtype)
    num_classes = num_classes_of(views.train.labels, val[1].cpu(), configured=probe.num_classes)
    return {"linear_probe": online_probe(model, views.tokenizer, views.train, val, num_classes,
                                         probe_config(probe, settings), aug, settings, dtype),
            "fewshot": online_few_shot(model, views.tokenizer, views.train, val, num_classes, fewshot, aug, settings,
                                       dtype)}


def labelled(results: dict[str, dict], protocol: Protocol) -> dict[str, dict]:
    """Each result with the protocol that produced it (`eval_protocol`); k-NN always reads cached tokens."""
    return {name: {**r, "eval_protocol": "fast" if name == "knn" else protocol} for name, r in results.items()}
