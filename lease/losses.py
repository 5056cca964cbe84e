"""LEASE losses: masked-token reconstruction (eq. 1) and codebook contrast (eq. 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
