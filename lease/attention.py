"""Softmax attention with the [CLS] token's row and column taken out of the fused kernel.

LEASE attends over [CLS] + 128 kept tokens in the ViT-B encoder and [CLS] + 256 canvas slots in the
decoder: one token more than a multiple of 64. cuDNN's fused kernel tiles both axes in 64 or 128, so
that one token costs a whole extra tile per axis: on an H200 its forward + backward takes 0.85 ms at
129 tokens against 0.68 ms at 128, and 2.42 ms at 257 against 1.40 ms at 256 (batch 256, dropout 0.1;
`lease bench train --attention-only`). So the same attention is computed in three parts:

* the patch queries against the patch keys: cuDNN's kernel, which also returns each row's
  log-sum-exp ℓ_p of its scores;
* the [CLS] key's column for those queries: one score per row, s₀ = q·k₀/√d, merged with the
  kernel's output through ℓ_p (below);
* the [CLS] query's row: one softmax over N scores, linear in N.

Merging one extra key into a finished softmax (per query row; κ ∈ {0, 1/(1 − p)} is that key's
dropout keep factor, the kernel applies its own to the other keys):

    ℓ = logaddexp(ℓ_p, s₀),  α = exp(ℓ_p − ℓ),  β = exp(s₀ − ℓ),  O = α·O_p + β·κ·v₀

Backward. FlashAttention's backward (and cuDNN's) recomputes P = exp(S − ℓ) from the ℓ it is given
and reads O only through D = rowsum(dO ∘ O), in dS = P ∘ (dP − D). Given the whole row's ℓ and the
merged O, rather than its own, it therefore returns the gradient of the whole attention with respect
to the patch keys, exactly as a split-KV backward does; only the [CLS] key's column and the [CLS]
query's row are left, each one score per row (the softmax backward, dropout included):

    ∂L/∂s₀ = β·κ·(dO·v₀) − β·D,   dq += ∂L/∂s₀·k₀/√d,   dk₀ = Σ ∂L/∂s₀·q/√d,   dv₀ = Σ β·κ·dO

and the same for the [CLS] query's row over every key. Those parts are Triton kernels (one program
per head and block of rows or keys) that read the packed projection [B, N, 3·C] and write the merged
output as [B, M, C] and the gradient as one [B, N, 3·C] tensor, so the assembly of dq, dk and dv that
SDPA's path also pays is where the [CLS] terms are added. The [CLS] key's sums over query rows are
kept per block and added in a later kernel, so nothing is accumulated atomically.

Dropout keeps its meaning: every attention probability is dropped independently with probability p
and the kept ones scaled by 1/(1 − p); cuDNN draws the masks of the patch keys, torch's generator
those of the [CLS] column and row, which the backward reuses (one byte per row).

The model takes this path with `model.attention_backend=split_cls` (CUDA, 16 bits), and under "auto" in
training where it was measured faster (`split_cls_pays`). On the CPU the same code runs through
Triton's interpreter with PyTorch's CPU flash kernel, without dropout (tests).
"""
from __future__ import annotations

import torch

try:  # Triton ships with the CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

aten = torch.ops.aten
# Tile sizes, chosen by the registers each kernel compiles to for sm_90 (not yet by timing): these
# kernels are bound by memory traffic, so small tiles that keep 64-80 registers per thread (4 warps, no
# spills, about 7 programs per SM) beat 64-row tiles, which took 244-255 registers and spilled.
BLOCK_ROWS = 16  # query rows per program of the [CLS] column's kernels
BLOCK_KEYS = 16  # keys per program of the backward's keys pass
ROW_STEP = 32  # keys per step of the [CLS] query row's forward
NUM_WARPS = 4
# Where `attention_backend=auto` takes this path in training: cuDNN's key tile, and the fewest patch keys
# at which the split was measured faster than cuDNN on the whole sequence. On one H200 (batch 256,
# dropout 0.1, `lease bench train --attention-only`, benchmarks/results/attention-vit_base-b256.json):
# 2.37 against 2.97 ms at [CLS] + 256 keys, but 1.16 against 1.15 ms at [CLS] + 128.
CUDNN_KEY_TILE = 64
SPLIT_CLS_MIN_PATCH_KEYS = 256


