"""Frozen encoder features for the discriminative protocols (k-NN, linear probe, few-shot).

The paper evaluates mean-pooled encoder outputs of the full, unmasked token sequence ([CLS] excluded);
the [CLS] output is an option. `pool="mean_ln"` is the authors' probe feature (MAE's `global_pool`, their
linear-probe script): the mean of the patch tokens *before* the encoder's final norm, through a fresh
LayerNorm whose affine parameters stay at their initial 1 and 0 (MAE freezes all but the head). Extraction runs batched under `inference_mode` (bf16 autocast on CUDA)
and the result is cached as an artifact: `features.npy` (float32 [N, D]), `labels.npy` (int64 [N]) and
`features.json` (what produced them).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lease.io import atomic_path, atomic_write_json, file_digest

log = logging.getLogger(__name__)

DType = Literal["auto", "bf16", "fp16", "fp32"]
Pool = Literal["mean", "cls", "mean_ln"]
POOLS = ("mean", "cls", "mean_ln")
FEATURES_FILE, LABELS_FILE, RECORD_FILE = "features.npy", "labels.npy", "features.json"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` → the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_for(device: torch.device, dtype: DType) -> contextlib.AbstractContextManager:
    """Autocast context: `auto` is bf16 on CUDA and full precision elsewhere."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype not in ("bf16", "fp16"):
        raise ValueError(f"dtype must be one of auto, bf16, fp16, fp32; got {dtype!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def as_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids as int64. Stored ids are 16-bit (uint16 on disk, maybe an int16 view on the device)."""
    if tokens.dtype in (torch.uint16, torch.int16):
        return tokens.view(torch.int16).long() & 0xFFFF
    return tokens.long()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run `model` in eval mode (no dropout), restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def prenorm_patch_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Encoder outputs of the patch positions before the final norm, [B, L, D] (full, unmasked input)."""
    positions = torch.arange(tokens.shape[1] + 1, device=tokens.device).expand(tokens.shape[0], -1)
    x = model.embed(model.with_cls(tokens), positions)
    for block in model.blocks:
        x = block(x)
    return x[:, 1:]


def encoder_features(model: torch.nn.Module, tokens: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """Pooled features [B, D] of token ids [B, L]: `mean` / `cls` (`model.features`) or `mean_ln`."""
    if pool == "mean_ln":
        pooled = prenorm_patch_tokens(model, tokens).mean(dim=1)
        return F.layer_norm(pooled, pooled.shape[-1:], eps=model.cfg.ln_eps)  # unit affine: none applied
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    return model.features(tokens, pool=pool)


@torch.inference_mode()
def extract_features(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 256, pool: str = "mean",
                     device: str | torch.device | None = None, dtype: DType = "auto",
                     out_device: str | torch.device | None = None) -> torch.Tensor:
    """Encoder features float32 [N, D] of token sequences [N, L] (`model.features`, full unmasked input).

    `out_device` is where the result is gathered (default: `device`, so k-NN / probes can use it in place).
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, L]; got shape {tuple(tokens.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    device = resolve_device(device)
    out_device = device if out_device is None else torch.device(out_device)
    n = tokens.shape[0]
    out: torch.Tensor | None = None
    start = time.perf_counter()
    with eval_mode(model), tqdm(total=n, unit="img", desc=f"features ({pool})", leave=False, disable=None) as bar:
        for lo in range(0, n, batch_size):
            batch = as_ids(tokens[lo : lo + batch_size].to(device, non_blocking=True))
            with autocast_for(device, dtype):
                feats = encoder_features(model, batch, pool)
            if out is None:  # the width is only known after the first batch
                out = torch.empty(n, feats.shape[1], dtype=torch.float32, device=out_device)
            out[lo : lo + batch.shape[0]] = feats.float().to(out_device, non_blocking=True)
            bar.update(batch.shape[0])
    if out is None:
        raise ValueError("no token sequences to extract features from (empty split)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    log.info("extracted %s features of %d sequences in %.1f s (%.0f img/s)", pool, n, seconds,
             n / max(seconds, 1e-9))
    return out


def extract_token_set(model: torch.nn.Module, token_set, batch_size: int = 256, pool: str = "mean",
                      device: str | torch.device | None = None, dtype: DType = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of a `lease.data.TokenSet` (its generative codes `vq` are the model input)."""
    feats = extract_features(model, token_set.vq, batch_size, pool, device, dtype)
    return feats, token_set.labels.to(feats.device)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:  # np.save on a handle: no ".npy" appended
        np.save(fh, array)


def save_features(out_dir: str | Path, features: torch.Tensor, labels: torch.Tensor,
                  record: dict | None = None) -> Path:
    """Write the feature artifact (features.npy, labels.npy, features.json) atomically; returns `out_dir`."""
    out_dir = Path(out_dir)
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    _save_npy(out_dir / FEATURES_FILE, features.float().cpu().numpy())
    _save_npy(out_dir / LABELS_FILE, labels.long().cpu().numpy())
    atomic_write_json(out_dir / RECORD_FILE, {**(record or {}), "num": int(features.shape[0]),
                                              "dim": int(features.shape[1]),
                                              "features_sha256": file_digest(out_dir / FEATURES_FILE)})
    return out_dir


def load_features(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Read a feature artifact directory written by `save_features` → (features [N, D], labels [N])."""
    path = Path(path)
    missing = [name for name in (FEATURES_FILE, LABELS_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {', '.join(missing)}: run `lease eval features` for that split first")
    feats = torch.from_numpy(np.load(path / FEATURES_FILE)).to(device)
    labels = torch.from_numpy(np.load(path / LABELS_FILE)).to(device)
    return feats, labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lease.evaluate import add_device_argument

    parser.add_argument("--checkpoint", type=Path, required=True, help="a lease training checkpoint")
    parser.add_argument("--shards", required=True, help="packed split: directory of .tar shards or a glob")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    parser.add_argument("--pool", choices=list(POOLS), default="mean",
                        help="mean_ln: the authors' probe feature (LayerNorm of the pre-norm patch mean)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from lease.checkpoints import model_from_checkpoint
    from lease.data import read_token_set

    device = resolve_device(args.device)
    model = model_from_checkpoint(args.checkpoint, device)
    tokens = read_token_set(args.shards)
    feats, labels = extract_token_set(model, tokens, args.batch_size, args.pool, device, args.dtype)
    save_features(args.out, feats, labels, {"checkpoint": str(args.checkpoint), "shards": str(args.shards),
                                            "pool": args.pool, "dtype": args.dtype,
                                            "checkpoint_sha256": file_digest(args.checkpoint)})
    log.info("wrote %s (%d x %d)", args.out, *feats.shape)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval features", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
