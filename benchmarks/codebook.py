"""`lease bench kmeans` and `lease bench assign`: the discriminative codebook's two GPU kernels on
synthetic vectors (k-means training, nearest-centroid assignment), each written as a JSON record."""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import torch

from benchmarks.records import write_record
from pipeline.assign import DEFAULT_SHORTLIST, MATMUL_DTYPES, Assigner, resolve_device
from pipeline.kmeans import BACKENDS, train_kmeans

log = logging.getLogger(__name__)


def time_kmeans(n: int, d: int, k: int, iters: int, device: str | torch.device = "auto", backend: str = "auto",
                seed: int = 0) -> dict[str, Any]:
    """Train k-means on n synthetic vectors (a Gaussian mixture made on the device) and time it."""
    device = resolve_device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    modes = torch.randn(k, d, generator=gen, device=device)
    owners = torch.randint(0, k, (n,), generator=gen, device=device)
    features = modes[owners].add_(torch.randn(n, d, generator=gen, device=device))
    del modes, owners
    result = train_kmeans(features, k, iters, seed, backend=backend, device=device, progress=False)
    return {"n": n, "d": d, "k": k, "iters": iters, "device": str(device), "backend": result.backend,
            "seconds": result.seconds, "seconds_per_iteration": result.seconds / (iters + 1),
            "inertia_first": result.inertia[0], "inertia_last": result.inertia[-1],
            "final_inertia": result.final_inertia, "empty_reseeded": result.empty_reseeded}




def _exact_reference(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """float64 brute force (no TF32, no bf16): the ground truth the fast path is checked against."""
    x, c = features.double(), centroids.double()
    return (c.square().sum(1)[None, :] - 2.0 * x @ c.T).argmin(dim=1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_assign(n: int, d: int, k: int, device: str | torch.device = "auto", matmul_dtype: str = "auto",
                shortlist: int | None = None, repeats: int = 5, check_rows: int = 16384, seed: int = 0
                ) -> dict[str, Any]:
    """Median seconds of a nearest-centroid pass over n synthetic vectors against k centroids.

    Also reports the agreement of the fast path with a float64 brute force on `check_rows` rows.
    """
    device = resolve_device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    centroids = torch.randn(k, d, generator=gen, device=device)
    # Features near centroids (with noise comparable to the gaps) look like real k-means data.
    owners = torch.randint(0, k, (n,), generator=gen, device=device)
    features = centroids[owners] + 0.5 * torch.randn(n, d, generator=gen, device=device)
    assigner = Assigner(centroids, device=device, matmul_dtype=matmul_dtype, shortlist=shortlist)
    assigner.assign(features[: min(n, assigner.chunk)])  # warm-up: kernels, workspace
    times = []
    for _ in range(repeats):
        _synchronize(device)
        t0 = time.perf_counter()
        ids = assigner.assign(features)
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    rows = min(n, check_rows)
    agreement = (ids[:rows] == _exact_reference(features[:rows], centroids)).double().mean().item()
    seconds = statistics.median(times)
    return {"n": n, "d": d, "k": k, "device": str(device), "matmul_dtype": str(assigner.dtype).replace("torch.", ""),
            "shortlist": assigner.shortlist, "chunk": assigner.chunk, "seconds_median": seconds,
            "seconds_all": times, "vectors_per_second": n / seconds, "agreement_with_fp64": agreement}


def run_kmeans(args: argparse.Namespace) -> int:
    result = time_kmeans(args.n, args.d, args.k, args.iters, args.device, args.backend)
    log.info("k-means N=%d D=%d K=%d x%d iterations: %.1f s (%s)", args.n, args.d, args.k, args.iters,
             result["seconds"], result["backend"])
    write_record(args.record, result)
    return 0


def run_assign(args: argparse.Namespace) -> int:
    result = time_assign(args.n, args.d, args.k, args.device, args.matmul_dtype, args.shortlist, args.repeats)
    log.info("assign n=%d d=%d k=%d: %.3f s median (%.0f vectors/s), agreement with fp64 %.5f",
             args.n, args.d, args.k, result["seconds_median"], result["vectors_per_second"],
             result["agreement_with_fp64"])
    write_record(args.record, result)
    return 0


def add_kmeans_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=4_000_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--record", default="kmeans", help="record name under benchmarks/results/")


def add_assign_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shortlist", type=int, default=None,
                        help=f"candidates re-ranked in fp32 (default {DEFAULT_SHORTLIST} for bf16, 1 for fp32)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--matmul-dtype", default="auto", choices=["auto", *MATMUL_DTYPES])
    parser.add_argument("--record", default="assign", help="record name under benchmarks/results/")