def split_cls_supported(x: torch.Tensor) -> bool:
    """Whether the model routes these inputs here: cuDNN's kernel needs CUDA, 16 bits and sm80+."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def split_cls_pays(n_keys: int) -> bool:
    """Whether splitting [CLS] off saves more than its merge costs at `n_keys` keys ([CLS] included):
    only where [CLS] is the one key past a whole number of cuDNN's tiles, and only at the lengths where
    that was measured (above)."""
    patch_keys = n_keys - 1
    return patch_keys >= SPLIT_CLS_MIN_PATCH_KEYS and patch_keys % CUDNN_KEY_TILE == 0


def split_cls_self_attention(qkv: torch.Tensor, heads: int, dropout_p: float) -> torch.Tensor:
    """softmax(q kᵀ/√d) v with attention dropout over the packed projection qkv [B, N, 3·C] (q, k, v;
    head h at columns h·d of each; row 0 is [CLS]) → [B, N, C]. The same result as SDPA."""
    _check(qkv, dropout_p)
    return _SplitCls.apply(qkv.contiguous(), None, heads, dropout_p)


def split_cls_rows_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, dropout_p: float) -> torch.Tensor:
    """Queries q [B, M, C] (no [CLS] among them) over the packed keys and values kv [B, N, 2·C] whose
    row 0 is [CLS] → [B, M, C]."""
    _check(q, dropout_p)
    return _SplitCls.apply(q.contiguous(), kv.contiguous(), heads, dropout_p)


def _check(x: torch.Tensor, dropout_p: float) -> None:
    if triton is None:
        raise RuntimeError("split_cls attention needs Triton")
    if dropout_p != 0.0 and not x.is_cuda:
        raise ValueError("split_cls attention on the CPU takes no attention dropout (the CPU kernel has none)")


def _heads(t: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """[B, N, parts·C] → `parts` views [B, heads, N, C / heads]."""
    b, n, width = t.shape
    return t.view(b, n, parts, heads, width // parts // heads).permute(2, 0, 3, 1, 4).unbind(0)


def _qkv_views(xq: torch.Tensor, xkv: torch.Tensor, heads: int, self_attn: bool) -> tuple[torch.Tensor, ...]:
    if self_attn:
        return _heads(xq, 3, heads)
    return (*_heads(xq, 1, heads), *_heads(xkv, 2, heads))


def _keep_flags(shape: torch.Size, dropout_p: float, device: torch.device) -> torch.Tensor:
    """uint8 keep flags (1 with probability 1 − p) of the [CLS] column or row; empty without dropout."""
    if dropout_p == 0.0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return (torch.rand(shape, device=device) >= dropout_p).to(torch.uint8)


class _SplitCls(torch.autograd.Function):
    """cuDNN on the patch queries and keys, the Triton kernels below on the [CLS] column and row.
    `xkv` None: self-attention over the packed xq [B, N, 3·C]; else xq [B, M, C] and xkv [B, N, 2·C]."""

    @staticmethod
    def forward(ctx, xq, xkv, heads, dropout_p):
        self_attn = xkv is None
        xkv = xq if self_attn else xkv
        q, k, v = _qkv_views(xq, xkv, heads, self_attn)
        first, scale = int(self_attn), q.shape[-1] ** -0.5
        q_rest = q[:, :, first:]
        out_p, lse_p, kernel_lse, (saved, values) = _fused_forward(q_rest, k[:, :, 1:], v[:, :, 1:], dropout_p, scale)
        keep_col = _keep_flags(q_rest.shape[:3], dropout_p, q.device)
        keep_row = _keep_flags(k.shape[:3], dropout_p if self_attn else 0.0, q.device)
        out, lse, beta, lse_row = torch.ops.lease.split_cls_forward_merge(
            xq, xkv, out_p, lse_p, keep_col, keep_row, kernel_lse, heads, dropout_p, self_attn)
        ctx.save_for_backward(xq, xkv, out, lse, beta, keep_col, keep_row, lse_row, *saved)
        ctx.kernel_values, ctx.heads, ctx.dropout_p, ctx.self_attn = values, heads, dropout_p, self_attn
        return out

    @staticmethod
    def backward(ctx, grad):
        xq, xkv, out, lse, beta, keep_col, keep_row, lse_row, *saved = ctx.saved_tensors
        heads, self_attn, grad = ctx.heads, ctx.self_attn, grad.contiguous()
        q, k, v = _qkv_views(xq, xkv, heads, self_attn)
        first, scale = int(self_attn), q.shape[-1] ** -0.5
        (g,), (o,) = _heads(grad, 1, heads), _heads(out, 1, heads)
        # the kernel's backward with the whole row's ℓ and O: the patch keys' share, exactly
        dq_p, dk_p, dv_p = _fused_backward(g[:, :, first:], q[:, :, first:], k[:, :, 1:], v[:, :, 1:],
                                           o[:, :, first:], lse, (saved, ctx.kernel_values), ctx.dropout_p, scale)
        d_q, d_kv = torch.ops.lease.split_cls_backward_merge(
            grad, out, xq, xkv, dq_p, dk_p, dv_p, beta, keep_col, keep_row, lse_row, heads, ctx.dropout_p, self_attn)
        return (d_q, None, None, None) if self_attn else (d_q, d_kv, None, None)


def _fused_forward(q, k, v, dropout_p: float, scale: float):
    """The fused kernel with its log-sum-exp → (out [B, H, M, D], ℓ [B, H, M] view, the kernel's own ℓ tensor,
    state for `_fused_backward`: the tensors to save and the plain values)."""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, dropout_p, False, False, scale=scale)
        return out, lse.view(q.shape[:3]), lse, ((seed, offset), (cum_q, cum_k, max_q, max_k))
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse, lse, ((), ())


def _fused_backward(grad, q, k, v, out, lse, state: tuple, dropout_p: float, scale: float):
    saved, values = state
    if q.is_cuda:
        seed, offset = saved
        cum_q, cum_k, max_q, max_k = values
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, dropout_p, False, scale=scale)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, False,
                                                                     scale=scale)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit inputs (as the fused kernels accumulate), fp64 for fp64 (the tests' references)."""
    return torch.promote_types(t.dtype, torch.float32)


