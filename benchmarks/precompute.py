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

`lease bench precompute` times the whole tokenization sub-flow instead: the stages of `pipeline.stages`
(manifest → features → k-means → vq-codes + tokenize (one fused pass) → pack) with a preset's settings
(default `in1k_vitb`), through `ArtifactStore` exactly as the flow runs them, on a synthetic train/ + val/
ImageFolder; nothing is warm before it starts (compilation included). Record `precompute-<preset>-<N>`:
seconds per stage, and the ImageNet-1K estimate, where stages that work per image (manifest, vq-codes,
tokenize, pack) scale with the image count and the others (features on a fixed sample, k-means) are
counted as measured.

`--workers N [M ...]` runs the partitioned stages' parts (the flow's own part builds) on a Dask cluster of
N GPU workers started for the run (dask-cuda's LocalCUDACluster, one worker per GPU; distributed's
LocalCluster on the CPU), one sub-flow per count on the same JPEGs: each count's stage seconds, the
cluster's start, the tokenization rate after compilation and, when 1 is among the counts, each stage's
speed-up over 1 worker. `--workers 0` (the default) runs the parts in this process, without Dask.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from benchmarks.timing import time_cuda
from benchmarks.train import profile_table
from benchmarks.records import results_dir, write_record
from benchmarks.tokenizers import (DINOV2_B14_SIZES, DTYPES, full_width_maskgit_config, random_maskgit_tokenizer,
                                    time_dinov2_features, time_vqgan_encode)
from lease.cli_help import first_paragraph, show_defaults

log = logging.getLogger(__name__)


def _write_jpeg(args: tuple[Path, int, int, int, float]) -> int:
    path, seed, min_side, max_side, noise = args
    if path.exists():  # a reused --work-dir: the same seed wrote the same file
        return path.stat().st_size
    rng = np.random.default_rng(seed)
    w, h = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
    coarse = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    fine = rng.normal(0, noise, size=(h, w, 3))  # grain: sets the bytes per pixel
    pixels = np.clip(np.asarray(img, dtype=np.float32) + fine, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path.stat().st_size


def synthetic_imagefolder(root: Path, num_images: int, num_classes: int, min_side: int, max_side: int,
                          workers: int, first_seed: int = 0, noise: float = 12.0) -> float:
    """Write `num_images` JPEGs into `root/<class>/`; returns the mean file size in KiB."""
    tasks = [(root / f"class{i % num_classes:04d}" / f"img{i:07d}.jpg", i, min_side, max_side, noise)
             for i in range(first_seed, first_seed + num_images)]
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_write_jpeg, tasks, chunksize=64))
    return float(np.mean(sizes)) / 1024


def save_full_size_tokenizers(work: Path, codebook_size: int, seed: int = 0) -> dict[str, Path]:
    """Random-weight MaskGIT VQGAN (MAGE's sizes), HF DINOv2 ViT-B/14 and a K×768 codebook, saved."""
    from lease.tokenizers.tiny import save_tiny_hf_dinov2, save_tiny_maskgit_vqgan

    cfg = full_width_maskgit_config()
    vqgan = save_tiny_maskgit_vqgan(work / "vqgan_full_width.ckpt", seed, ch=cfg.ch, num_res_blocks=cfg.num_res_blocks,
                                    z_channels=cfg.z_channels, n_embed=cfg.n_embed)
    dinov2 = save_tiny_hf_dinov2(work / "dinov2_vitb14", seed, image_size=518, **DINOV2_B14_SIZES)
    codebook = work / "codebook.npy"
    np.save(codebook, np.random.default_rng(seed).normal(size=(codebook_size, DINOV2_B14_SIZES["hidden_size"]))
            .astype(np.float32))
    return {"vqgan": vqgan, "dinov2": dinov2, "codebook": codebook}


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
            (results_dir() / f"{name}.profile.txt").write_text(profile_table(lambda: tok.encode(images)).text)
        log.info("VQGAN encode %s: %.0f img/s", "compiled" if compiled else "eager", result["images_per_s"])
    dino = load_dinov2("hf", assets["dinov2"], device, dtype=DTYPES[dtype])
    result = time_dinov2_features(dino, 256, steps=steps)
    write_record(f"tokenize-dinov2-b256-{dtype}", {"results": result})
    log.info("DINOv2 features: %.0f img/s", result["images_per_s"])


