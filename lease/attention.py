"""Flash attention with in-kernel Philox dropout, tiled for LEASE's short sequences (Triton).

LEASE attends over 129 tokens in the ViT-B encoder ([CLS] + 128 kept) and 257 in the decoder
([CLS] + 256 canvas slots), head dims 64 and 48: one token more than a multiple of 64, which a kernel
with 64- or 128-wide tiles pays for with a whole extra tile per axis. Here the bulk of each axis runs
in `block_m`/`block_n` tiles and the remainder in 16-wide tail tiles (`TAIL`): 129 → 128 + 16.

The math is FlashAttention-2 (online softmax forward; backward recomputes P from the saved
log-sum-exp, one kernel for dQ and one for dK, dV). Attention dropout drops P after the softmax,
as `F.scaled_dot_product_attention(dropout_p=p)` does: O = (P ∘ Z / (1 − p')) V with Z the keep mask.

The keep mask is a function of (seed, batch·head, query row, key column) only, not of the tiling:
one Philox-4x32-10 call with counter (stream = batch·head·Nq + row, key column // 8) gives eight
16-bit uniforms for eight neighbouring keys, with the drop probability quantised as in
`lease.dropout` (p' = round(p·2¹⁶)/2¹⁶). The forward pass draws it once and keeps it bit-packed
(Nq·Nk/8 bytes per head); both backward kernels read it back.

Measured against cuDNN at the ViT-B shapes (`lease bench train --attention-only`, H100, README):
faster only for the decoder without dropout; with the model's attention dropout cuDNN's kernels
stay ahead, so SDPA remains the default and this backend is opt-in (`model.attention_backend=triton`).

Known defect: on an H100, at the decoder shape with dropout, dK is wrong at a handful of elements that
change from run to run (`tests/test_attention.py`'s CUDA test fails); O, dQ and dV match the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lease.dropout import SEED_BOUND, keep_byte, drop_threshold, keep_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

TAIL = 16  # smallest tile tl.dot takes; the remainder of each sequence axis runs in tiles this wide
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Tiling:
    """Tile sizes and launch shape of the three kernels (`lease bench train --attention-only` times them)."""
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


TILING = Tiling()


def triton_attention_available(q: torch.Tensor) -> bool:
    return triton is not None and q.is_cuda


if triton is not None:
    @triton.jit
    def _keep_bytes(seed, streams, col_start, threshold, COLS: tl.constexpr):
        """Packed keep mask [ROWS, COLS / 8] for query streams `streams` [ROWS], key columns col_start + [0, COLS).

        Philox counter (stream, column // 8) gives 4 words = 8 uniforms of 16 bits; key 8g + j takes half
        j % 2 of word j // 2 and is bit j of byte g, the layout of `lease.dropout`.
        """
        groups = col_start // 8 + tl.arange(0, COLS // 8)
        c0 = (streams[:, None] + groups[None, :] * 0).to(tl.uint32)
        c1 = (groups[None, :] + streams[:, None] * 0).to(tl.uint32)
        zero = c0 * 0
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero)
        return keep_byte(w0, w1, w2, w3, threshold)

    @triton.jit
    def _unpack(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
        """bool [ROWS, COLS] from bytes [ROWS, COLS / 8]: column 8g + j is bit j of byte g."""
        bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :].to(tl.uint8)) & 1
        return tl.reshape(bits, (ROWS, COLS), can_reorder=False) != 0

    @triton.jit
    def _keep_from_bytes(MASK, streams, row_ok, cols, num_bytes):
        """bool [ROWS, COLS] read back from the packed mask a previous kernel wrote; layout as `_unpack`.

        Each byte is loaded once per column it decides (eight times, from L1), which puts the mask straight
        into the layout of the score tile: unpacking in registers takes a reshape through shared memory.
        """
        groups = cols // 8
        ptrs = MASK + streams[:, None] * num_bytes + groups[None, :]
        packed = tl.load(ptrs, mask=row_ok[:, None] & (groups < num_bytes)[None, :], other=0)
        return ((packed >> (cols % 8).to(tl.uint8)[None, :]) & 1) != 0

    @triton.jit
    def _load_rows(base, rows, n, stride, D: tl.constexpr, BLOCK_D: tl.constexpr):
        dims = tl.arange(0, BLOCK_D)
        return tl.load(base + rows[:, None] * stride + dims[None, :], mask=(rows < n)[:, None] & (dims < D)[None, :],
                       other=0.0)

    @triton.jit
    def _forward_tile(q, m, l, acc, k_base, v_base, skn, svn, start, Nk, streams, row_ok, seed, MASK, mask_bytes,
                      threshold, QK_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, Nk, skn, D, BLOCK_D)
        s = tl.where((cols < Nk)[None, :], tl.dot(q, tl.trans(k)) * QK_SCALE, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)  # the normaliser counts dropped entries too
        if DROPOUT:
            # Unpacked in registers: reading the bytes back from MASK here would need a barrier and could
            # still race with the loop's software pipelining.
            packed = _keep_bytes(seed, streams, start, threshold, BLOCK_N)
            groups = start // 8 + tl.arange(0, BLOCK_N // 8)
            tl.store(MASK + streams[:, None] * mask_bytes + groups[None, :], packed,
                     mask=row_ok[:, None] & (groups < mask_bytes)[None, :])
            p = tl.where(_unpack(packed, BLOCK_M, BLOCK_N), p, 0.0)
        v = _load_rows(v_base, cols, Nk, svn, D, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    @triton.jit
    def _attention_forward_kernel(Q, K, V, O, LSE, MASK, seed_ptr, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                                  sob, son, soh, H, Nq, Nk, mask_bytes, threshold, row_start,
                                  QK_SCALE: tl.constexpr, KEEP_SCALE: tl.constexpr, D: tl.constexpr,
                                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  TAIL_N: tl.constexpr, DROPOUT: tl.constexpr):
        """O and the log2-sum-exp for one query tile; with dropout also the packed keep mask."""
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rows = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        streams = bh * Nq + rows
        seed = tl.load(seed_ptr)
        q = _load_rows(Q + b * sqb + h * sqh, rows, Nq, sqn, D, BLOCK_D)
        k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bulk_end = (Nk // BLOCK_N) * BLOCK_N
        for start in range(0, bulk_end, BLOCK_N):
            m, l, acc = _forward_tile(q, m, l, acc, k_base, v_base, skn, svn, start, Nk, streams, row_ok, seed, MASK,
                                      mask_bytes, threshold, QK_SCALE, D, BLOCK_D, BLOCK_M, BLOCK_N, DROPOUT)
        for start in range(bulk_end, Nk, TAIL_N):
            m, l, acc = _forward_tile(q, m, l, acc, k_base, v_base, skn, svn, start, Nk, streams, row_ok, seed, MASK,
                                      mask_bytes, threshold, QK_SCALE, D, BLOCK_D, BLOCK_M, TAIL_N, DROPOUT)
        _store_rows(O + b * sob + h * soh, rows, Nq, son, acc * (KEEP_SCALE / l)[:, None], D, BLOCK_D)
        tl.store(LSE + streams, m + tl.log2(l), mask=row_ok)

    @triton.jit
    def _store_rows(base, rows, n, stride, values, D: tl.constexpr, BLOCK_D: tl.constexpr):
        dims = tl.arange(0, BLOCK_D)
        tl.store(base + rows[:, None] * stride + dims[None, :], values.to(base.dtype.element_ty),
                 mask=(rows < n)[:, None] & (dims < D)[None, :])

    @triton.jit
    def _dq_tile(q, do, lse, delta, dq, k_base, v_base, skn, svn, start, Nk, streams, row_ok, MASK, mask_bytes,
                 QK_SCALE: tl.constexpr, KEEP_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, Nk, skn, D, BLOCK_D)
        v = _load_rows(v_base, cols, Nk, svn, D, BLOCK_D)
        p = tl.where((cols < Nk)[None, :], tl.exp2(tl.dot(q, tl.trans(k)) * QK_SCALE - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            dp = tl.where(_keep_from_bytes(MASK, streams, row_ok, cols, mask_bytes), dp * KEEP_SCALE, 0.0)
        ds = p * (dp - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.jit
    def _attention_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, MASK, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                             sob, son, soh, sdob, sdon, sdoh, sdqb, sdqn, sdqh, H, Nq, Nk, mask_bytes, row_start,
                             QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr, KEEP_SCALE: tl.constexpr,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             TAIL_N: tl.constexpr, DROPOUT: tl.constexpr):
        """dQ for one query tile; also writes delta = rowsum(dO ∘ O), which the dK/dV kernel reads."""
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rows = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        streams = bh * Nq + rows
        q = _load_rows(Q + b * sqb + h * sqh, rows, Nq, sqn, D, BLOCK_D)
        do = _load_rows(DO + b * sdob + h * sdoh, rows, Nq, sdon, D, BLOCK_D)
        o = _load_rows(O + b * sob + h * soh, rows, Nq, son, D, BLOCK_D)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + streams, delta, mask=row_ok)
        lse = tl.load(LSE + streams, mask=row_ok, other=0.0)
        k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bulk_end = (Nk // BLOCK_N) * BLOCK_N
        for start in range(0, bulk_end, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, skn, svn, start, Nk, streams, row_ok, MASK,
                          mask_bytes, QK_SCALE, KEEP_SCALE, D, BLOCK_D, BLOCK_M, BLOCK_N, DROPOUT)
        for start in range(bulk_end, Nk, TAIL_N):
            dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, skn, svn, start, Nk, streams, row_ok, MASK,
                          mask_bytes, QK_SCALE, KEEP_SCALE, D, BLOCK_D, BLOCK_M, TAIL_N, DROPOUT)
        _store_rows(DQ + b * sdqb + h * sdqh, rows, Nq, sdqn, dq * SM_SCALE, D, BLOCK_D)

    @triton.jit
    def _dkdv_tile(k, v, dk, dv, q_base, do_base, sqn, sdon, LSE, DELTA, MASK, mask_bytes, bh, start, Nq, first,
                   QK_SCALE: tl.constexpr, KEEP_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        streams = bh * Nq + rows
        q = _load_rows(q_base, rows, Nq, sqn, D, BLOCK_D)
        do = _load_rows(do_base, rows, Nq, sdon, D, BLOCK_D)
        lse = tl.load(LSE + streams, mask=row_ok, other=float("inf"))  # padded query rows get P = 0
        delta = tl.load(DELTA + streams, mask=row_ok, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * QK_SCALE - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            keep = _keep_from_bytes(MASK, streams, row_ok, first + tl.arange(0, BLOCK_N), mask_bytes)
            p_kept = tl.where(keep, p * KEEP_SCALE, 0.0)
            dp = tl.where(keep, dp * KEEP_SCALE, 0.0)
        else:
            p_kept = p
        dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        return dk, dv

    @triton.jit
    def _attention_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, MASK, sqb, sqn, sqh, skb, skn, skh, svb, svn,
                               svh, sdob, sdon, sdoh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, H, Nq, Nk, mask_bytes,
                               col_start, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr,
                               KEEP_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr,
                               DROPOUT: tl.constexpr):
        """dK, dV for one key tile, looping over every query tile."""
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        first = col_start + tl.program_id(0) * BLOCK_N
        cols = first + tl.arange(0, BLOCK_N)
        k = _load_rows(K + b * skb + h * skh, cols, Nk, skn, D, BLOCK_D)
        v = _load_rows(V + b * svb + h * svh, cols, Nk, svn, D, BLOCK_D)
        q_base, do_base = Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        bulk_end = (Nq // BLOCK_M) * BLOCK_M
        for start in range(0, bulk_end, BLOCK_M):
            dk, dv = _dkdv_tile(k, v, dk, dv, q_base, do_base, sqn, sdon, LSE, DELTA, MASK, mask_bytes, bh, start,
                                Nq, first, QK_SCALE, KEEP_SCALE, D, BLOCK_D, BLOCK_M, BLOCK_N, DROPOUT)
        for start in range(bulk_end, Nq, TAIL_M):
            dk, dv = _dkdv_tile(k, v, dk, dv, q_base, do_base, sqn, sdon, LSE, DELTA, MASK, mask_bytes, bh, start,
                                Nq, first, QK_SCALE, KEEP_SCALE, D, BLOCK_D, TAIL_M, BLOCK_N, DROPOUT)
        _store_rows(DK + b * sdkb + h * sdkh, cols, Nk, sdkn, dk * SM_SCALE, D, BLOCK_D)
        _store_rows(DV + b * sdvb + h * sdvh, cols, Nk, sdvn, dv, D, BLOCK_D)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, N, H, D] view whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _split_launch(kernel, block_arg: str, n: int, block: int, batch_heads: int, *args, **meta) -> None:
    """Launch `kernel` over [0, n) of its grid axis: `block`-wide tiles for the bulk, then `TAIL`-wide ones.

    The kernel takes the axis start as its last positional argument and the tile width as `block_arg`."""
    bulk = n // block
    launch = torch.library.wrap_triton(kernel)
    tuning = {"num_warps": TILING.num_warps, "num_stages": TILING.num_stages}
    if bulk:
        launch[(bulk, batch_heads)](*args, 0, **meta, **tuning, **{block_arg: block})
    if n > bulk * block:
        launch[(triton.cdiv(n - bulk * block, TAIL), batch_heads)](*args, bulk * block, **meta, **tuning,
                                                                    **{block_arg: TAIL})


def _kernel_constants(head_dim: int, p: float) -> dict:
    """Compile-time constants shared by the kernels: fixed per model, so they cost no extra compiles.

    Scores are scaled by log2(e)/√D so the softmax can use exp2."""
    return {"QK_SCALE": LOG2E / math.sqrt(head_dim), "KEEP_SCALE": keep_scale(p), "D": head_dim,
            "BLOCK_D": max(triton.next_power_of_2(head_dim), 16), "DROPOUT": p > 0.0}


if triton is not None:
    @torch.library.triton_op("lease::attention_forward", mutates_args=())
    def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor,
                          p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """O [B, Nq, H, D] (contiguous), log2-sum-exp [B, H, Nq] and the packed keep mask [B, H, Nq, ⌈Nk/8⌉]
        (a single unused byte without dropout) for q [B, Nq, H, D] and k, v [B, Nk, H, D]."""
        b, nq, h, _ = q.shape
        nk = k.shape[1]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
        mask_bytes = -(-nk // 8)
        mask = torch.empty((b, h, nq, mask_bytes) if p > 0.0 else (1,), dtype=torch.uint8, device=q.device)
        consts = _kernel_constants(q.shape[-1], p)
        _split_launch(_attention_forward_kernel, "BLOCK_M", nq, TILING.block_m, b * h, q, k, v, out, lse, mask, seed,
                      *_strides(q), *_strides(k), *_strides(v), *_strides(out), h, nq, nk, mask_bytes,
                      drop_threshold(p), BLOCK_N=TILING.block_n, TAIL_N=TAIL, **consts)
        return out, lse, mask

    @torch.library.triton_op("lease::attention_backward", mutates_args=())
    def attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, mask: torch.Tensor,
                           p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dQ, dK, dV (contiguous) from dO [B, Nq, H, D] and what `attention_forward` returned."""
        b, nq, h, _ = q.shape
        nk = k.shape[1]
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        delta = torch.empty_like(lse)
        consts = {**_kernel_constants(q.shape[-1], p), "SM_SCALE": 1.0 / math.sqrt(q.shape[-1])}
        sizes = (h, nq, nk, -(-nk // 8))
        _split_launch(_attention_dq_kernel, "BLOCK_M", nq, TILING.block_m, b * h, q, k, v, out, grad, dq, lse,
                      delta, mask, *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad),
                      *_strides(dq), *sizes, BLOCK_N=TILING.block_n, TAIL_N=TAIL, **consts)
        _split_launch(_attention_dkdv_kernel, "BLOCK_N", nk, TILING.block_n, b * h, q, k, v, grad, dk, dv, lse,
                      delta, mask, *_strides(q), *_strides(k), *_strides(v), *_strides(grad), *_strides(dk),
                      *_strides(dv), *sizes, BLOCK_M=TILING.block_m, TAIL_M=TAIL, **consts)
        return dq, dk, dv

    def _setup_context(ctx, inputs, output) -> None:
        q, k, v, _, p = inputs
        out, lse, mask = output
        ctx.mark_non_differentiable(lse, mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.p = p

    def _backward(ctx, grad_out, _grad_lse, _grad_mask):
        dq, dk, dv = attention_backward(grad_out, *ctx.saved_tensors, ctx.p)
        return dq, dk, dv, None, None

    attention_forward.register_autograd(_backward, setup_context=_setup_context)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Softmax attention of q [B, Nq, H, D] over k, v [B, Nk, H, D] (views with a contiguous last dim).

    Returns [B, Nq, H, D], contiguous, so merging the heads is a free view. Each call with dropout
    draws a fresh Philox key from torch's CUDA generator.
    """
    seed = torch.randint(0, SEED_BOUND, (1,), device=q.device, dtype=torch.int64)
    return attention_forward(q, k, v, seed, dropout_p)[0]

