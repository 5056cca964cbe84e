"""Sorcen's echo contrast, the parts that are not modules (Sorcen supplement §A; the authors' `SorcenViT`).

The echo of an image is a second view conjured from the decoder: at every position one draw from the
code logits' top-k with their maximum removed (so the echo never simply repeats the prediction), kept
inside a jittered s×s square and [MASK] elsewhere. The EMA teacher encodes [CLS] + echo; its projection
is the positive of the student's prediction from the masked view (NNCLR-style InfoNCE, `lease.losses`).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def echo_support(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` largest logits after every entry equal to the row's maximum is removed.

    logits [..., V] → (values, ids), each [..., top_k], values in descending order.
    """
    peak = logits.amax(dim=-1, keepdim=True)
    return logits.masked_fill(logits == peak, float("-inf")).topk(top_k, dim=-1)


def sample_support(values: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One draw per row from softmax(`values`) over `ids` [..., k], by inverse CDF of `noise` [...] in [0, 1)."""
    cdf = values.float().softmax(dim=-1).cumsum(dim=-1)
    choice = (cdf < noise.unsqueeze(-1)).sum(dim=-1).clamp_max(ids.shape[-1] - 1)
    return ids.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def square_mask(grid: int, side: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """bool [B, grid²]: the s×s square with top-left corner (top_b, left_b) of each image's grid."""
    coords = torch.arange(grid, device=top.device)
    rows = (coords - top[:, None] >= 0) & (coords - top[:, None] < side)
    cols = (coords - left[:, None] >= 0) & (coords - left[:, None] < side)
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)


def ema_beta(epoch: float, base: float, horizon: float) -> float:
    """β = 1 − (1 − base)(cos(π · epoch / horizon) + 1) / 2: base at epoch 0, 1 at the horizon."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(epoch, horizon) / horizon) + 1.0) / 2.0


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's `x` [n, ...] concatenated in rank order, gradients flowing back to each rank's own
    rows; and the offset of this rank's rows (rank · n). Without a process group: (x, 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(dist_nn.all_gather(x), dim=0), dist.get_rank() * x.shape[0]
