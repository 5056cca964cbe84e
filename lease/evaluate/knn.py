"""Weighted k-NN classification on frozen features (paper table 5; the DINO / InstDisc protocol).

Features are L2-normalised so that the dot product is the cosine similarity. Each query takes its k most
similar training features; neighbour j votes for its label with weight exp(s_j / T), and the classes are
ranked by their summed votes (top-1 / top-5). The whole computation stays on the device: queries go in
chunks, each chunk's similarity block [chunk, N_train] is reduced by `topk` at once, so memory is bounded
by `query_chunk × N_train` and the training matrix (kept in half precision on CUDA).
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lease.evaluate.features import load_features, resolve_device
from lease.io import atomic_write_json
from lease.typed_config import require

log = logging.getLogger(__name__)


@dataclass
class KnnConfig:
    k: int = 20
    temperature: float = 0.07
    query_chunk: int = 1024  # queries per similarity block: memory ≈ query_chunk × N_train × 2 bytes
    matmul_dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    num_classes: int = 0  # 0: max label + 1

    def __post_init__(self) -> None:
        require(self.k > 0, "k", "must be > 0")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.query_chunk > 0, "query_chunk", "must be > 0")
        require(self.num_classes >= 0, "num_classes", "must be >= 0 (0 = from the labels)")


def _matmul_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # fp16 keeps 10 mantissa bits: cosine similarities in [-1, 1] are resolved to ~1e-3 at half the
        # memory and several times the matmul speed of fp32
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def check_labels(labels: torch.Tensor, name: str) -> None:
    if labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of class ids; got shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} contain negative ids (-1 = unknown label): evaluate a labelled split")


def num_classes_of(*labels: torch.Tensor, configured: int = 0) -> int:
    """Class count: `configured` when set (and large enough), else max label + 1."""
    seen = max(int(lab.max()) for lab in labels if lab.numel()) + 1
    if configured and configured < seen:
        raise ValueError(f"num_classes={configured} but the labels go up to {seen - 1}")
    return configured or seen


def normalized(features: torch.Tensor, device: torch.device, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """Row-normalised copy of `features` on `device` in `dtype`, built chunkwise (no fp32 copy of all rows)."""
    out = torch.empty(features.shape, dtype=dtype, device=device)
    for lo in range(0, features.shape[0], chunk):
        out[lo : lo + chunk] = F.normalize(features[lo : lo + chunk].to(device).float(), dim=1).to(dtype)
    return out


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, cfg: KnnConfig | None = None,
                 device: str | torch.device | None = None) -> dict:
    """Top-1 / top-5 accuracy (%) of the weighted k-NN classifier for `query_features`."""
    cfg = cfg or KnnConfig()
    device = resolve_device(device)
    check_labels(train_labels, "train labels")
    check_labels(query_labels, "query labels")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"train features have dim {train_features.shape[1]}, queries {query_features.shape[1]}")
    if train_features.shape[0] != train_labels.shape[0] or query_features.shape[0] != query_labels.shape[0]:
        raise ValueError("each feature row needs exactly one label")
    num_classes = num_classes_of(train_labels, query_labels, configured=cfg.num_classes)
    k = min(cfg.k, train_features.shape[0])
    top = min(5, num_classes)
    dtype = _matmul_dtype(cfg.matmul_dtype, device)

    start = time.perf_counter()
    bank = normalized(train_features, device, dtype, chunk=65536)
    bank_labels = train_labels.to(device).long()
    correct = torch.zeros(2, dtype=torch.long, device=device)  # top-1, top-5 hits, summed on the device
    n = query_features.shape[0]
    with tqdm(total=n, unit="img", desc="k-NN", leave=False, disable=None) as bar:
        for lo in range(0, n, cfg.query_chunk):
            queries = normalized(query_features[lo : lo + cfg.query_chunk], device, dtype, cfg.query_chunk)
            sims, idx = (queries @ bank.T).topk(k, dim=1)
            weights = (sims.float() / cfg.temperature).exp()
            votes = torch.zeros(queries.shape[0], num_classes, device=device)
            votes.scatter_add_(1, bank_labels[idx], weights)
            hits = votes.topk(top, dim=1).indices == query_labels[lo : lo + cfg.query_chunk].to(device).view(-1, 1)
            correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
            bar.update(queries.shape[0])
    top1, top5 = (100.0 * correct.double() / max(n, 1)).tolist()
    seconds = time.perf_counter() - start
    log.info("k-NN (k=%d, T=%g): top-1 %.2f %%, top-5 %.2f %% over %d queries vs %d train in %.1f s",
             k, cfg.temperature, top1, top5, n, train_features.shape[0], seconds)
    return {"top1": top1, "top5": top5, "k": k, "temperature": cfg.temperature, "num_train": int(train_features.shape[0]),
            "num_query": int(n), "num_classes": num_classes, "matmul_dtype": str(dtype).removeprefix("torch."),
            "seconds": round(seconds, 3)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lease.evaluate import add_config_arguments, add_config_flag, add_device_argument

    parser.add_argument("--train-features", type=Path, required=True, help="feature artifact dir of the train split")
    parser.add_argument("--val-features", type=Path, required=True, help="feature artifact dir of the val split")
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write")
    add_config_flag(parser, "--k", KnnConfig, "neighbours that vote for each query", int)
    add_config_flag(parser, "--temperature", KnnConfig, "temperature T of the votes' weights exp(similarity / T)", float)
    add_device_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lease.evaluate import config_from_args

    cfg = config_from_args(KnnConfig, args, k=args.k, temperature=args.temperature)
    train_x, train_y = load_features(args.train_features)
    val_x, val_y = load_features(args.val_features)
    result = knn_classify(train_x, train_y, val_x, val_y, cfg, args.device)
    atomic_write_json(args.out, {"protocol": "knn", **result})
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval knn", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
