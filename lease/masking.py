"""Variable-ratio masking with token dropping (paper §3.1; MAGE's scheme).

Per step one ratio r ~ TruncNormal(mode, std) on [min, max]; `num_masked = ceil(L r)`. Per image a
random permutation of the L positions: its first `num_dropped = ceil(L * min)` entries are dropped
(never enter the encoder) and its first `num_masked` entries are masked, so dropped ⊆ masked. The
encoder sees [CLS] + the L - num_dropped kept tokens, in grid order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lease.configs import MaskConfig


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _normal_icdf(p: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)


class MaskRatioSampler:
    """Inverse-CDF sampler of the truncated normal (same law as scipy.stats.truncnorm in MAGE).

    Draws on the CPU from its own generator: one scalar per step, so it costs nothing on the GPU and
    its state is part of the resumable RNG state.
    """

    def __init__(self, cfg: MaskConfig, seed: int = 0):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        lo = (cfg.ratio_min - cfg.ratio_mode) / cfg.ratio_std
        hi = (cfg.ratio_max - cfg.ratio_mode) / cfg.ratio_std
        self._cdf_lo, self._cdf_hi = _normal_cdf(torch.tensor(lo, dtype=torch.float64)), _normal_cdf(
            torch.tensor(hi, dtype=torch.float64))

    def sample(self, n: int = 1) -> torch.Tensor:
        u = torch.rand(n, generator=self.generator, dtype=torch.float64)
        p = self._cdf_lo + u * (self._cdf_hi - self._cdf_lo)
        r = self.cfg.ratio_mode + self.cfg.ratio_std * _normal_icdf(p)
        return r.clamp(self.cfg.ratio_min, self.cfg.ratio_max)

    def mean(self) -> float:
        """Analytic mean of the truncated normal (≈ 0.69 for the paper's defaults)."""
        c = self.cfg
        a = (c.ratio_min - c.ratio_mode) / c.ratio_std
        b = (c.ratio_max - c.ratio_mode) / c.ratio_std
        pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
        z = float(self._cdf_hi - self._cdf_lo)
        return c.ratio_mode + c.ratio_std * (pdf(a) - pdf(b)) / z


@dataclass
class EchoPlan:
    """One step's random choices for Sorcen's echo (`lease.sorcen`); tensors on the batch's device."""

    side: torch.Tensor  # long, 0-d: the square's side s, one per batch
    top: torch.Tensor  # long [B]: each image's square corner, row in [0, grid - s]
    left: torch.Tensor  # long [B]: and column
    noise: torch.Tensor  # float [B, L] in [0, 1): the categorical draw at each position (inverse CDF)
    from_truth: bool  # the echo from the ground-truth tokens instead of draws (the first epochs)


@dataclass
class MaskPlan:
    """One step's masking for a batch; all tensors live on the batch's device."""

    keep_idx: torch.Tensor  # long [B, L_keep]: kept positions (0-based, grid order)
    keep_masked: torch.Tensor  # bool [B, L_keep]: kept but masked ([MASK] id enters the encoder)
    masked: torch.Tensor  # bool [B, L]: positions scored by the reconstruction loss
    # long [B, M], grid order: the positions the decoder's last block computes (`decode_masked_only`):
    # every masked one, plus unmasked ones (not scored) up to a multiple of `decode_rows_multiple`
    decode_idx: torch.Tensor
    # long [B, U]: the kept-and-unmasked tokens as indices into `keep_idx` (the encoder's rows after
    # [CLS]), grid order; the contrast (eq. 4) scores only them. Padded with kept masked ones (not
    # scored) to a multiple of `decode_rows_multiple`, as `decode_idx` is
    contrast_idx: torch.Tensor
    echo: EchoPlan | None = None  # Sorcen only


def num_masked_tokens(seq_len: int, ratio: float) -> int:
    return int(math.ceil(seq_len * ratio))


def num_dropped_tokens(seq_len: int, cfg: MaskConfig) -> int:
    return int(math.ceil(seq_len * cfg.ratio_min))


def plan_from_permutation(perm: torch.Tensor, num_dropped: int, num_masked: int,
                          decode_rows_multiple: int = 1) -> MaskPlan:
    """Masks from a permutation per image: first `num_dropped` dropped, first `num_masked` masked."""
    rank = torch.empty_like(perm)
    rank.scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm))
    masked = rank < num_masked
    keep_idx = perm[:, num_dropped:].sort(dim=1).values
    keep_masked = masked.gather(1, keep_idx)
    decode_rows = _padded_rows(num_masked, decode_rows_multiple, perm.shape[1])
    contrast_rows = _padded_rows(perm.shape[1] - num_masked, decode_rows_multiple, keep_idx.shape[1])
    unmasked_first = keep_masked.to(torch.uint8).argsort(dim=1, stable=True)
    return MaskPlan(keep_idx=keep_idx, keep_masked=keep_masked, masked=masked,
                    decode_idx=perm[:, :decode_rows].sort(dim=1).values,
                    # contiguous at every width: a slice is not, the full width is, and under
                    # torch.compile that flip costs a recompile of the whole step
                    contrast_idx=unmasked_first[:, :contrast_rows].contiguous())


def _padded_rows(count: int, multiple: int, available: int) -> int:
    """`count` rounded up to a multiple of `multiple` (at least one multiple), at most `available`."""
    return min(available, max(1, -(-count // multiple)) * multiple)


def random_plan(batch: int, seq_len: int, num_dropped: int, num_masked: int,
                device: torch.device, generator: torch.Generator | None = None,
                decode_rows_multiple: int = 1) -> MaskPlan:
    """A fresh random permutation per image (argsort of uniform noise, on the device)."""
    noise = torch.rand(batch, seq_len, device=device, generator=generator)
    return plan_from_permutation(noise.argsort(dim=1), num_dropped, num_masked, decode_rows_multiple)


def random_echo_plan(batch: int, grid: int, side_min: int, side_max: int, device: torch.device,
                     generator: torch.Generator | None = None, from_truth: bool = False) -> EchoPlan:
    """Side s uniform in [side_min, side_max] once per batch, each image's corner uniform over the
    grid - s + 1 places per axis, one uniform per position for the draw; all on the device."""
    side = torch.randint(side_min, side_max + 1, (), device=device, generator=generator)
    corner = (torch.rand(2, batch, device=device, generator=generator) * (grid - side + 1)).long()
    noise = torch.rand(batch, grid * grid, device=device, generator=generator)
    return EchoPlan(side=side, top=corner[0], left=corner[1], noise=noise, from_truth=from_truth)