def bench_end_to_end(assets: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    from pipeline.manifest import build_manifest
    from pipeline.tokenize import tokenize

    start = time.perf_counter()
    kib = synthetic_imagefolder(work / "images", args.num_images, 100, args.min_side, args.max_side, args.cpu_workers,
                                noise=args.jpeg_noise)
    log.info("wrote %d JPEGs (mean %.0f KiB) in %.1f s", args.num_images, kib, time.perf_counter() - start)
    start = time.perf_counter()
    manifest = build_manifest(work / "images", work / "manifest.parquet", num_workers=args.cpu_workers)
    manifest_s = time.perf_counter() - start
    common = dict(vqgan_kind="maskgit", vqgan_checkpoint=assets["vqgan"], dinov2_kind="hf",
                  dinov2_path=assets["dinov2"], splits=["train"], batch_size=args.batch_size,
                  num_workers=args.cpu_workers, images_per_shard=args.images_per_shard, dtype=args.dtype,
                  device="cuda", gpu_decode=args.gpu_decode, compile=args.compile)
    tokenize(work / "manifest.parquet", assets["codebook"], work / "warmup", max_shards=1, **common)
    summary = tokenize(work / "manifest.parquet", assets["codebook"], work / "tokens", **common)
    return {"num_images": args.num_images, "mean_jpeg_kib": round(kib, 1),
            "sides": [args.min_side, args.max_side], "manifest_seconds": round(manifest_s, 2),
            "manifest_images_per_s": round(manifest.num_images / manifest_s, 1),
            "tokenize_seconds": round(summary.seconds, 2), "images_per_s": round(summary.images_per_second, 1),
            "batch_size": args.batch_size, "workers": args.cpu_workers, "gpu_decode": args.gpu_decode,
            "dtype": args.dtype, "compile": args.compile, "codebook_size": args.codebook_size,
            "images_per_shard": args.images_per_shard}


IMAGENET_1K_IMAGES = {"train": 1_281_167, "val": 50_000}
PER_IMAGE_STAGES = ("manifest", "vq-codes", "tokenize", "pack")  # the rest cost the same for any dataset size


def synthetic_split_imagefolder(root: Path, num_images: dict[str, int], num_classes: int, min_side: int,
                                max_side: int, workers: int, noise: float) -> float:
    """`root/train/<class>/` and `root/val/<class>/` JPEGs; returns the mean file size in KiB."""
    first, sizes = 0, []
    for split, count in num_images.items():
        sizes.append(synthetic_imagefolder(root / split, count, num_classes, min_side, max_side, workers, first,
                                           noise) * count)
        first += count
    return sum(sizes) / max(1, sum(num_images.values()))


def imagenet_estimate(stage_seconds: dict[str, float], fixed_seconds: dict[str, float], num_images: int,
                      feature_images: int, feature_sample: int) -> dict[str, float]:
    """Each stage's seconds at ImageNet-1K's size (train + val).

    Per-image stages scale linearly except their `fixed_seconds` (tokenize's compilation); the feature
    sample scales to its configured size when the synthetic train set was smaller than that.
    """
    scales = {name: sum(IMAGENET_1K_IMAGES.values()) / num_images for name in PER_IMAGE_STAGES}
    scales["features"] = min(feature_sample, IMAGENET_1K_IMAGES["train"]) / feature_images
    estimate = {}
    for name, sec in stage_seconds.items():
        fixed = fixed_seconds.get(name, 0.0)
        estimate[name] = round(fixed + (sec - fixed) * scales.get(name, 1.0), 1)
    return estimate


def time_decoding(locations: list[str], batch_size: int, workers: int) -> dict[str, float]:
    """Images/s of the tokenize loader alone (JPEG → both crops on the GPU, no networks), per decoder."""
    from lease.images import make_loader

    rates = {}
    for name, gpu_decode in (("CPU", False), ("nvJPEG", True)):
        loader = make_loader(locations, batch_size, workers, gpu_decode=gpu_decode)  # its default: both crops
        start = time.perf_counter()
        for _, *crops in loader:
            for crop in crops:
                crop.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        rates[name] = round(len(locations) / (time.perf_counter() - start), 1)
        log.info("loader alone, %s decode: %.0f img/s", name, rates[name])
    return rates


def time_fused_tokenizer(assets: dict[str, Path], batch_size: int, layer: int, steps: int = 20) -> float:
    """Images/s of the compiled VQGAN + DINOv2 + nearest centroid on device-resident uint8 batches."""
    from lease.tokenizers.dinov2 import DEFAULT_IMAGE_SIZE
    from pipeline.tokenize import load_fused_tokenizer

    device = torch.device("cuda")
    model = load_fused_tokenizer(vqgan_kind="maskgit", vqgan_checkpoint=assets["vqgan"], vqgan_config=None,
                                 dinov2_kind="hf", dinov2_path=assets["dinov2"], layer=layer,
                                 centroids=assets["codebook"], dino_size=DEFAULT_IMAGE_SIZE, dtype="bf16",
                                 device=device, compile="on", batch_size=batch_size)
    img_vq, img_dino = (torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8, device=device)
                        for s in model.crop_sizes)
    ms = statistics.median(time_cuda(lambda: model(img_vq, img_dino), warmup=3, steps=steps))  # warm-up compiles
    rate = batch_size / (ms / 1000)
    log.info("fused tokenizer alone (batch %d): %.0f img/s", batch_size, rate)
    return round(rate, 1)


