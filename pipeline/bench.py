"""`lease bench tokenize`: GPU timings of the precompute, recorded as JSON under benchmarks/results/.

Everything is made on the machine, nothing is downloaded: random-weight tokenizers at the released sizes,
saved in their real checkpoint formats and read back through the real loaders (MAGE's MaskGIT VQGAN:
ch 128, 1024 codes; DINOv2 ViT-B/14 as an HF directory), a random K×D codebook, and synthetic JPEGs of
ImageNet-like sizes (sides drawn from `--min-side`..`--max-side`, smooth content so the files have
photo-like sizes). Timings do not depend on the weights.

Records:
- `tokenize-vqgan-encode-b<B>`: the VQGAN encoder alone on device-resident images (bf16, eager/compiled);
- `tokenize-dinov2-b<B>`: DINOv2 patch features of the configured layer alone;
- `tokenize-end-to-end`: manifest of the JPEG folder, then `pipeline.tokenize.tokenize` from files to
  shards (decode, both crops, VQGAN, DINOv2, nearest centroid, writing), after one untimed warm-up shard.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lease.bench import profile_table, results_dir, write_record
from lease.tokenizers.bench import (DTYPES, full_width_maskgit_config, random_maskgit_tokenizer,
                                    time_dinov2_features, time_vqgan_encode)

log = logging.getLogger(__name__)


def _write_jpeg(args: tuple[Path, int, int, int]) -> int:
    path, seed, min_side, max_side = args
    rng = np.random.default_rng(seed)
    w, h = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
    coarse = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    fine = rng.normal(0, 12, size=(h, w, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + fine, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path.stat().st_size


def synthetic_imagefolder(root: Path, num_images: int, num_classes: int, min_side: int, max_side: int,
                          workers: int) -> float:
    """Write `num_images` JPEGs into `root/<class>/`; returns the mean file size in KiB."""
    tasks = [(root / f"class{i % num_classes:03d}" / f"img{i:07d}.jpg", i, min_side, max_side)
             for i in range(num_images)]
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_write_jpeg, tasks, chunksize=64))
    return float(np.mean(sizes)) / 1024


def save_full_size_tokenizers(work: Path, codebook_size: int, seed: int = 0) -> dict[str, Path]:
    """Random-weight MaskGIT VQGAN (MAGE's sizes), HF DINOv2 ViT-B/14 and a K×768 codebook, saved."""
    from transformers import Dinov2Config, Dinov2Model

    from lease.tokenizers.tiny import save_tiny_maskgit_vqgan

    cfg = full_width_maskgit_config()
    vqgan = save_tiny_maskgit_vqgan(work / "vqgan_full_width.ckpt", seed, ch=cfg.ch, num_res_blocks=cfg.num_res_blocks,
                                    z_channels=cfg.z_channels, n_embed=cfg.n_embed)
    torch.manual_seed(seed)
    dino_cfg = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                            image_size=518)
    Dinov2Model(dino_cfg).save_pretrained(work / "dinov2_vitb14")
    codebook = work / "codebook.npy"
    np.save(codebook, np.random.default_rng(seed).normal(size=(codebook_size, dino_cfg.hidden_size))
            .astype(np.float32))
    return {"vqgan": vqgan, "dinov2": work / "dinov2_vitb14", "codebook": codebook}


def bench_components(assets: dict[str, Path], batch_size: int, dtype: str, steps: int, profile: bool) -> None:
    from lease.tokenizers.dinov2 import load_dinov2

    device = torch.device("cuda")
    for compiled in (False, True):
        tok = random_maskgit_tokenizer(full_width_maskgit_config(), device, DTYPES[dtype], compiled)
        result = time_vqgan_encode(tok, batch_size, warmup=30 if compiled else 10, steps=steps)
        name = f"tokenize-vqgan-encode-b{batch_size}-{dtype}-{'compile' if compiled else 'eager'}"
        write_record(name, {"results": result})
        if profile:
            images = torch.rand(batch_size, 3, tok.image_size, tok.image_size, device=device)
            (results_dir() / f"{name}.profile.txt").write_text(profile_table(lambda: tok.encode(images)))
        log.info("VQGAN encode %s: %.0f img/s", "compiled" if compiled else "eager", result["images_per_s"])
    dino = load_dinov2("hf", assets["dinov2"], device, dtype=DTYPES[dtype])
    result = time_dinov2_features(dino, 256, steps=steps)
    write_record(f"tokenize-dinov2-b256-{dtype}", {"results": result})
    log.info("DINOv2 features: %.0f img/s", result["images_per_s"])


def bench_end_to_end(assets: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    from pipeline.manifest import build_manifest
    from pipeline.tokenize import tokenize

    start = time.perf_counter()
    kib = synthetic_imagefolder(work / "images", args.num_images, 100, args.min_side, args.max_side, args.workers)
    log.info("wrote %d JPEGs (mean %.0f KiB) in %.1f s", args.num_images, kib, time.perf_counter() - start)
    start = time.perf_counter()
    manifest = build_manifest(work / "images", work / "manifest.parquet", num_workers=args.workers)
    manifest_s = time.perf_counter() - start
    common = dict(vqgan_kind="maskgit", vqgan_checkpoint=assets["vqgan"], dinov2_kind="hf",
                  dinov2_path=assets["dinov2"], splits=["train"], batch_size=args.batch_size,
                  num_workers=args.workers, images_per_shard=args.images_per_shard, dtype=args.dtype,
                  device="cuda", gpu_decode=args.gpu_decode, compile=args.compile)
    tokenize(work / "manifest.parquet", assets["codebook"], work / "warmup", max_shards=1, **common)
    summary = tokenize(work / "manifest.parquet", assets["codebook"], work / "tokens", **common)
    return {"num_images": args.num_images, "mean_jpeg_kib": round(kib, 1),
            "sides": [args.min_side, args.max_side], "manifest_seconds": round(manifest_s, 2),
            "manifest_images_per_s": round(manifest.num_images / manifest_s, 1),
            "tokenize_seconds": round(summary.seconds, 2), "images_per_s": round(summary.images_per_second, 1),
            "batch_size": args.batch_size, "workers": args.workers, "gpu_decode": args.gpu_decode,
            "dtype": args.dtype, "compile": args.compile, "codebook_size": args.codebook_size, "images_per_shard": args.images_per_shard}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lease bench tokenize", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["bench"], help=argparse.SUPPRESS)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--images-per-shard", type=int, default=5000)
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--gpu-decode", action="store_true", help="decode JPEGs with nvJPEG on the GPU")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--steps", type=int, default=30, help="timed calls of the component benchmarks")
    parser.add_argument("--skip-components", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also write the VQGAN encoder's kernel-time table")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("lease bench tokenize measures GPU throughput: no CUDA device found")
    torch.backends.cudnn.benchmark = True
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lease-bench-"))
    try:
        assets = save_full_size_tokenizers(work, args.codebook_size)
        if not args.skip_components:
            bench_components(assets, 128, args.dtype, args.steps, args.profile)
        if not args.skip_end_to_end:
            result = bench_end_to_end(assets, work, args)
            name = f"tokenize-end-to-end-{'gpudecode' if args.gpu_decode else 'cpudecode'}-compile_{args.compile}"
            write_record(name, {"results": result})
            log.info("end-to-end tokenize: %.0f img/s over %d JPEGs", result["images_per_s"], args.num_images)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0
