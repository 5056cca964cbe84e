"""The discriminative codebook: k-means on DINOv2 patch features.

As in DiGIT, the codebook is plain k-means with squared L2 on raw (unnormalised) patch features; each
patch's discriminative token is then its nearest centroid under the same metric (`pipeline.assign`).
The paper's contrast targets (eq. 2-3) need, per centroid, its n most cosine-similar centroids: that
neighbour table is computed once here (`lease.codebook.neighbour_table`).

Backends (`backend="auto"` picks the first that applies):
- `faiss` on GPU, when the installed faiss build sees GPUs and the device is CUDA;
- `torch` on CUDA otherwise: Lloyd iterations whose assignment step is `pipeline.assign.Assigner`
  (bf16 tensor-core GEMM in chunks + exact fp32 re-ranking), whose update step sums features in fp32
  with `index_put_(accumulate=True)` (sort-based on CUDA, hence deterministic) and bincount;
- `faiss` on CPU (faiss-cpu is part of the base install).

Both follow Lloyd's algorithm from k distinct random training points (seeded). Empty clusters: faiss
splits a large cluster (its own rule); the torch backend re-seeds each empty centroid with one of the
points farthest from their assigned centroid (largest squared distance in that iteration), which is
where the objective gains most. `inertia[i]` is the sum of squared distances at iteration i's
assignment (faiss's `obj`); `sizes` and `final_inertia` come from one assignment pass with the final
centroids.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lease.cli_help import first_paragraph, show_defaults
from lease.codebook import load_codebook, neighbour_table
from lease.io import atomic_path, atomic_write_json, file_digest
from pipeline.assign import MATMUL_DTYPES, Assigner, resolve_device

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
FAISS_MIN_POINTS_PER_CENTROID = 39  # below this faiss (and k-means generally) gives noisy centroids


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [K, D]
    sizes: np.ndarray  # int64 [K]: training points per centroid under the final centroids
    inertia: list[float]  # sum of squared distances at each iteration's assignment step
    final_inertia: float  # the same sum under the final centroids
    empty_reseeded: int  # empty clusters re-seeded over all iterations
    backend: str  # "faiss-gpu", "faiss-cpu" or "torch-<device type>"
    seconds: float
    num_points: int


# ---------------------------------------------------------------------------------------- backends


def _import_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_gpu_count() -> int:
    """GPUs visible to the installed faiss build (0 for faiss-cpu, or when faiss is missing)."""
    faiss = _import_faiss()
    return faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "get_num_gpus") else 0


def choose_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a request: `faiss` or `torch` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"k-means backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "faiss" if faiss_gpu_count() > 0 else "torch"
    return "faiss" if _import_faiss() is not None else "torch"


def initial_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct training-point indices drawn with a CPU generator (the same on every device)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def _faiss_kmeans(features: np.ndarray, k: int, iters: int, seed: int, use_gpu: bool) -> KMeansResult:
    faiss = _import_faiss()
    if faiss is None:
        raise RuntimeError("faiss is not installed: `pip install faiss-cpu` (or faiss-gpu-cu12), or use backend=torch")
    t0 = time.perf_counter()
    x = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x.shape
    # Train on every point given (faiss would otherwise subsample to 256 per centroid).
    km = faiss.Kmeans(d, k, niter=iters, seed=seed, gpu=use_gpu, verbose=False,
                      max_points_per_centroid=math.ceil(n / k), min_points_per_centroid=1)
    km.train(x)
    dist, ids = km.index.search(x, 1)
    sizes = np.bincount(ids[:, 0], minlength=k).astype(np.int64)
    return KMeansResult(centroids=np.asarray(km.centroids, dtype=np.float32), sizes=sizes,
                        inertia=[float(v) for v in km.obj], final_inertia=float(dist.astype(np.float64).sum()),
                        empty_reseeded=int(sum(s["nsplit"] for s in km.iteration_stats)),
                        backend="faiss-gpu" if use_gpu else "faiss-cpu", seconds=time.perf_counter() - t0,
                        num_points=n)


def cluster_sums(features: torch.Tensor, ids: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster fp32 feature sums [K, D] and member counts [K] (the Lloyd update's numerators)."""
    sums = torch.zeros(k, features.shape[1], dtype=torch.float32, device=features.device)
    for start in range(0, features.shape[0], chunk):
        # index_put_ with accumulate is sort-based on CUDA: deterministic, unlike index_add_'s atomics.
        sums.index_put_((ids[start:start + chunk],), features[start:start + chunk].float(), accumulate=True)
    return sums, torch.bincount(ids, minlength=k)