def save_tiny_tokenizers(work: Path) -> dict[str, Path]:
    """The demo's tiny random tokenizers: a quick check of the precompute harness on any machine."""
    from lease.tokenizers.tiny import save_tiny_hf_dinov2, save_tiny_maskgit_vqgan

    return {"vqgan": save_tiny_maskgit_vqgan(work / "vqgan_tiny.ckpt"),
            "dinov2": save_tiny_hf_dinov2(work / "dinov2_tiny")}


@contextlib.contextmanager
def dask_cluster(workers: int, device: str) -> Iterator[tuple[Any, str, float]]:
    """A Dask cluster of `workers` worker processes on this machine, one thread each: dask-cuda's
    LocalCUDACluster on CUDA (each worker sees its own GPU), else distributed's LocalCluster. Workers are
    not daemonic, so a part can decode in DataLoader processes. Yields (client, cluster class, seconds it
    took to start with every worker up)."""
    import dask
    from distributed import Client, LocalCluster

    from flows.runners import worker_thread_settings  # the flow's: each worker its share of the cores

    start = time.perf_counter()
    with dask.config.set({"distributed.worker.daemon": False, **worker_thread_settings(workers)}):
        cluster = None
        if device == "cuda":
            try:
                from dask_cuda import LocalCUDACluster

                cluster = LocalCUDACluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
            except Exception as err:  # noqa: BLE001  (the record names the cluster that ran instead)
                log.warning("no LocalCUDACluster (%r): a LocalCluster of %d workers seeing every GPU", err, workers)
        if cluster is None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        with cluster, Client(cluster) as client:
            client.wait_for_workers(workers)
            client.run(importlib.import_module, "pipeline.stages")  # the workers' imports count as start-up
            client.run(importlib.import_module, "pipeline.tokenize")
            yield client, type(cluster).__name__, time.perf_counter() - start


def run_on(client: Any) -> Callable[[list], list]:
    """`run_in_process`'s part runner: every part a task of the cluster, gathered in order."""
    return lambda calls: client.gather([client.submit(call, pure=False) for call in calls])


def time_subflow(cfg: Any, workers: int, device: str) -> dict:
    """The tokenization sub-flow with its parts on `workers` Dask workers (0: in this process)."""
    from pipeline.stages import TOKENIZE_STAGES, run_in_process

    seconds, results, cluster = {}, {}, {"cluster": "none (this process)", "cluster_seconds": 0.0}
    with contextlib.ExitStack() as stack:
        options = {}
        if workers:
            client, name, started = stack.enter_context(dask_cluster(workers, device))
            cluster = {"cluster": name, "cluster_seconds": round(started, 2)}
            options = {"run_parts": run_on(client), "workers": workers}
            log.info("%s with %d workers up in %.1f s", name, workers, started)
        for outcome in run_in_process(cfg, TOKENIZE_STAGES, force=True, **options):
            seconds[outcome.name], results[outcome.name] = round(outcome.seconds, 2), outcome.result
            log.info("precompute stage %s (%d workers): %.1f s", outcome.name, workers, outcome.seconds)
    images = sum(results["tokenize"]["num_images"].values())
    first = results["tokenize"]["first_batch_seconds"]
    passes = seconds["vq-codes"] + seconds["tokenize"]
    return {"workers": workers, "stage_seconds": seconds, **cluster,
            "partitions": results["tokenize"]["partitions"], "fixed_seconds": {"tokenize": round(first, 2)},
            # the fused pass's rate once compiled: its images over its time without the first batch
            "tokenize_images_per_s_after_compile": round(images / max(passes - first, 1e-9), 1),
            "total_seconds": round(sum(seconds.values()), 1)}


