"""`lease bench generate`: MaskGIT decoding + VQGAN decoding images/s, and the two parts alone."""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.records import write_record
from lease.evaluate.features import resolve_device
from lease.evaluate.generate import (GENERATE_PRESETS, GenerateConfig, MaskGitSampler, check_compatible, decode_images,
                                     load_vqgan_from_args)

log = logging.getLogger(__name__)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_generate(model: torch.nn.Module, vqgan, batch_size: int = 256, steps: int | None = None,
                   dtype: str = "bf16", compile: bool = False, device: str | torch.device | None = None,
                   warmup: int = 2, repeats: int = 5, preset: str = "mage") -> dict:
    """Generated images/s for MaskGIT decoding (`preset`, `steps` overriding its count) plus VQGAN
    decoding, at `batch_size`.

    Median over `repeats` timed batches after `warmup` untimed ones (compilation happens there); also the
    two parts alone, so one sees where the time goes.
    """
    device = resolve_device(device)
    cfg = GenerateConfig(preset=preset, num_steps=steps, batch_size=batch_size, dtype=dtype, compile=compile,
                         num_images=batch_size)
    sampler = MaskGitSampler(model, cfg, device)
    tokens = sampler.sample(batch_size)

    def full() -> None:
        decode_images(vqgan, sampler.sample(batch_size), sampler.grid_size, dtype)

    for _ in range(warmup):
        full()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = [_timed(full, device) for _ in range(repeats)]
    tokens_only = [_timed(lambda: sampler.sample(batch_size), device) for _ in range(repeats)]
    decode_only = [_timed(lambda: decode_images(vqgan, tokens, sampler.grid_size, dtype), device)
                   for _ in range(repeats)]
    median = statistics.median(total)
    result = {"batch_size": batch_size, "preset": preset, "steps": cfg.num_steps, "greedy_fill": cfg.greedy_fill,
              "dtype": dtype, "compile": compile,
              "device": str(device), "repeats": repeats, "warmup": warmup,
              "median_s_per_batch": round(median, 4), "images_per_s": round(batch_size / median, 1),
              "maskgit_images_per_s": round(batch_size / statistics.median(tokens_only), 1),
              "vqgan_decode_images_per_s": round(batch_size / statistics.median(decode_only), 1),
              "seconds_for_50k": round(50000 / (batch_size / median), 1)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    log.info("generation: %.1f img/s (MaskGIT %.1f, VQGAN decode %.1f) at batch %d, %s%s",
             result["images_per_s"], result["maskgit_images_per_s"], result["vqgan_decode_images_per_s"],
             batch_size, dtype, ", compiled" if compile else "")
    return result



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lease bench generate`."""
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: random weights of --preset")
    parser.add_argument("--preset", default="vit_base")
    parser.add_argument("--vqgan-kind", choices=["maskgit", "taming"], default="maskgit")
    parser.add_argument("--vqgan-checkpoint", type=Path, default=None,
                        help="default: random weights at MAGE's full width (ch 128, 2 blocks, 1024 codes)")
    parser.add_argument("--vqgan-config", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256])
    parser.add_argument("--generate-preset", choices=list(GENERATE_PRESETS), default="mage",
                        help="decoding protocol (mage: 20 steps + greedy fill; maskgit: 12 steps)")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="on")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="where the JSON records go (default benchmarks/results)")


def run(args: argparse.Namespace) -> int:
    """`lease bench generate`: one JSON record per batch size and compile mode."""
    from lease.checkpoints import model_from_checkpoint
    from lease.configs import model_config
    from lease.model import LeaseModel

    if not torch.cuda.is_available():
        raise SystemExit("lease bench generate measures GPU throughput: no CUDA device found")
    device = torch.device("cuda")
    if args.checkpoint is not None:
        model = model_from_checkpoint(args.checkpoint, device)
    else:
        model = LeaseModel(model_config(args.preset, contrast_on="none")).to(device)
    if args.vqgan_checkpoint is None:  # no weights needed to time it: MAGE's architecture, random init
        import tempfile

        from lease.tokenizers.tiny import save_tiny_maskgit_vqgan

        args.vqgan_checkpoint = save_tiny_maskgit_vqgan(Path(tempfile.mkdtemp()) / "vqgan_full_width.ckpt",
                                                        ch=128, num_res_blocks=2, z_channels=256, n_embed=1024)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    for batch in args.batch_size:
        for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
            vqgan = load_vqgan_from_args(args, device, dtype=torch_dtype, compile=compiled)
            check_compatible(model, vqgan)
            result = bench_generate(model, vqgan, batch, args.steps, args.dtype, compiled, device,
                                    warmup=args.warmup * (2 if compiled else 1), repeats=args.repeats,
                                    preset=args.generate_preset)
            name = f"generate-{args.checkpoint.stem if args.checkpoint else args.preset}-b{batch}-{args.dtype}-" \
                   f"{'compile' if compiled else 'eager'}"
            write_record(name, {"results": {**result, "vqgan": str(args.vqgan_checkpoint)}}, args.out_dir)
    return 0