def reseed_empty(centroids: torch.Tensor, counts: torch.Tensor, features: torch.Tensor,
                 sq_dists: torch.Tensor) -> int:
    """Move each empty centroid (in place) onto one of the points farthest from their centroid.

    Returns the number of centroids re-seeded.
    """
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel() == 0:
        return 0
    far = sq_dists.topk(empty.numel()).indices
    centroids[empty] = features[far].float()
    return empty.numel()


def _torch_kmeans(features: torch.Tensor, k: int, iters: int, seed: int, matmul_dtype: str,
                  chunk: int | None, progress: bool) -> KMeansResult:
    t0 = time.perf_counter()
    n = features.shape[0]
    centroids = features[initial_indices(n, k, seed).to(features.device)].float()
    inertia, reseeded = [], 0
    bar = tqdm(range(iters), desc="k-means", unit="iter", disable=None if progress else True)
    for _ in bar:
        assigner = Assigner(centroids, matmul_dtype=matmul_dtype, chunk=chunk)
        ids, sq_dists = assigner.assign(features, return_distances=True)
        inertia.append(sq_dists.double().sum().item())  # one sync per iteration
        sums, counts = cluster_sums(features, ids, k, assigner.chunk)
        centroids = sums / counts.clamp_min(1)[:, None].float()
        reseeded += reseed_empty(centroids, counts, features, sq_dists)
        bar.set_postfix(inertia=f"{inertia[-1]:.4g}", reseeded=reseeded)
    ids, sq_dists = Assigner(centroids, matmul_dtype=matmul_dtype, chunk=chunk).assign(features, return_distances=True)
    sizes = torch.bincount(ids, minlength=k)
    if features.is_cuda:
        torch.cuda.synchronize(features.device)
    return KMeansResult(centroids=centroids.cpu().numpy(), sizes=sizes.cpu().numpy().astype(np.int64),
                        inertia=inertia, final_inertia=sq_dists.double().sum().item(), empty_reseeded=reseeded,
                        backend=f"torch-{features.device.type}", seconds=time.perf_counter() - t0, num_points=n)


