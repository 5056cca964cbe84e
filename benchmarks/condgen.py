"""`lease bench condgen`: the class-conditional decoder's fine-tuning and generation speed (issue 27).

On one model size (default ViT-B, random weights, synthetic tokens; a real pretraining checkpoint is
written first so the conditional model is built by the code a run uses, `lease.condgen.conditional_model`):

- training images/s of the pretraining step (LEASE, eq. 5) and of the conditional decoder's step (encoder
  frozen, no gradient; reconstruction only), with the class token alone and with the centroid tail;
- MaskGIT token sampling images/s, unconditional against class-conditional (both tails).

Ratios are taken within the run (same process, same GPU). One JSON record under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.records import write_record
from benchmarks.timing import time_calls
from lease.checkpoints import save_checkpoint
from lease.condgen import class_condition, condgen_config, conditional_model
from lease.configs import train_config
from lease.data import ResidentBatches
from lease.evaluate.generate import GenerateConfig, MaskGitSampler
from lease.synthetic import uniform_tokens
from lease.train import Dist, Trainer, build_model
from lease.typed_config import to_dict

log = logging.getLogger(__name__)
BATCHES = 8  # distinct resident batches the timed steps cycle through


def _images_per_s(ms: list[float], batch: int) -> float:
    return round(batch / (statistics.median(ms) / 1e3), 1)


def _setup(root: Path, preset: str, batch: int, classes: int, text_dim: int, codebook_size: int, codebook_dim: int,
           dtype: str, compile: bool, device: torch.device) -> dict[str, Any]:
    """A random pretraining checkpoint, codebook, class embeddings and resident labelled tokens."""
    common = {"preset": preset, "batch_size": batch, "dtype": dtype, "compile": compile, "max_steps": 10**9}
    pretrain = train_config(common)
    centroids = torch.randn(codebook_size, codebook_dim)
    model = build_model(pretrain, centroids.to(device))  # the neighbour table on the device: K² similarities
    save_checkpoint(root / "pretrain.pt", {"model": model.state_dict(), "model_config": to_dict(model.cfg),
                                           "loss_config": to_dict(model.loss_cfg), "step": 0})
    np.save(root / "centroids.npy", centroids.numpy())
    np.save(root / "classes.npy", torch.nn.functional.normalize(torch.randn(classes, text_dim), dim=-1).numpy())
    tokens = uniform_tokens(batch * BATCHES, model.cfg.seq_len, model.cfg.vocab_gen, codebook_size, seed=0)
    tokens.labels = torch.randint(0, classes, (len(tokens),), generator=torch.Generator().manual_seed(0))
    return {"pretrain": pretrain, "model": model, "tokens": tokens, "common": common}


def _train_rate(cfg, model, tokens, device: torch.device, warmup: int, steps: int) -> float:
    batches = ResidentBatches(tokens, cfg.batch_size, device, seed=0)
    trainer, data = Trainer(cfg, model, device, Dist(), batches.steps_per_epoch), batches.iterate(0)
    return _images_per_s(time_calls(lambda: trainer.step(next(data)), warmup, steps, device), cfg.batch_size)


def _sample_rate(model, condition_fn, batch: int, gen: GenerateConfig, device: torch.device, warmup: int,
                 repeats: int) -> float:
    sampler = MaskGitSampler(model.to(device), gen, device)
    condition = condition_fn(model, batch)
    return _images_per_s(time_calls(lambda: sampler.sample(batch, condition), warmup, repeats, device), batch)


def bench_condgen(preset: str = "vit_base", batch_size: int = 256, gen_batch: int = 256, dtype: str = "bf16",
                  compile: bool = True, steps: int = 20, warmup: int = 5, repeats: int = 3, classes: int = 1000,
                  text_dim: int = 512, codebook_size: int = 16384, codebook_dim: int = 768,
                  device: str = "cuda") -> dict[str, Any]:
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    root = Path(tempfile.mkdtemp(prefix="bench-condgen-"))
    setup = _setup(root, preset, batch_size, classes, text_dim, codebook_size, codebook_dim, dtype, compile, dev)
    result: dict[str, Any] = {"preset": preset, "batch_size": batch_size, "generation_batch": gen_batch,
                              "dtype": dtype, "compile": compile, "classes": classes, "codebook_size": codebook_size}
    result["pretrain_images_per_s"] = _train_rate(setup["pretrain"], setup["model"].to(dev), setup["tokens"], dev,
                                                  warmup, steps)
    gen = GenerateConfig(preset="mage", batch_size=gen_batch, dtype=dtype if dtype != "fp32" else "fp32",
                         compile=compile, num_images=gen_batch)
    uncond = setup["model"].eval()
    result["unconditional_generation_images_per_s"] = _sample_rate(uncond, lambda m, b: None, gen_batch, gen, dev,
                                                                   1, repeats)
    for tail in ("none", "centroids"):
        cfg = condgen_config({"pretrained": str(root / "pretrain.pt"), "class_embeddings": str(root / "classes.npy"),
                              "tail": tail, "train": {**setup["common"], "data": {"codebook": str(root / "centroids.npy")}}})
        model = conditional_model(cfg).to(dev)
        rate = _train_rate(cfg.train, model, setup["tokens"], dev, warmup, steps)
        tails = setup["tokens"].disc[:gen_batch].long()

        def condition(m, b, tails=tails):
            return class_condition(m, 3, b, tails if m.tail_proj is not None else None, dev)

        sample_rate = _sample_rate(model.eval(), condition, gen_batch, gen, dev, 1, repeats)
        result[f"condgen_{tail}"] = {
            "train_images_per_s": rate, "train_ratio_to_pretrain": round(rate / result["pretrain_images_per_s"], 3),
            "generation_images_per_s": sample_rate,
            "generation_ratio_to_unconditional": round(sample_rate / result["unconditional_generation_images_per_s"], 3)}
        log.info("condgen tail=%s: train %.0f img/s (%.2fx pretraining), generation %.0f img/s (%.2fx unconditional)",
                 tail, rate, result[f"condgen_{tail}"]["train_ratio_to_pretrain"], sample_rate,
                 result[f"condgen_{tail}"]["generation_ratio_to_unconditional"])
    if dev.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="vit_base")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--generation-batch", type=int, default=256)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed generation batches")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    parser.add_argument("--out-dir", default=None, help="where the JSON record goes (default benchmarks/results)")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lease bench condgen measures GPU speed: no CUDA device found (--device cpu for a smoke run)")
    result = bench_condgen(args.preset, args.batch_size, args.generation_batch, args.dtype, args.compile == "on",
                           args.steps, args.warmup, args.repeats, args.classes, codebook_size=args.codebook_size,
                           device=args.device)
    name = f"condgen-{args.preset}-b{args.batch_size}-{args.dtype}-{'compile' if args.compile == 'on' else 'eager'}"
    write_record(name, {"results": result}, args.out_dir)
    return 0