class _Geometry:
    """Sizes, strides and column offsets of one call, as the kernels take them."""

    def __init__(self, xq: torch.Tensor, xkv: torch.Tensor, heads: int, dropout_p: float, self_attn: bool):
        self.b, self.m, self.n = xq.shape[0], xq.shape[1], xkv.shape[1]
        self.c = xkv.shape[2] // (3 if self_attn else 2)
        self.d = self.c // heads
        self.first = int(self_attn)
        self.rows = self.m - self.first  # query rows in the fused kernel
        self.k_col, self.v_col = (self.c, 2 * self.c) if self_attn else (0, self.c)
        self.acc = _accumulation_dtype(xq)
        # compile-time constants of every kernel (the softmax scale and keep factor among them: as
        # run-time float arguments they may arrive as fp64 and promote the arithmetic)
        self.consts = dict(SCALE=self.d ** -0.5, KEEP=1.0 / (1.0 - dropout_p), D=self.d,
                           DP=max(16, triton.next_power_of_2(self.d)), DROPOUT=dropout_p > 0.0,
                           WIDE=self.acc == torch.float64)
        self.row_blocks = triton.cdiv(self.rows, BLOCK_ROWS)
        self.key_blocks = triton.cdiv(self.n, BLOCK_KEYS)


if triton is not None:
    @triton.jit
    def _wide(x, WIDE: tl.constexpr):
        """x in the accumulation dtype: fp64 for fp64 inputs, else fp32."""
        if WIDE:
            y = x.to(tl.float64)
        else:
            y = x.to(tl.float32)
        return y

    @triton.jit
    def _tile(base, rows, valid, stride, cols, dmask, WIDE: tl.constexpr):
        """[R, DP] rows of a row-major matrix (row stride `stride`), zero outside `valid` and the head dim."""
        x = tl.load(base + rows[:, None] * stride + cols[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        return _wide(x, WIDE)

    @triton.jit
    def _vector(base, cols, dmask, WIDE: tl.constexpr):
        return _wide(tl.load(base + cols, mask=dmask, other=0.0), WIDE)

    @triton.jit
    def _block(BLOCK: tl.constexpr, limit, H):
        """This program's head (bh = b·H + h, b, h) and its BLOCK rows or keys (offsets, which are < limit)."""
        bh = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        return bh, bh // H, bh % H, offs, offs < limit

    @triton.jit
    def _head_dims(DP: tl.constexpr, D: tl.constexpr):
        """Column offsets of one head, padded to DP, and which of them are real (< D)."""
        cols = tl.arange(0, DP)
        return cols, cols < D

    @triton.jit
    def _kept(prob, keep_ptr, offs, valid, KEEP: tl.constexpr, DROPOUT: tl.constexpr):
        """prob · κ with the saved keep flags (κ = 0 or KEEP = 1 / (1 − p)); prob itself without dropout."""
        if DROPOUT:
            keep = tl.load(keep_ptr + offs, mask=valid, other=0)
            prob = tl.where(keep != 0, prob * KEEP, 0.0)
        return prob

    @triton.jit
    def _split_cls_column_fwd_kernel(xq_ptr, xkv_ptr, op_ptr, lsep_ptr, keep_ptr, out_ptr, lse_ptr, beta_ptr,
                                     sxq_b, sxq_n, sxkv_b, sxkv_n, k_col, v_col, sop_b, sop_h, sop_m,
                                     slp_b, slp_h, slp_m, sl_b, sl_h, sl_m, so_b, so_n, H, R, first,
                                     SCALE: tl.constexpr, KEEP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                                     BM: tl.constexpr, DROPOUT: tl.constexpr, WIDE: tl.constexpr):
        """The [CLS] key's column merged into the fused kernel's output, for BM query rows of one head."""
        bh, b, h, rows, valid = _block(BM, R, H)
        cols, dmask = _head_dims(DP, D)
        q = _tile(xq_ptr + b * sxq_b + h * D, first + rows, valid, sxq_n, cols, dmask, WIDE)
        k0 = _vector(xkv_ptr + b * sxkv_b + k_col + h * D, cols, dmask, WIDE)
        v0 = _vector(xkv_ptr + b * sxkv_b + v_col + h * D, cols, dmask, WIDE)
        s0 = tl.sum(q * k0[None, :], 1) * SCALE
        lse_p = _wide(tl.load(lsep_ptr + b * slp_b + h * slp_h + rows * slp_m, mask=valid, other=0.0), WIDE)
        top = tl.maximum(lse_p, s0)
        lse = top + tl.log(tl.exp(lse_p - top) + tl.exp(s0 - top))
        beta = tl.exp(s0 - lse)
        kept = _kept(beta, keep_ptr, bh * R + rows, valid, KEEP, DROPOUT)
        o_p = _tile(op_ptr + b * sop_b + h * sop_h, rows, valid, sop_m, cols, dmask, WIDE)
        out = tl.exp(lse_p - lse)[:, None] * o_p + kept[:, None] * v0[None, :]
        tl.store(out_ptr + b * so_b + (first + rows)[:, None] * so_n + h * D + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & dmask[None, :])
        tl.store(lse_ptr + b * sl_b + h * sl_h + rows * sl_m, lse, mask=valid)
        tl.store(beta_ptr + bh * R + rows, beta, mask=valid)

    @triton.jit
    def _split_cls_row_fwd_kernel(x_ptr, keep_ptr, out_ptr, lse_row_ptr, sx_b, sx_n, k_col, v_col, so_b, H, N,
                                  SCALE: tl.constexpr, KEEP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                                  BN: tl.constexpr, DROPOUT: tl.constexpr, WIDE: tl.constexpr):
        """The [CLS] query's row of one head: an online softmax over the N keys in steps of BN."""
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        cols, dmask = _head_dims(DP, D)
        base = x_ptr + b * sx_b + h * D
        q0 = _vector(base, cols, dmask, WIDE)
        top = tl.full([1], float("-inf"), q0.dtype)
        total = tl.zeros([1], q0.dtype)
        acc = tl.zeros([DP], q0.dtype)
        for start in range(0, N, BN):
            keys = start + tl.arange(0, BN)
            valid = keys < N
            k = _tile(base + k_col, keys, valid, sx_n, cols, dmask, WIDE)
            s = tl.where(valid, tl.sum(k * q0[None, :], 1) * SCALE, float("-inf")).to(q0.dtype)
            new_top = tl.maximum(top, tl.max(s, 0))
            rescale = tl.exp(top - new_top)
            prob = tl.exp(s - new_top)
            total = total * rescale + tl.sum(prob, 0)
            prob = _kept(prob, keep_ptr, bh * N + keys, valid, KEEP, DROPOUT)
            v = _tile(base + v_col, keys, valid, sx_n, cols, dmask, WIDE)
            acc = acc * rescale + tl.sum(prob[:, None] * v, 0)
            top = new_top
        tl.store(out_ptr + b * so_b + h * D + cols, (acc / total).to(out_ptr.dtype.element_ty), mask=dmask)
        tl.store(lse_row_ptr + bh + tl.arange(0, 1), top + tl.log(total))

    @triton.jit
    def _split_cls_column_bwd_kernel(g_ptr, o_ptr, xq_ptr, xkv_ptr, dqp_ptr, beta_ptr, keep_ptr, dq_ptr, part_ptr,
                                     sg_b, sg_n, sxq_b, sxq_n, sxkv_b, k_col, v_col, sdqp_b, sdqp_h, sdqp_m,
                                     sdq_b, sdq_n, H, R, first, SCALE: tl.constexpr, KEEP: tl.constexpr,
                                     D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, DROPOUT: tl.constexpr,
                                     WIDE: tl.constexpr):
        """The [CLS] column's backward for BM query rows of one head: dq = fused dq + ∂L/∂s₀·k₀/√d, and
        this block's sums of ∂L/∂s₀·q/√d and β·κ·dO (the [CLS] key's dk and dv) into `part_ptr`. O and dO
        are both contiguous [B, M, C], so they share dO's strides."""
        bh, b, h, rows, valid = _block(BM, R, H)
        cols, dmask = _head_dims(DP, D)
        g = _tile(g_ptr + b * sg_b + h * D, first + rows, valid, sg_n, cols, dmask, WIDE)
        o = _tile(o_ptr + b * sg_b + h * D, first + rows, valid, sg_n, cols, dmask, WIDE)
        k0 = _vector(xkv_ptr + b * sxkv_b + k_col + h * D, cols, dmask, WIDE)
        v0 = _vector(xkv_ptr + b * sxkv_b + v_col + h * D, cols, dmask, WIDE)
        beta = tl.load(beta_ptr + bh * R + rows, mask=valid, other=0.0)
        kept = _kept(beta, keep_ptr, bh * R + rows, valid, KEEP, DROPOUT)
        ds0 = (kept * tl.sum(g * v0[None, :], 1) - beta * tl.sum(g * o, 1)) * SCALE
        dq = _tile(dqp_ptr + b * sdqp_b + h * sdqp_h, rows, valid, sdqp_m, cols, dmask, WIDE)
        dq += ds0[:, None] * k0[None, :]
        tl.store(dq_ptr + b * sdq_b + (first + rows)[:, None] * sdq_n + h * D + cols[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=valid[:, None] & dmask[None, :])
        q = _tile(xq_ptr + b * sxq_b + h * D, first + rows, valid, sxq_n, cols, dmask, WIDE)
        part = part_ptr + ((bh * tl.num_programs(0) + tl.program_id(0)) * 2) * DP + cols
        tl.store(part, tl.sum(ds0[:, None] * q, 0))
        tl.store(part + DP, tl.sum(kept[:, None] * g, 0))

    @triton.jit
    def _split_cls_keys_bwd_kernel(g_ptr, o_ptr, xq_ptr, xkv_ptr, dkp_ptr, dvp_ptr, keep_ptr, lse_row_ptr, part_ptr,
                                   dkv_ptr, qpart_ptr, sg_b, sxq_b, sxkv_b, sxkv_n, k_col, v_col, sdkp_b, sdkp_h,
                                   sdkp_n, sdvp_b, sdvp_h, sdvp_n, sdkv_b, sdkv_n, dk_col, dv_col, H, N, row_blocks,
                                   SCALE: tl.constexpr, KEEP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                                   BN: tl.constexpr, CLS_QUERY: tl.constexpr, DROPOUT: tl.constexpr,
                                   WIDE: tl.constexpr):
        """dk, dv of BN keys of one head into the packed gradient: the fused kernel's (keys ≥ 1), the [CLS]
        column's sums (key 0) and, for self-attention, the [CLS] query row's backward, whose dq share of
        these keys goes to `qpart_ptr`."""
        bh, b, h, keys, valid = _block(BN, N, H)
        patch = valid & (keys >= 1)
        cols, dmask = _head_dims(DP, D)
        dk = _tile(dkp_ptr + b * sdkp_b + h * sdkp_h, keys - 1, patch, sdkp_n, cols, dmask, WIDE)
        dv = _tile(dvp_ptr + b * sdvp_b + h * sdvp_h, keys - 1, patch, sdvp_n, cols, dmask, WIDE)
        if tl.program_id(0) == 0:  # the block that holds the [CLS] key (key 0)
            sum_k = tl.zeros([DP], dk.dtype)
            sum_v = tl.zeros([DP], dk.dtype)
            for block in range(0, row_blocks):
                part = part_ptr + ((bh * row_blocks + block) * 2) * DP + cols
                sum_k += tl.load(part)
                sum_v += tl.load(part + DP)
            is_cls = (keys == 0)[:, None]
            dk = tl.where(is_cls, dk + sum_k[None, :], dk)
            dv = tl.where(is_cls, dv + sum_v[None, :], dv)
        if CLS_QUERY:
            q0 = _vector(xq_ptr + b * sxq_b + h * D, cols, dmask, WIDE)
            g0 = _vector(g_ptr + b * sg_b + h * D, cols, dmask, WIDE)
            delta0 = tl.sum(g0 * _vector(o_ptr + b * sg_b + h * D, cols, dmask, WIDE), 0)
            lse_row = tl.load(lse_row_ptr + bh)
            k = _tile(xkv_ptr + b * sxkv_b + k_col + h * D, keys, valid, sxkv_n, cols, dmask, WIDE)
            v = _tile(xkv_ptr + b * sxkv_b + v_col + h * D, keys, valid, sxkv_n, cols, dmask, WIDE)
            prob = tl.where(valid, tl.exp(tl.sum(k * q0[None, :], 1) * SCALE - lse_row), 0.0)
            kept = _kept(prob, keep_ptr, bh * N + keys, valid, KEEP, DROPOUT)
            ds = (kept * tl.sum(v * g0[None, :], 1) - prob * delta0) * SCALE
            dk += ds[:, None] * q0[None, :]
            dv += kept[:, None] * g0[None, :]
            tl.store(qpart_ptr + (bh * tl.num_programs(0) + tl.program_id(0)) * DP + cols, tl.sum(ds[:, None] * k, 0))
        tile = dkv_ptr + b * sdkv_b + keys[:, None] * sdkv_n + h * D + cols[None, :]
        store = valid[:, None] & dmask[None, :]
        tl.store(tile + dk_col, dk.to(dkv_ptr.dtype.element_ty), mask=store)
        tl.store(tile + dv_col, dv.to(dkv_ptr.dtype.element_ty), mask=store)

    @triton.jit
    def _split_cls_query_grad_kernel(qpart_ptr, dq_ptr, sdq_b, H, key_blocks, D: tl.constexpr, DP: tl.constexpr):
        """dq of the [CLS] query (row 0) of one head: the sum of the key blocks' shares."""
        bh = tl.program_id(0)
        cols, dmask = _head_dims(DP, D)
        acc = tl.load(qpart_ptr + bh * key_blocks * DP + cols)
        for block in range(1, key_blocks):
            acc += tl.load(qpart_ptr + (bh * key_blocks + block) * DP + cols)
        tl.store(dq_ptr + (bh // H) * sdq_b + (bh % H) * D + cols, acc.to(dq_ptr.dtype.element_ty), mask=dmask)

    @torch.library.triton_op("lease::split_cls_forward_merge", mutates_args=())
    def split_cls_forward_merge(xq: torch.Tensor, xkv: torch.Tensor, out_p: torch.Tensor, lse_p: torch.Tensor,
                                keep_col: torch.Tensor, keep_row: torch.Tensor, lse_like: torch.Tensor, heads: int,
                                dropout_p: float, self_attn: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ (O [B, M, C], the whole rows' ℓ shaped as `lse_like`, β [B, H, R], the [CLS] row's ℓ [B, H] or empty)."""
        geo = _Geometry(xq, xkv, heads, dropout_p, self_attn)
        out = xq.new_empty(geo.b, geo.m, geo.c)
        lse = torch.empty_like(lse_like)
        beta = xq.new_empty(geo.b, heads, geo.rows, dtype=geo.acc)
        lse_row = xq.new_empty(geo.b, heads if self_attn else 0, dtype=geo.acc)
        torch.library.wrap_triton(_split_cls_column_fwd_kernel)[(geo.row_blocks, geo.b * heads)](
            xq, xkv, out_p, lse_p, keep_col, out, lse, beta, xq.stride(0), xq.stride(1), xkv.stride(0),
            xkv.stride(1), geo.k_col, geo.v_col, *out_p.stride()[:3], *lse_p.stride(),
            *lse.view(geo.b, heads, geo.rows).stride(), out.stride(0), out.stride(1), heads, geo.rows, geo.first,
            BM=BLOCK_ROWS, num_warps=NUM_WARPS, **geo.consts)
        if self_attn:
            torch.library.wrap_triton(_split_cls_row_fwd_kernel)[(geo.b * heads,)](
                xkv, keep_row, out, lse_row, xkv.stride(0), xkv.stride(1), geo.k_col, geo.v_col, out.stride(0),
                heads, geo.n, BN=ROW_STEP, num_warps=NUM_WARPS, **geo.consts)
        return out, lse, beta, lse_row

    @torch.library.triton_op("lease::split_cls_backward_merge", mutates_args=())
    def split_cls_backward_merge(grad: torch.Tensor, out: torch.Tensor, xq: torch.Tensor, xkv: torch.Tensor,
                                 dq_p: torch.Tensor, dk_p: torch.Tensor, dv_p: torch.Tensor, beta: torch.Tensor,
                                 keep_col: torch.Tensor, keep_row: torch.Tensor, lse_row: torch.Tensor, heads: int,
                                 dropout_p: float, self_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (d qkv [B, N, 3·C], empty) for self-attention, else (dq [B, M, C], d kv [B, N, 2·C])."""
        geo = _Geometry(xq, xkv, heads, dropout_p, self_attn)
        dq = torch.empty_like(xq)
        dkv = dq if self_attn else torch.empty_like(xkv)
        dk_col, dv_col = (geo.k_col, geo.v_col) if self_attn else (0, geo.c)
        bh, dp = geo.b * heads, geo.consts["DP"]
        parts = xq.new_empty(bh, geo.row_blocks, 2, dp, dtype=geo.acc)
        qparts = xq.new_empty(bh, geo.key_blocks if self_attn else 0, dp, dtype=geo.acc)
        torch.library.wrap_triton(_split_cls_column_bwd_kernel)[(geo.row_blocks, bh)](
            grad, out, xq, xkv, dq_p, beta, keep_col, dq, parts, grad.stride(0), grad.stride(1), xq.stride(0),
            xq.stride(1), xkv.stride(0), geo.k_col, geo.v_col, *dq_p.stride()[:3], dq.stride(0), dq.stride(1),
            heads, geo.rows, geo.first, BM=BLOCK_ROWS, num_warps=NUM_WARPS, **geo.consts)
        torch.library.wrap_triton(_split_cls_keys_bwd_kernel)[(geo.key_blocks, bh)](
            grad, out, xq, xkv, dk_p, dv_p, keep_row, lse_row, parts, dkv, qparts, grad.stride(0), xq.stride(0),
            xkv.stride(0), xkv.stride(1), geo.k_col, geo.v_col, *dk_p.stride()[:3], *dv_p.stride()[:3],
            dkv.stride(0), dkv.stride(1), dk_col, dv_col, heads, geo.n, geo.row_blocks, BN=BLOCK_KEYS,
            CLS_QUERY=self_attn, num_warps=NUM_WARPS, **geo.consts)
        if not self_attn:
            return dq, dkv
        torch.library.wrap_triton(_split_cls_query_grad_kernel)[(bh,)](
            qparts, dq, dq.stride(0), heads, geo.key_blocks, D=geo.d, DP=dp, num_warps=NUM_WARPS)
        return dq, dq.new_empty(0)
