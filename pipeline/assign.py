"""Nearest-centroid assignment: the discriminative token of every patch.

The metric is the one k-means trains with, squared L2 on raw features:

    id(x) = argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x . c_k)

evaluated in row chunks so that the [N, K] distance matrix never exists at once. On CUDA the products
run in bf16 on tensor cores with fp32 outputs; the few best candidates of each row are then re-ranked
with exact fp32 distances, so the answer is the fp32 nearest centroid unless the true one falls outside
the bf16 shortlist (which needs a bf16 rounding error larger than the gap to the `shortlist`-th
candidate). On CPU the default is a plain fp32 pass.

Two tricks keep the low-precision pass accurate and cheap:
- Both sides are shifted by the centroid mean: distances do not change, but the products shrink, and
  with them the absolute rounding error of a bf16 dot product.
- The squared centroid norms ride inside the matmul as three extra input columns (a bf16 split
  hi + mid + lo of the fp32 norm, each times a column of ones), so one GEMM writes finished scores and
  no extra pass over the [chunk, K] matrix adds the bias.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lease.cli_help import first_paragraph, show_defaults
from lease.codebook import load_codebook
from lease.io import atomic_path

log = logging.getLogger(__name__)

MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHORTLIST = 3  # candidates re-ranked exactly after a bf16 pass
DEFAULT_SCORE_BYTES = 1 << 30  # working memory of one chunk (fp32 scores [chunk, K] and re-ranking)
NORM_SPLIT_COLUMNS = 3  # bf16 pieces of the fp32 squared norm (3 x 8 mantissa bits >= fp32's 24)
ALIGN = 8  # pad the GEMM inner dimension to a multiple of this (tensor-core friendly)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto`/None → cuda when present, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_matmul_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bf16 on CUDA (tensor cores, re-ranked exactly), fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in MATMUL_DTYPES:
        raise ValueError(f"matmul dtype {name!r} is not one of auto, {', '.join(MATMUL_DTYPES)}")
    return MATMUL_DTYPES[name]


def _split_bf16(values: torch.Tensor) -> torch.Tensor:
    """fp32 [K] → bf16 [K, 3] whose rows sum (in fp32) to the input within fp32 rounding."""
    parts, rest = [], values.float()
    for _ in range(NORM_SPLIT_COLUMNS):
        part = rest.to(torch.bfloat16)
        parts.append(part)
        rest = rest - part.float()
    return torch.stack(parts, dim=1)


class Assigner:
    """Centroids held on a device, ready for repeated nearest-centroid queries.

    Args:
        centroids: float [K, D] codebook (k-means centroids or an existing file such as DiGIT's).
        device: where queries run; defaults to the centroids' device.
        matmul_dtype: `auto` | `bf16` | `fp32` for the distance GEMM.
        shortlist: candidates per row re-ranked with exact fp32 distances; defaults to
            `DEFAULT_SHORTLIST` for bf16 and 1 (no re-ranking) for fp32.
        chunk: rows per GEMM; defaults to what fits `DEFAULT_SCORE_BYTES` of fp32 scores.
    """

    def __init__(self, centroids: torch.Tensor | np.ndarray, *, device: str | torch.device | None = None,
                 matmul_dtype: str = "auto", shortlist: int | None = None, chunk: int | None = None):
        centroids = torch.as_tensor(centroids)
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be [K, D] with K >= 1, got shape {tuple(centroids.shape)}")
        self.device = torch.device(device) if device is not None else centroids.device
        self.dtype = resolve_matmul_dtype(matmul_dtype, self.device)
        self.centroids = centroids.to(self.device, torch.float32).contiguous()
        k, d = self.centroids.shape
        self.shortlist = shortlist if shortlist is not None else (
            1 if self.dtype == torch.float32 else min(DEFAULT_SHORTLIST, k))
        if not 1 <= self.shortlist <= k:
            raise ValueError(f"shortlist={self.shortlist} must be in [1, K={k}]")
        # Per row of a chunk: K fp32 scores, `shortlist` candidate differences of D floats, the row itself.
        row_bytes = 4 * (k + (self.shortlist + 2) * d)
        self.chunk = chunk if chunk is not None else max(1, DEFAULT_SCORE_BYTES // row_bytes)
        if self.chunk < 1:
            raise ValueError(f"chunk={self.chunk} must be >= 1")
        self.mean = self.centroids.mean(dim=0)
        centred = self.centroids - self.mean
        self.sq_norms = centred.square().sum(dim=1)  # ||c - mean||^2, fp32 [K]
        if self.dtype == torch.float32:
            self.weight = centred.T.contiguous()  # [D, K]
        else:
            self.inner = -(-(d + NORM_SPLIT_COLUMNS) // ALIGN) * ALIGN
            weight = torch.zeros(k, self.inner, dtype=self.dtype, device=self.device)
            weight[:, :d] = (-2.0 * centred).to(self.dtype)  # exact: scaling by 2 keeps the bf16 mantissa
            weight[:, d:d + NORM_SPLIT_COLUMNS] = _split_bf16(self.sq_norms)
            self.weight = weight.T.contiguous()  # [inner, K]

    @property
    def num_centroids(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def _scores(self, centred: torch.Tensor) -> torch.Tensor:
        """||c||^2 - 2 x.c for a chunk of centred rows, fp32 [rows, K]."""
        if self.dtype == torch.float32:
            return torch.addmm(self.sq_norms, centred, self.weight, alpha=-2.0)
        rows, d = centred.shape
        lhs = torch.zeros(rows, self.inner, dtype=self.dtype, device=self.device)
        lhs[:, :d] = centred
        lhs[:, d:d + NORM_SPLIT_COLUMNS] = 1.0
        if lhs.is_cuda:
            return torch.mm(lhs, self.weight, out_dtype=torch.float32)
        return torch.mm(lhs, self.weight).float()  # CPU has no fp32-output bf16 GEMM; still a shortlist

    def _rerank(self, centred: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact fp32 distances to the `shortlist` best-scoring centroids; the nearest of them wins."""
        candidates = []
        for step in range(self.shortlist):
            best = scores.argmin(dim=1)
            candidates.append(best)
            if step + 1 < self.shortlist:
                scores.scatter_(1, best[:, None], float("inf"))
        candidates = torch.stack(candidates, dim=1)  # [rows, shortlist]
        # Direct differences, not the expanded form: no cancellation, and no TF32 in elementwise ops.
        diff = centred[:, None, :] - (self.centroids[candidates] - self.mean)
        dist = diff.square().sum(dim=-1)
        pick = dist.argmin(dim=1, keepdim=True)
        return candidates.gather(1, pick).squeeze(1), dist.gather(1, pick).squeeze(1)

    @torch.no_grad()
    def assign(self, features: torch.Tensor | np.ndarray, return_distances: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid id (int64) of every row of `features` [..., D], on the features' device.

        With `return_distances`, also the squared L2 distance (fp32) to that centroid.
        """
        features = torch.as_tensor(features)
        if features.shape[-1] != self.dim:
            raise ValueError(f"features have D={features.shape[-1]} but the codebook has D={self.dim}: use "
                             "features of the same DINOv2 model and layer that trained the codebook")
        lead_shape, out_device = features.shape[:-1], features.device
        flat = features.reshape(-1, self.dim)
        n = flat.shape[0]
        ids = torch.empty(n, dtype=torch.int64, device=self.device)
        dists = torch.empty(n, dtype=torch.float32, device=self.device)
        for start in range(0, n, self.chunk):
            rows = flat[start:start + self.chunk].to(self.device, non_blocking=True).float() - self.mean
            scores = self._scores(rows)
            if self.shortlist == 1 and self.dtype == torch.float32:
                best, index = scores.min(dim=1)
                dist = (best + rows.square().sum(dim=1)).clamp_min_(0.0)
            else:
                index, dist = self._rerank(rows, scores)
            ids[start:start + len(rows)] = index
            dists[start:start + len(rows)] = dist
        ids = ids.reshape(lead_shape).to(out_device)
        if return_distances:
            return ids, dists.reshape(lead_shape).to(out_device)
        return ids

    __call__ = assign


def nearest_centroid(features: torch.Tensor | np.ndarray, centroids: torch.Tensor | np.ndarray,
                     chunk: int | None = None, matmul_dtype: str = "auto",
                     shortlist: int | None = None) -> torch.Tensor:
    """Nearest-centroid ids int64 [...] of `features` [..., D] against `centroids` [K, D] (squared L2).

    Runs on the features' device; for repeated calls keep an `Assigner` instead.
    """
    features = torch.as_tensor(features)
    assigner = Assigner(centroids, device=features.device, matmul_dtype=matmul_dtype, shortlist=shortlist,
                        chunk=chunk)
    return assigner.assign(features)


# --------------------------------------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    features = np.load(args.features, mmap_mode="r")
    if features.ndim < 2:
        raise SystemExit(f"{args.features}: expected features [..., D], got shape {features.shape}")
    assigner = Assigner(load_codebook(args.codebook), device=device, matmul_dtype=args.matmul_dtype)
    flat = features.reshape(-1, features.shape[-1])
    out = np.empty(flat.shape[0], dtype=np.uint16 if assigner.num_centroids <= 1 << 16 else np.int64)
    with tqdm(total=flat.shape[0], unit="vec", unit_scale=True, desc="assign", disable=None) as bar:
        for start in range(0, flat.shape[0], args.rows_per_read):
            block = torch.from_numpy(np.ascontiguousarray(flat[start:start + args.rows_per_read]))
            out[start:start + len(block)] = assigner.assign(block.to(device)).cpu().numpy()
            bar.update(len(block))
    with atomic_path(args.out) as tmp, tmp.open("wb") as fh:
        np.save(fh, out.reshape(features.shape[:-1]))
    log.info("wrote %s (%d ids, K=%d)", args.out, out.size, assigner.num_centroids)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.assign", description=first_paragraph(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="assign every row of a features .npy [..., D] to its nearest centroid")
    run.add_argument("--features", required=True, help="float .npy [..., D] (read memory-mapped)")
    run.add_argument("--codebook", required=True, help="centroids .npy float32 [K, D]")
    run.add_argument("--out", required=True, type=Path, help="output .npy of ids (uint16 when K <= 65536)")
    run.add_argument("--rows-per-read", type=int, default=1 << 20)
    run.add_argument("--device", default="auto")
    run.add_argument("--matmul-dtype", default="auto", choices=["auto", *MATMUL_DTYPES])
    return show_defaults(parser)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