def speedups(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Each run's stage seconds against those with 1 worker ({} when no run had 1 worker)."""
    one = next((run["stage_seconds"] for run in runs if run["workers"] == 1), None)
    if one is None:
        return {}
    return {str(run["workers"]): {name: round(one[name] / sec, 3) for name, sec in run["stage_seconds"].items()
                                  if sec > 0} for run in runs}


def bench_precompute(args: argparse.Namespace, work: Path) -> dict:
    from pipeline.config import load_pipeline_config

    assets = (save_full_size_tokenizers(work, args.codebook_size) if args.tokenizers == "full"
              else save_tiny_tokenizers(work))
    counts = {"train": args.num_images, "val": max(1, round(args.num_images * IMAGENET_1K_IMAGES["val"]
                                                            / IMAGENET_1K_IMAGES["train"]))}
    start = time.perf_counter()
    kib = synthetic_split_imagefolder(work / "images", counts, args.num_classes, args.min_side, args.max_side,
                                      args.cpu_workers, args.jpeg_noise)
    log.info("wrote %s JPEGs (mean %.0f KiB) in %.1f s", counts, kib, time.perf_counter() - start)

    def config(workers: int):
        return load_pipeline_config(args.preset, [
            f"data.source={work / 'images'}", f"artifacts={work / f'artifacts-{workers}'}", f"device={args.device}",
            f"tokenizers.vqgan.checkpoint={assets['vqgan']}", f"tokenizers.dinov2.path={assets['dinov2']}",
            f"kmeans.k={args.codebook_size}", *args.overrides])

    cfg = config(args.workers[0])
    parts = {}
    if args.time_parts:
        train = sorted(str(p) for p in (work / "images" / "train").rglob("*.jpg"))[: args.decode_images]
        parts = {"loader_images_per_s": time_decoding(train, args.batch_size, args.cpu_workers),
                 "fused_tokenizer_images_per_s": time_fused_tokenizer(assets, args.batch_size,
                                                                      cfg.tokenizers.dinov2.layer)}
    runs = [time_subflow(config(workers), workers, args.device) for workers in args.workers]
    first = runs[0]
    estimate = imagenet_estimate(first["stage_seconds"], first["fixed_seconds"], sum(counts.values()),
                                 min(cfg.features.num_images, counts["train"]), cfg.features.num_images)
    return {"preset": args.preset, "overrides": list(args.overrides), "tokenizers": args.tokenizers,
            "device": args.device, "num_images": counts,
            "mean_jpeg_kib": round(kib, 1), "sides": [args.min_side, args.max_side],
            **{key: first[key] for key in ("workers", "stage_seconds", "fixed_seconds", "total_seconds")},
            "runs": runs, "speedup_over_1_worker": speedups(runs),
            "imagenet_1k_stage_seconds": estimate,
            "imagenet_1k_minutes": round(sum(estimate.values()) / 60, 2), **parts}


def worker_counts(text: str) -> list[int]:
    """`--workers 1` or `--workers 1,2,4`: one sub-flow per count."""
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of worker counts") from None
    if any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"worker counts must be >= 0, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    command = "lease bench precompute" if argv and argv[0] == "precompute" else "lease bench tokenize"
    parser = argparse.ArgumentParser(prog=command, description=first_paragraph(__doc__))
    parser.add_argument("what", choices=["bench", "precompute"], help=argparse.SUPPRESS)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--jpeg-noise", type=float, default=12.0,
                        help="grain of the synthetic images (std, grey levels): 12 gives ~66 KiB files, "
                             "34 ~110 KiB like ImageNet's JPEGs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpu-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="processes writing the synthetic JPEGs (and decoding, for lease bench tokenize)")
    parser.add_argument("--workers", type=worker_counts, default=[0], metavar="N[,M...]",
                        help="precompute: Dask GPU workers for the partitioned stages, one sub-flow per count "
                             "(0: in this process, no Dask); with 1 among them, the speed-up over 1 worker")
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
    parser.add_argument("--preset", default="in1k_vitb", help="precompute: the pipeline preset whose settings run")
    parser.add_argument("--num-classes", type=int, default=1000, help="precompute: class folders")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="precompute: pipeline config overrides, e.g. tokenize.gpu_decode=true")
    parser.add_argument("--tokenizers", choices=["full", "tiny"], default="full",
                        help="precompute: released sizes (the measurement) or the demo's tiny ones (a harness check)")
    parser.add_argument("--device", default="cuda", help="precompute: cuda, or cpu with --tokenizers tiny")
    parser.add_argument("--time-parts", action="store_true",
                        help="precompute: first time the loader alone (CPU and nvJPEG decode) and the networks alone")
    parser.add_argument("--decode-images", type=int, default=30000, help="precompute: images per loader timing")
    parser.add_argument("--tag", default="", help="precompute: suffix of the record name")
    args = show_defaults(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.time_parts and args.tokenizers != "full":
        raise SystemExit("--time-parts times the released-size networks: use it with --tokenizers full")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{command} measures GPU throughput: no CUDA device found")
    torch.backends.cudnn.benchmark = True
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lease-bench-"))
    try:
        if args.what == "precompute":
            result = bench_precompute(args, work)
            suffix = ("-tiny" if args.tokenizers == "tiny" else "") + (f"-{args.tag}" if args.tag else "")
            if args.workers != [0]:
                suffix += "-workers" + "_".join(map(str, args.workers))
            write_record(f"precompute-{args.preset}-{args.num_images}{suffix}", {"results": result})
            log.info("precompute of %s images: %.1f s; ImageNet-1K estimate %.1f min", result["num_images"],
                     result["total_seconds"], result["imagenet_1k_minutes"])
            return 0
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