def train_kmeans(features: np.ndarray | torch.Tensor, k: int, iters: int, seed: int = 0, backend: str = "auto",
                 device: str | torch.device = "auto", matmul_dtype: str = "auto", chunk: int | None = None,
                 progress: bool = True) -> KMeansResult:
    """k-means (squared L2, Lloyd) of `features` [N, D] into `k` centroids; deterministic for a seed.

    `backend`: `auto` | `faiss` | `torch` (module docstring); `device`: `auto` | cpu | cuda[:i];
    `matmul_dtype`/`chunk` tune the torch backend's assignment step (`pipeline.assign.Assigner`).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    n, d = features.shape
    if not 2 <= k <= n:
        raise ValueError(f"k={k} needs 2 <= k <= N; only N={n} feature vectors were given: sample more images "
                         "(features.num_images) or lower kmeans.k")
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    if n < FAISS_MIN_POINTS_PER_CENTROID * k:
        log.warning("k-means with %.1f points per centroid (N=%d, K=%d): centroids will be noisy; "
                    "%d+ per centroid is advisable", n / k, n, k, FAISS_MIN_POINTS_PER_CENTROID)
    device = resolve_device(device)
    chosen = choose_backend(backend, device)
    if chosen == "faiss":
        use_gpu = device.type == "cuda" and faiss_gpu_count() > 0
        if device.type == "cuda" and not use_gpu:
            log.warning("faiss has no GPU support here: running faiss k-means on the CPU (backend=torch runs on "
                        "the GPU)")
        log.info("k-means: faiss (%s), N=%d D=%d K=%d, %d iterations", "GPU" if use_gpu else "CPU", n, d, k, iters)
        array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
        result = _faiss_kmeans(array, k, iters, seed, use_gpu)
    else:
        tensor = torch.as_tensor(features)
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            tensor = tensor.float()
        log.info("k-means: torch on %s, N=%d D=%d K=%d, %d iterations", device, n, d, k, iters)
        result = _torch_kmeans(tensor.to(device), k, iters, seed, matmul_dtype, chunk, progress)
    log.info("k-means done in %.1f s: inertia %.6g → %.6g, %d empty clusters re-seeded, %d empty at the end",
             result.seconds, result.inertia[0], result.final_inertia, result.empty_reseeded,
             int((result.sizes == 0).sum()))
    return result


# ----------------------------------------------------------------------------------------- outputs


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, array)


def write_codebook(out_dir: str | Path, centroids: np.ndarray, num_neighbours: int, summary: dict[str, Any],
                   sizes: np.ndarray | None = None, device: str | torch.device = "auto") -> dict[str, Any]:
    """Write `centroids.npy`, `neighbours.npz` (index/similarity [K, n+1]), `sizes.npy` and `kmeans.json`.

    Every file is written atomically; `kmeans.json` comes last and holds `summary` plus the shapes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = neighbour_table(torch.from_numpy(centroids).to(resolve_device(device)), num_neighbours)
    _save_npy(out_dir / "centroids.npy", np.ascontiguousarray(centroids, dtype=np.float32))
    with atomic_path(out_dir / "neighbours.npz") as tmp, tmp.open("wb") as fh:
        np.savez(fh, index=table.index.cpu().numpy().astype(np.int64),
                 similarity=table.similarity.cpu().numpy().astype(np.float32))
    if sizes is not None:
        _save_npy(out_dir / "sizes.npy", sizes.astype(np.int64))
    record = {"k": int(centroids.shape[0]), "d": int(centroids.shape[1]), "num_neighbours": num_neighbours,
              **summary}
    atomic_write_json(out_dir / "kmeans.json", record)
    return record


def write_kmeans_outputs(result: KMeansResult, out_dir: str | Path, num_neighbours: int, iters: int, seed: int,
                         device: str | torch.device = "auto") -> dict[str, Any]:
    """The codebook files of a trained k-means (see `write_codebook`); the time it took goes into the
    returned summary only, so that the same inputs write the same files."""
    summary = {"source": "trained", "n": result.num_points, "iters": iters, "seed": seed, "backend": result.backend,
               "inertia": result.inertia, "final_inertia": result.final_inertia,
               "empty_reseeded": result.empty_reseeded, "empty_final": int((result.sizes == 0).sum())}
    written = write_codebook(out_dir, result.centroids, num_neighbours, summary, result.sizes, device)
    return {**written, "seconds": round(result.seconds, 3)}


