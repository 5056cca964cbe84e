"""`lease bench authors`: the authors' own MAGE training step beside ours, in one GPU job.

The authors' code is read from a clone of LTH14/mage that the user names with `--repo` (it is not part
of this repository, and nothing is fetched). Their `mage_vit_base_patch16` is built as `main_pretrain.py`
builds it (mask ratio mu 0.55, std 0.25) with a random-weight VQGAN (`vqgan_ckpt_path=None`, so no file is
loaded), and each timed call is one iteration of their `engine_pretrain.train_one_epoch`: fp16 autocast,
the forward with its VQGAN encode, `loss.item()`, GradScaler backward, unscale, clip at 3.0, AdamW
(0.9, 0.95) with their weight-decay groups, `torch.cuda.synchronize()`. Their images come from a CPU
loader already cropped; here they are resident 256x256 batches, so the time is the model's, not the
disk's. Ours is `lease bench train --method mage_online` at the same batch (its step also does the GPU
crop and flip), compiled, in the same process.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import statistics
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from timm.optim import param_groups_weight_decay

from benchmarks.records import write_record
from benchmarks.timing import time_cuda
from benchmarks.train import SYNTHETIC_BATCHES, bench_train

log = logging.getLogger(__name__)
OUR_PRESET = "vit_base"  # the size of their mage_vit_base_patch16
AUTHORS_MAGE = {"mask_ratio_mu": 0.55, "mask_ratio_std": 0.25, "grad_clip": 3.0, "betas": (0.9, 0.95),
                "weight_decay": 0.05, "blr": 1.5e-4}  # their README's ViT-B pretraining command and main_pretrain.py defaults


@contextlib.contextmanager
def inside(repo: Path) -> Iterator[None]:
    """Their modules import as top-level names and read `config/vqgan.yaml` relative to the working
    folder, so both point at their clone while their model is built. Their `taming/` has no
    `__init__.py`, so an installed taming-transformers would shadow it: `taming` is bound to their folder."""
    cwd, path = Path.cwd(), list(sys.path)
    shadowed = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "taming"}
    for name in shadowed:
        del sys.modules[name]
    theirs = types.ModuleType("taming")
    theirs.__path__ = [str(repo / "taming")]
    sys.modules["taming"] = theirs
    os.chdir(repo)
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        for name in [name for name in sys.modules if name.split(".")[0] == "taming"]:
            del sys.modules[name]
        sys.modules.update(shadowed)


def check_repo(repo: Path) -> None:
    missing = [name for name in ("models_mage.py", "config/vqgan.yaml", "taming/models/vqgan.py", "util/pos_embed.py")
               if not (repo / name).is_file()]
    if missing:
        raise SystemExit(f"--repo {repo}: {', '.join(missing)} not there; give a clone of github.com/LTH14/mage")


def authors_mage(repo: Path) -> torch.nn.Module:
    """Their ViT-B MAGE, random weights everywhere (`repo` as `check_repo` accepted it). `np.float`
    (removed in NumPy 1.24) is the one name their `util/pos_embed.py` needs that today's NumPy lacks; it
    meant the builtin float."""
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]
    with inside(repo):
        import models_mage  # their file, imported from their clone

        return models_mage.mage_vit_base_patch16(mask_ratio_mu=AUTHORS_MAGE["mask_ratio_mu"],
                                                 mask_ratio_std=AUTHORS_MAGE["mask_ratio_std"],
                                                 vqgan_ckpt_path=None)


def time_authors_mage(repo: Path, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    """Milliseconds per iteration of their training loop on resident images."""
    device = torch.device("cuda")
    model = authors_mage(repo).to(device).train()
    lr = AUTHORS_MAGE["blr"] * batch_size / 256
    # timm's grouping is their old `add_weight_decay`'s rule: no decay on biases and 1-D tensors
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, AUTHORS_MAGE["weight_decay"]), lr=lr,
                                  betas=AUTHORS_MAGE["betas"])
    scaler = torch.amp.GradScaler("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device).manual_seed(0)
    images = itertools.cycle([torch.rand(batch_size, 3, 256, 256, device=device, generator=generator)
                              for _ in range(SYNTHETIC_BATCHES)])
    losses: list[float] = []

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss, _, _ = model(next(images))
        losses.append(loss.item())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, AUTHORS_MAGE["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    ms = time_cuda(step, warmup, steps)
    median = statistics.median(ms)
    if not all(math.isfinite(loss) for loss in losses):
        raise SystemExit(f"the authors' MAGE step gave a non-finite loss: {losses[-5:]}")
    return {"code": "LTH14/mage models_mage.mage_vit_base_patch16, engine_pretrain's iteration",
            "batch_size": batch_size, "dtype": "fp16 autocast", "compile": False, "steps_timed": steps,
            "warmup_steps": warmup, "median_ms_per_step": round(median, 3),
            "images_per_s": round(batch_size / (median / 1e3), 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "last_loss": round(losses[-1], 4)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="a clone of github.com/LTH14/mage")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ours-compile", choices=["on", "off"], default="on",
                        help="our mage_online step compiled (default) or eager")
    parser.add_argument("--codebook-size", type=int, default=16384, help="our step's synthetic codebook (as train's)")
    parser.add_argument("--codebook-dim", type=int, default=768)
    parser.add_argument("--out-dir", default=None, help="where the JSON record goes (default benchmarks/results)")


def run_cli(args: argparse.Namespace) -> int:
    repo = args.repo.resolve()
    check_repo(repo)
    if not torch.cuda.is_available():
        raise SystemExit("lease bench authors times GPU training steps: no CUDA device found")
    theirs = time_authors_mage(repo, args.batch_size, args.steps, args.warmup)
    log.info("authors' MAGE: %.0f img/s (%.1f ms/step)", theirs["images_per_s"], theirs["median_ms_per_step"])
    torch.cuda.empty_cache()
    compiled = args.ours_compile == "on"
    ours = bench_train(OUR_PRESET, args.batch_size, "bf16", compiled, args.steps, args.warmup * (3 if compiled else 1),
                       args.codebook_size, args.codebook_dim, method="mage_online")
    log.info("ours, mage_online: %.0f img/s (%.1f ms/step)", ours["images_per_s"], ours["median_ms_per_step"])
    ratio = round(ours["images_per_s"] / theirs["images_per_s"], 3)
    name = f"authors-mage-{OUR_PRESET}-b{args.batch_size}-ours_{'compile' if compiled else 'eager'}"
    write_record(name, {"results": {"authors": theirs, "ours": ours, "ours_over_authors": ratio}}, args.out_dir)
    log.info("mage_online over the authors' MAGE step: %.2fx", ratio)
    return 0
