"""Losses: masked-token reconstruction (eq. 1), LEASE's codebook contrast (eq. 4), Sorcen's echo InfoNCE
and uniformity term."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lease.sorcen import gather_with_grad


def reconstruction_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                        label_smoothing: float) -> torch.Tensor:
    """Eq. 1: label-smoothed cross-entropy over the code logits, averaged over masked positions.

    logits [B, n, V_gen], targets [B, n] code ids, masked [B, n] bool (n = L, or the decoded rows of
    `MaskPlan.decode_idx`). Computed in float32.
    """
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long(),
                                label_smoothing=label_smoothing, reduction="none")
    weight = masked.flatten().float()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def codebook_contrast_loss(features: torch.Tensor, codebook_unit: torch.Tensor, positives: torch.Tensor,
                           weights: torch.Tensor, tau: float, token_weight: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Eq. 4: −Σ_j w_j log softmax(z Cᵀ / τ)[p_j], averaged over the scored tokens.

    features [B, n, Dc] (projected, not yet normalised); codebook_unit [K, Dc] row-normalised centroids;
    positives [B, n, P] centroid ids (the token's own centroid first, then its neighbours); weights
    [B, n, P] summing to 1; token_weight [B, n] (1 for scored tokens, 0 otherwise) or None for all.
    All K centroids form the softmax; there are no batch negatives.

    Because Σ_j w_j = 1 the loss is logsumexp(z Cᵀ/τ) − Σ_j w_j (z Cᵀ/τ)[p_j]: no [tokens, K] soft target
    and no log-softmax matrix are materialised.
    """
    z = F.normalize(features.float(), dim=-1)
    logits = z @ codebook_unit.t() / tau
    positive_logits = logits.gather(-1, positives).float()
    per_token = torch.logsumexp(logits.float(), dim=-1) - (weights * positive_logits).sum(dim=-1)
    if token_weight is None:
        return per_token.mean()
    token_weight = token_weight.float()
    return (per_token * token_weight).sum() / token_weight.sum().clamp_min(1.0)


def info_nce_logits(queries: torch.Tensor, keys: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(q_i, k_j) / τ [n, N] and each query's positive j [n] for `info_nce_loss`."""
    keys_all, offset = gather_with_grad(F.normalize(keys.float(), dim=-1))
    logits = F.normalize(queries.float(), dim=-1) @ keys_all.t() / tau
    return logits, torch.arange(queries.shape[0], device=queries.device) + offset


def info_nce_loss(queries: torch.Tensor, keys: torch.Tensor, tau: float) -> torch.Tensor:
    """Sorcen's NNCLR-style InfoNCE: CE over cos(q_i, k_j) / τ, the positive of query i being key i.

    queries [n, D] (the teacher's projected echoes, no gradient), keys [n, D] (the student's predictions).
    Under DDP the keys of every rank form the negatives, gathered with their gradient, and the targets
    are offset by rank · n; the mean of the ranks' losses is then the loss on the concatenated batch.
    """
    return F.cross_entropy(*info_nce_logits(queries, keys, tau))


def uniformity_loss(pooled_unit: torch.Tensor) -> torch.Tensor:
    """Sorcen's uniformity term mean((ẑ ẑᵀ)²) over the L2-normalised pooled latents ẑ [n, D]: this rank's
    rows against every rank's (gathered with gradient), whose mean over ranks is the whole batch's."""
    everyone, _ = gather_with_grad(pooled_unit)
    return (pooled_unit @ everyone.t()).pow(2).mean()