def use_existing_codebook(path: str | Path, out_dir: str | Path, num_neighbours: int,
                          features: np.ndarray | torch.Tensor | None = None,
                          device: str | torch.device = "auto") -> dict[str, Any]:
    """Adopt a codebook file (e.g. DiGIT's `km_16k.npy`) instead of training one.

    With `features`, also records the cluster sizes and inertia of those features under it.
    """
    centroids = load_codebook(path).numpy()
    summary: dict[str, Any] = {"source": str(path), "source_sha256": file_digest(path), "backend": "file"}
    sizes = None
    if features is not None:
        device = resolve_device(device)
        ids, sq_dists = Assigner(centroids, device=device).assign(torch.as_tensor(features).to(device),
                                                                  return_distances=True)
        sizes = torch.bincount(ids, minlength=centroids.shape[0]).cpu().numpy()
        summary.update(n=int(ids.numel()), final_inertia=sq_dists.double().sum().item(),
                       empty_final=int((sizes == 0).sum()))
    log.info("using the existing codebook %s (K=%d, D=%d)", path, *centroids.shape)
    return write_codebook(out_dir, centroids, num_neighbours, summary, sizes, device)


def load_feature_sample(path: str | Path, sample_size: int | None, seed: int) -> np.ndarray:
    """Feature vectors [N, D] from a .npy [..., D] (memory-mapped), a seeded random subset if N > sample_size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist: run the feature-sample stage first")
    array = np.load(path, mmap_mode="r")
    if array.ndim < 2:
        raise ValueError(f"features file {path} has shape {array.shape}; expected [..., D]")
    flat = array.reshape(-1, array.shape[-1])
    if sample_size is not None and flat.shape[0] > sample_size:
        rows = np.sort(np.random.default_rng(seed).choice(flat.shape[0], size=sample_size, replace=False))
        return np.ascontiguousarray(flat[rows])
    return np.array(flat)  # a writable in-memory copy (the memory map is read-only)


# ------------------------------------------------------------------------------------------- bench


# --------------------------------------------------------------------------------------------- CLI


def build_codebook(out_dir: str | Path, *, features: str | Path | None = None, codebook: str | Path | None = None,
                   k: int, iters: int, sample_size: int | None, num_neighbours: int, seed: int,
                   backend: str = "auto", device: str | torch.device = "auto", matmul_dtype: str = "auto"
                   ) -> dict[str, Any]:
    """The k-means stage: train on (a sample of) a features file, or adopt `codebook`; write `out_dir`.

    Returns the `kmeans.json` record.
    """
    sample = load_feature_sample(features, sample_size, seed) if features else None
    if codebook:
        return use_existing_codebook(codebook, out_dir, num_neighbours, sample, device)
    if sample is None:
        raise ValueError("give a features file (DINOv2 patch features .npy) to train on, or an existing codebook")
    result = train_kmeans(sample, k, iters, seed, backend, device, matmul_dtype)
    record = write_kmeans_outputs(result, out_dir, num_neighbours, iters, seed, device)
    log.info("wrote the codebook to %s", out_dir)
    return record


def _train(args: argparse.Namespace) -> int:
    if not args.features and not args.codebook:
        raise SystemExit("give --features (a .npy of DINOv2 patch features) to train, or --codebook to adopt one")
    build_codebook(args.out, features=args.features, codebook=args.codebook, k=args.k, iters=args.iters,
                   sample_size=args.sample_size, num_neighbours=args.num_neighbours, seed=args.seed,
                   backend=args.backend, device=args.device, matmul_dtype=args.matmul_dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lease kmeans", description=first_paragraph(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the codebook (or adopt --codebook) and write it to --out")
    train.add_argument("--features", help="DINOv2 patch features .npy [..., D] (float16/float32)")
    train.add_argument("--codebook", help="existing centroids .npy float32 [K, D] to use instead of training")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--sample-size", type=int, default=None, help="train on a random subset of this many vectors")
    train.add_argument("--num-neighbours", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--matmul-dtype", default="auto", choices=["auto", *MATMUL_DTYPES])
    train.add_argument("--k", type=int, default=16384)
    train.add_argument("--iters", type=int, default=20)
    train.add_argument("--backend", default="auto", choices=BACKENDS)
    train.add_argument("--device", default="auto")
    return show_defaults(parser)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return _train(args)


if __name__ == "__main__":
    sys.exit(main())
