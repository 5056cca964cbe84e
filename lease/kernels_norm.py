"""Dropout + residual add + LayerNorm in one Triton pass each way (`model.fused_kernels=on`).

A pre-norm block adds each branch to the residual stream and normalises the sum for the next branch:

    s = x + dropout_p(branch)          y = (s − μ) / √(σ² + ε) · γ + β

`torch.compile` already fuses the forward into one pass, but its backward reads s and ∂y twice: once
per row for ∂x, and again in column reductions for ∂γ = Σ_rows ∂y · x̂ and ∂β = Σ_rows ∂y. Here one
backward pass computes per row (x̂ = (s − μ) / σ̂, g = ∂y · γ)

    ∂s = ∂s_residual + (g − mean(g) − x̂ · mean(g · x̂)) / σ̂      ∂x = ∂s      ∂branch = ∂s · mask / (1 − p')

and accumulates ∂γ, ∂β in each program's registers over the rows it visits; a [programs, C] sum
finishes them. The dropout mask is `lease.dropout`'s bit-packed Philox mask (drop probability
p' = round(p·2¹⁶)/2¹⁶), read as one bit per element in both passes, so masks follow torch's CUDA
generator like every other dropout in the model.

s is stored in the residual stream's dtype (fp32 as the authors, or 16 bits with
`residual_dtype=autocast`) and normalised as stored; y comes out in the autocast dtype when autocast
is on, which is what the next linear casts the fp32 LayerNorm output to anyway.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lease.dropout import drop_threshold, fast_dropout_available, keep_bits, threshold_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Rows of [R, C] per program and loop step (C = 768 is padded to 1024 columns). At 2 rows and 4 warps
# the backward kernel takes 141 registers per thread for sm_90, so 3 programs fit an SM's 64K registers
# (at 4 rows it takes 254: 2 programs); tests/test_kernels_norm.py compiles both without spills.
ROWS_PER_PROGRAM = 2
BACKWARD_PROGRAMS_PER_SM = 3  # one wave of backward programs, each keeping its own ∂γ, ∂β partial sums


if triton is not None:
    @triton.jit
    def _keep(packed_ptr, idx, inside, keep_factor):
        """The bit-packed mask at flat element indices `idx`, as 0 or 1/(1 − p')."""
        byte = tl.load(packed_ptr + (idx >> 3), mask=inside, other=0).to(tl.int32)
        return ((byte >> (idx & 7).to(tl.int32)) & 1).to(tl.float32) * keep_factor

    @triton.jit
    def _residual_norm_fwd_kernel(x_ptr, branch_ptr, packed_ptr, w_ptr, b_ptr, s_ptr, y_ptr, mean_ptr, rstd_ptr,
                                  R, C, keep_factor, eps, BM: tl.constexpr, BC: tl.constexpr,
                                  DROPOUT: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BC)
        inside = (rows[:, None] < R) & (cols[None, :] < C)
        idx = rows[:, None].to(tl.int64) * C + cols[None, :]
        branch = tl.load(branch_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        if DROPOUT:
            branch = branch * _keep(packed_ptr, idx, inside, keep_factor)
        s = (tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32) + branch).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + idx, s, mask=inside)
        s = s.to(tl.float32)  # normalised as stored (rounded to 16 bits first with residual_dtype=autocast)
        mean = tl.sum(s, axis=1) / C
        centred = tl.where(inside, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(mean_ptr + rows, mean, mask=rows < R)
        tl.store(rstd_ptr + rows, rstd, mask=rows < R)

    @triton.jit
    def _residual_norm_bwd_kernel(dy_ptr, ds_ptr, s_ptr, mean_ptr, rstd_ptr, w_ptr, packed_ptr, dx_ptr,
                                  dbranch_ptr, dw_ptr, db_ptr, R, C, keep_factor, BM: tl.constexpr,
                                  BC: tl.constexpr, HAS_DS: tl.constexpr, DROPOUT: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BC)
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        dw = tl.zeros([BC], dtype=tl.float32)
        db = tl.zeros([BC], dtype=tl.float32)
        for start in range(pid * BM, R, tl.num_programs(0) * BM):
            rows = start + tl.arange(0, BM)
            inside = (rows[:, None] < R) & (cols[None, :] < C)
            idx = rows[:, None].to(tl.int64) * C + cols[None, :]
            mean = tl.load(mean_ptr + rows, mask=rows < R, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rows < R, other=0.0)
            s = tl.load(s_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            xhat = tl.where(inside, (s - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(dy_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            g = dy * w[None, :]
            mean_g = tl.sum(g, axis=1) / C
            mean_gx = tl.sum(g * xhat, axis=1) / C
            ds = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
            if HAS_DS:
                ds += tl.load(ds_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            tl.store(dx_ptr + idx, ds.to(dx_ptr.dtype.element_ty), mask=inside)
            if DROPOUT:
                ds = ds * _keep(packed_ptr, idx, inside, keep_factor)
            tl.store(dbranch_ptr + idx, ds.to(dbranch_ptr.dtype.element_ty), mask=inside)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(dw_ptr + pid * C + cols, dw, mask=cols < C)
        tl.store(db_ptr + pid * C + cols, db, mask=cols < C)


def launch_forward(x, branch, packed, weight, bias, eps, threshold, s, y, mean, rstd, rows_per_program=None):
    """Run the forward kernel on [R, C] views (outputs preallocated; the tests call this directly)."""
    r, c = x.shape
    bm = rows_per_program or ROWS_PER_PROGRAM
    kernel = torch.library.wrap_triton(_residual_norm_fwd_kernel) if x.is_cuda else _residual_norm_fwd_kernel
    kernel[(triton.cdiv(r, bm),)](x, branch, packed, weight, bias, s, y, mean, rstd, r, c, threshold_scale(threshold),
                                  eps, BM=bm, BC=triton.next_power_of_2(c), DROPOUT=threshold > 0)


def launch_backward(dy, ds, s, mean, rstd, weight, packed, threshold, dx, dbranch, rows_per_program=None,
                    programs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backward kernel on [R, C] views; returns (∂γ, ∂β) summed over the programs' partials."""
    r, c = s.shape
    bm = rows_per_program or ROWS_PER_PROGRAM
    if programs is None:
        sms = torch.cuda.get_device_properties(s.device).multi_processor_count if s.is_cuda else 1
        programs = BACKWARD_PROGRAMS_PER_SM * sms
    grid = min(triton.cdiv(r, bm), programs)
    dw = torch.empty(grid, c, device=s.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    kernel = torch.library.wrap_triton(_residual_norm_bwd_kernel) if s.is_cuda else _residual_norm_bwd_kernel
    kernel[(grid,)](dy, dy if ds is None else ds, s, mean, rstd, weight, packed, dx, dbranch, dw, db, r, c,
                    threshold_scale(threshold), BM=bm, BC=triton.next_power_of_2(c), HAS_DS=ds is not None,
                    DROPOUT=threshold > 0)
    return dw.sum(0), db.sum(0)


if triton is not None:
    @torch.library.triton_op("lease::residual_layer_norm", mutates_args=())
    def residual_layer_norm(x: torch.Tensor, branch: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor, eps: float, threshold: int, s_dtype: torch.dtype,
                            y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, y, μ, 1/σ̂) for x, branch [R, C]: s = x + branch · mask / (1 − p') in `s_dtype`, y its LayerNorm."""
        r, c = x.shape
        s = torch.empty(r, c, device=x.device, dtype=s_dtype)
        y = torch.empty(r, c, device=x.device, dtype=y_dtype)
        mean = torch.empty(r, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        launch_forward(x, branch, packed, weight, bias, eps, threshold, s, y, mean, rstd)
        return s, y, mean, rstd

    @torch.library.triton_op("lease::residual_layer_norm_backward", mutates_args=())
    def residual_layer_norm_backward(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, mean: torch.Tensor,
                                     rstd: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, threshold: int,
                                     x_dtype: torch.dtype, branch_dtype: torch.dtype
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(∂x, ∂branch, ∂γ, ∂β) from ∂y and the residual path's ∂s (None: s is not read downstream)."""
        dx = torch.empty(s.shape, device=s.device, dtype=x_dtype)
        dbranch = torch.empty(s.shape, device=s.device, dtype=branch_dtype)
        dw, db = launch_backward(dy, ds, s, mean, rstd, weight, packed, threshold, dx, dbranch)
        return dx, dbranch, dw.to(weight.dtype), db.to(weight.dtype)

    def _setup(ctx, inputs, output):
        x, branch, packed, weight, _bias, _eps, threshold, _s_dtype, _y_dtype = inputs
        s, _y, mean, rstd = output
        ctx.save_for_backward(s, mean, rstd, weight, packed)
        ctx.threshold, ctx.x_dtype, ctx.branch_dtype = threshold, x.dtype, branch.dtype

    def _backward(ctx, ds, dy, _dmean, _drstd):
        s, mean, rstd, weight, packed = ctx.saved_tensors
        dx, dbranch, dw, db = residual_layer_norm_backward(
            dy.contiguous(), None if ds is None else ds.contiguous(), s, mean, rstd, weight, packed, ctx.threshold,
            ctx.x_dtype, ctx.branch_dtype)
        return dx, dbranch, None, dw, db, None, None, None, None

    residual_layer_norm.register_autograd(_backward, setup_context=_setup)


def fused_norm_available(x: torch.Tensor) -> bool:
    return fast_dropout_available(x)


def dropout_add_layer_norm(x: torch.Tensor, branch: torch.Tensor | None, norm: nn.LayerNorm, p: float,
                           residual_in_branch_dtype: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LayerNorm(s)) for s = x + dropout_p(branch), the sum in the branch's dtype when
    `residual_in_branch_dtype` (`residual_dtype=autocast`); with no branch (the first block) s = x.

    CUDA tensors only (`fused_norm_available`); the mask comes from `lease.dropout.keep_bits`.
    """
    if branch is None:
        return x, norm(x)
    shape, c = x.shape, x.shape[-1]
    s_dtype = branch.dtype if residual_in_branch_dtype else torch.promote_types(x.dtype, branch.dtype)
    y_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else s_dtype
    threshold = drop_threshold(p)
    packed = keep_bits(x.numel(), p, x.device) if threshold else torch.empty(0, dtype=torch.uint8, device=x.device)
    s, y, _, _ = residual_layer_norm(x.reshape(-1, c).contiguous(), branch.reshape(-1, c).contiguous(), packed,
                                     norm.weight, norm.bias, norm.eps, threshold, s_dtype, y_dtype)
    return s.view(shape), y.view(shape)

