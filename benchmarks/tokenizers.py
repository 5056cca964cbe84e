"""Timing helpers for the tokenizers (used by `lease bench tokenize`; records are written by the caller).

`time_vqgan_encode` / `time_dinov2_features` time one batch shape of synthetic images already on the
device (decoding is measured elsewhere): warm-up calls, then `steps` timed calls, each bracketed by CUDA
events on CUDA (wall clock on CPU), reporting the median ms per step, images/s and peak device memory.
`full_width_maskgit_config()` gives the released MAGE VQGAN sizes and `DINOV2_B14_SIZES` DINOv2-B/14's, so
random-weight models of the real widths can be timed where the checkpoints are not available.
"""
from __future__ import annotations

import argparse
import logging
import statistics
from typing import Any

import torch

from benchmarks.timing import time_calls
from lease.tokenizers import ConvVQGANTokenizer
from lease.tokenizers.dinov2 import Dinov2Features
from lease.tokenizers.vqgan_maskgit import MaskGITTokenizer, MaskGITVQGAN, MaskGITVQGANConfig

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# facebook/dinov2-base (ViT-B/14, no registers), as `lease.tokenizers.tiny.tiny_hf_dinov2` takes its sizes
DINOV2_B14_SIZES = dict(hidden_size=768, depth=12, num_heads=12, registers=0)


def full_width_maskgit_config() -> MaskGITVQGANConfig:
    """MAGE's `vqgan_jax_strongaug.ckpt` sizes: ch 128, ch_mult 1,1,2,2,4, 2 blocks, z 256, 1024 codes, f16."""
    return MaskGITVQGANConfig(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256, embed_dim=256,
                              n_embed=1024, resolution=256)


def random_maskgit_tokenizer(cfg: MaskGITVQGANConfig, device: str | torch.device, dtype: torch.dtype,
                             compile: bool, channels_last: bool | None = None, seed: int = 0) -> MaskGITTokenizer:
    """A random-weight MaskGIT VQGAN tokenizer of the given sizes (timings do not depend on the weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskGITVQGAN(cfg)
    return MaskGITTokenizer(model.eval().requires_grad_(False).to(device), dtype=dtype, compile=compile,
                            channels_last=channels_last)


def _summary(ms: list[float], batch_size: int, device: torch.device) -> dict[str, Any]:
    median = statistics.median(ms)
    ordered = sorted(ms)
    out = {"batch_size": batch_size, "steps_timed": len(ms), "median_ms_per_step": round(median, 3),
           "p10_ms": round(ordered[len(ms) // 10], 3), "p90_ms": round(ordered[(9 * len(ms)) // 10], 3),
           "images_per_s": round(batch_size / (median / 1e3), 1)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def _synthetic_images(batch_size: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(batch_size, 3, size, size, generator=gen, device=device)


def time_vqgan_encode(tokenizer: ConvVQGANTokenizer, batch_size: int, dtype: torch.dtype | None = None,
                      compile: bool | None = None, warmup: int = 10, steps: int = 30,
                      device: str | torch.device | None = None, channels_last: bool | None = None) -> dict[str, Any]:
    """Median time of `tokenizer.encode` on a batch of random [0,1] images at its image size.

    dtype / compile / channels_last (None: as the tokenizer is) rebuild the tokenizer's execution around the
    same network; `device` moves the network first.
    """
    if device is not None and torch.device(device) != tokenizer.device:
        tokenizer.model.to(device)
        tokenizer = tokenizer.reconfigured(dtype=dtype or tokenizer.dtype, channels_last=channels_last,
                                           compile=compile)
    elif dtype is not None or compile is not None or channels_last is not None:
        tokenizer = tokenizer.reconfigured(dtype=dtype, channels_last=channels_last, compile=compile)
    device = tokenizer.device
    images = _synthetic_images(batch_size, tokenizer.image_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_calls(lambda: tokenizer.encode(images), warmup, steps, device)
    return {"what": "vqgan_encode", "backend": type(tokenizer).__name__, "num_codes": tokenizer.num_codes,
            "image_size": tokenizer.image_size, "dtype": str(tokenizer.dtype).replace("torch.", ""),
            "compile": tokenizer.compiled, "channels_last": tokenizer.memory_format == torch.channels_last,
            **_summary(ms, batch_size, device)}


def time_dinov2_features(features: Dinov2Features, batch_size: int, dtype: torch.dtype | None = None,
                         compile: bool | None = None, warmup: int = 10, steps: int = 30,
                         device: str | torch.device | None = None) -> dict[str, Any]:
    """Median time of the DINOv2 patch-feature pass on a batch of random [0,1] images."""
    if device is not None and torch.device(device) != features.device:
        features = features.to(device)
    if dtype is not None or compile is not None:
        features = features.reconfigured(dtype=dtype, compile=compile)
    images = _synthetic_images(batch_size, features.image_size, features.device)
    if features.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(features.device)
    ms = time_calls(lambda: features(images), warmup, steps, features.device)
    return {"what": "dinov2_features", "backend": features.backend, "block": features.block,
            "embed_dim": features.embed_dim, "image_size": features.image_size,
            "dtype": str(features.dtype).replace("torch.", ""), "compile": features.compiled,
            **_summary(ms, batch_size, features.device)}


def main(argv: list[str] | None = None) -> int:
    """Time the full-width random-weight MaskGIT VQGAN encoder (logs JSON lines; no records written)."""
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokenizers", description=main.__doc__)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--channels-last", choices=["off", "on", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.backends.cudnn.benchmark = True
    modes = {"off": [False], "on": [True], "both": [False, True]}
    for compiled in modes[args.compile]:
        for channels_last in modes[args.channels_last]:
            tok = random_maskgit_tokenizer(full_width_maskgit_config(), args.device, DTYPES[args.dtype], compiled,
                                           channels_last)
            result = time_vqgan_encode(tok, args.batch_size, warmup=args.warmup * (3 if compiled else 1),
                                       steps=args.steps)
            log.info(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
