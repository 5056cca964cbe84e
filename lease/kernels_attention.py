"""Attention with dropout in one Triton kernel per pass, for [CLS] + a multiple of the key block.

LEASE attends over [CLS] + 128 kept tokens in the ViT-B encoder and [CLS] + 256 canvas slots in the
decoder. Library kernels tile both axes in 64 or 128, so the one extra token costs a whole tile per
axis (cuDNN's forward + backward: 0.89 ms at 129 tokens against 0.54 ms at 128 on an H100; README,
"Training speed"). Here the key axis is cut into a 16-wide tile that holds the [CLS] key (key 0, the
other 15 columns masked to −∞) and the P = N − 1 keys after it in tiles of BLOCK_N; the query axis
likewise into a 16-row tile for the [CLS] query (self-attention) and tiles of BLOCK_M over the rest.
The two 16-wide tiles cost 16 / P of the work instead of a whole tile.

Softmax attention O = (P ∘ Z) V with P = softmax(q kᵀ / √d) (FlashAttention-2's online softmax, in
base 2) and dropout Z_ij ∈ {0, 1/(1 − p')}. Backward, with Δ_i = rowsum(dO_i ∘ O_i):

    dV = (P ∘ Z)ᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (Z ∘ dP − Δ),   dQ = dS K / √d,   dK = dSᵀ Q / √d

in two kernels: one per key tile (dK, dV, looping over the query tiles) and one per query tile (dQ,
looping over the key tiles), so nothing is accumulated atomically and the result is deterministic.

Dropout masks. Every (query row, key) pair has a mask slot: per head b·h and query i, the row
r = bh·M + i owns G = P/8 + 2 Philox-4x32-10 counters; counter r·G + g gives the 16-bit uniforms
of slots 8g .. 8g + 7 (slot 8g + t: half t % 2 of word t // 2, low half first). Slot j' < P is key
1 + j', slot P the [CLS] key. A pair is kept when its uniform is ≥ t = round(p·2¹⁶) (as
`lease.dropout`: drop probability p' = t / 2¹⁶). The forward and both backward kernels regenerate
the same bits from the Philox key, a 62-bit integer drawn from torch's CUDA generator per call, so
masks follow `torch.manual_seed` and the generator state a checkpoint saves.

The kernels read q, k and v straight out of the projection's [B, N, 3·C] output (head h at columns
h·d of each part) and write O as [B, M, C] and the gradient as one [B, N, 3·C] tensor, so no
transpose or stack is copied around them. `model.attention_backend=triton` takes this path.

Measured on an H200 at batch 256 with dropout 0.1 (`lease bench kernels`), forward + backward per
layer: 1.52 ms for the encoder and 5.54 ms for the decoder, against cuDNN's 1.14 and 2.96 ms. The
in-kernel masks take 39 % of the decoder's time, and the three interleaves that put a Philox call's
eight uniforms into the score tile's layout cost shared-memory round trips (benchmarks/README.md).
"""
from __future__ import annotations

import json
import os

import torch

from lease.dropout import SEED_BOUND, drop_threshold, threshold_scale

try:  # Triton ships with the CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

LOG2E = 1.4426950408889634
CLS_ROWS = 16  # rows / columns of the tile that holds the [CLS] query / key (the smallest tl.dot tile)
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, from the sweep of `lease bench kernels`;
# LEASE_ATTENTION_BLOCKS (JSON of the same form) overrides them, for that sweep's follow-up runs
DEFAULT_BLOCKS = {"fwd": (64, 64, 8, 2), "dkdv": (64, 64, 8, 2), "dq": (64, 64, 8, 2)}
DEFAULT_BLOCKS.update({k: tuple(v) for k, v in json.loads(os.environ.get("LEASE_ATTENTION_BLOCKS", "{}")).items()})


def attention_supported(q: torch.Tensor, num_keys: int, head_dim: int, block_n: int | None = None) -> bool:
    """Whether these inputs take the Triton kernels: CUDA, 16 bits, P = N − 1 a multiple of the key
    tile, and a head dim of at most 128."""
    bn = block_n or max(b[1] for b in DEFAULT_BLOCKS.values())
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and num_keys > 1 and (num_keys - 1) % bn == 0 and head_dim <= 128)


if triton is not None:
    CLS_TILE = tl.constexpr(CLS_ROWS)  # what the kernels see of CLS_ROWS

    @triton.jit
    def _keep(seed, rows, group0, G, threshold, BN: tl.constexpr):
        """bool [R, BN]: keep decisions of the mask rows `rows` [R] at slots 8·group0 .. 8·group0 + BN − 1."""
        groups = group0 + tl.arange(0, BN // 8)
        counter = rows[:, None] * G + groups[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, counter)
        lo0, hi0 = w0 & 0xFFFF, (w0 >> 16) & 0xFFFF
        lo1, hi1 = w1 & 0xFFFF, (w1 >> 16) & 0xFFFF
        lo2, hi2 = w2 & 0xFFFF, (w2 >> 16) & 0xFFFF
        lo3, hi3 = w3 & 0xFFFF, (w3 >> 16) & 0xFFFF
        # three interleaves put slot 8g + t at column 8g + t: bit 0 of t picks the half, bits 1-2 the word
        low = tl.interleave(tl.interleave(lo0, lo2), tl.interleave(lo1, lo3))
        high = tl.interleave(tl.interleave(hi0, hi2), tl.interleave(hi1, hi3))
        return tl.interleave(low, high) >= threshold

    @triton.jit
    def _load_rows(base, offs, valid, stride, offs_d, dmask):
        return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=valid[:, None] & dmask[None, :],
                       other=0.0)

    @triton.jit
    def _fwd_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, key0, key_limit, group0, rows, seed, G,
                   threshold, qk_scale, offs_d, dmask, DROPOUT: tl.constexpr, BN: tl.constexpr):
        """One key tile of the online softmax: scores, running max and sum, P̃ V into acc."""
        offs_n = key0 + tl.arange(0, BN)
        kvalid = offs_n < key_limit
        k = _load_rows(k_base, offs_n, kvalid, stride_kn, offs_d, dmask)
        v = _load_rows(v_base, offs_n, kvalid, stride_kn, offs_d, dmask)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(kvalid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, rows, group0, G, threshold, BN), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_tile(q_base, k_base, v_base, o_base, lse_base, stride_qn, stride_kn, stride_on, row0, row_limit,
                  bh, M, N, seed, threshold, keep_factor, qk_scale,
                  D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DROPOUT: tl.constexpr):
        P = N - 1
        G = P // 8 + 2
        offs_m = row0 + tl.arange(0, BM)
        mvalid = offs_m < row_limit
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        q = _load_rows(q_base, offs_m, mvalid, stride_qn, offs_d, dmask)
        rows = bh * M + offs_m
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DP], tl.float32)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, 0, 1, P // 8, rows, seed, G,
                                   threshold, qk_scale, offs_d, dmask, DROPOUT, CLS_TILE)
        for start in range(0, P, BN):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, 1 + start, N, start // 8, rows,
                                       seed, G, threshold, qk_scale, offs_d, dmask, DROPOUT, BN)
        out = acc * (keep_factor / l_i)[:, None]
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(o_base.dtype.element_ty),
                 mask=mvalid[:, None] & dmask[None, :])
        tl.store(lse_base + offs_m, m_i + tl.log2(l_i), mask=mvalid)

    @triton.jit
    def _attn_fwd_kernel(q_ptr, kv_ptr, o_ptr, lse_ptr, seed_ptr, q_col, k_col, v_col,
                         sq_b, sq_n, skv_b, skv_n, so_b, so_n, H, M, N, threshold, keep_factor, qk_scale,
                         D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         HAS_CLS: tl.constexpr, DROPOUT: tl.constexpr):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        q_base = q_ptr + b * sq_b + q_col + h * D
        k_base = kv_ptr + b * skv_b + k_col + h * D
        v_base = kv_ptr + b * skv_b + v_col + h * D
        o_base = o_ptr + b * so_b + h * D
        lse_base = lse_ptr + bh.to(tl.int64) * M
        seed = tl.load(seed_ptr)
        first = 1 if HAS_CLS else 0
        if HAS_CLS and pid == tl.cdiv(M - 1, BM):  # the last program: the [CLS] query's row
            _fwd_tile(q_base, k_base, v_base, o_base, lse_base, sq_n, skv_n, so_n, 0, 1, bh, M, N, seed, threshold,
                      keep_factor, qk_scale, D, DP, CLS_TILE, BN, DROPOUT)
        else:
            _fwd_tile(q_base, k_base, v_base, o_base, lse_base, sq_n, skv_n, so_n, first + pid * BM, M, bh, M, N,
                      seed, threshold, keep_factor, qk_scale, D, DP, BM, BN, DROPOUT)

    @triton.jit
    def _bwd_scores(q, k, do, v, lse, kvalid, rows, group0, seed, G, threshold, keep_factor, qk_scale, delta,
                    DROPOUT: tl.constexpr, BN: tl.constexpr):
        """P ∘ Z (for dV) and dS = P ∘ (Z ∘ dP − Δ) of one query tile against one key tile."""
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(kvalid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            keep = _keep(seed, rows, group0, G, threshold, BN)
            pz = tl.where(keep, p * keep_factor, 0.0)
            dpz = tl.where(keep, dp * keep_factor, 0.0)
        else:
            pz = p
            dpz = dp
        return pz, p * (dpz - delta[:, None])

    @triton.jit
    def _query_rows(q_base, o_base, do_base, lse_base, stride_qn, stride_on, stride_don, row0, row_limit, offs_d,
                    dmask, BM: tl.constexpr):
        """q, dO, log-sum-exp and Δ = rowsum(dO ∘ O) of one query tile (rows past the limit: zero, lse +∞)."""
        offs_m = row0 + tl.arange(0, BM)
        mvalid = offs_m < row_limit
        q = _load_rows(q_base, offs_m, mvalid, stride_qn, offs_d, dmask)
        do = _load_rows(do_base, offs_m, mvalid, stride_don, offs_d, dmask)
        o = _load_rows(o_base, offs_m, mvalid, stride_on, offs_d, dmask)
        lse = tl.load(lse_base + offs_m, mask=mvalid, other=float("inf"))
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        return offs_m, q, do, lse, delta

    @triton.jit
    def _dkdv_block(dk, dv, k, v, kvalid, group0, q_base, o_base, do_base, lse_base, stride_qn, stride_on,
                    stride_don, row0, row_limit, bh, M, seed, G, threshold, keep_factor, qk_scale, offs_d, dmask,
                    DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        offs_m, q, do, lse, delta = _query_rows(q_base, o_base, do_base, lse_base, stride_qn, stride_on, stride_don,
                                                row0, row_limit, offs_d, dmask, BM)
        pz, ds = _bwd_scores(q, k, do, v, lse, kvalid, bh * M + offs_m, group0, seed, G, threshold, keep_factor,
                             qk_scale, delta, DROPOUT, BN)
        dv += tl.dot(tl.trans(pz.to(do.dtype)), do)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        return dk, dv

    @triton.jit
    def _dkdv_tile(q_base, k_base, v_base, o_base, do_base, lse_base, dk_base, dv_base, stride_qn, stride_kn,
                   stride_on, stride_don, stride_dkn, key0, key_limit, group0, bh, M, N, seed, threshold,
                   keep_factor, qk_scale, sm_scale, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, HAS_CLS: tl.constexpr, DROPOUT: tl.constexpr):
        G = (N - 1) // 8 + 2
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        offs_n = key0 + tl.arange(0, BN)
        kvalid = offs_n < key_limit
        k = _load_rows(k_base, offs_n, kvalid, stride_kn, offs_d, dmask)
        v = _load_rows(v_base, offs_n, kvalid, stride_kn, offs_d, dmask)
        dk = tl.zeros([BN, DP], tl.float32)
        dv = tl.zeros([BN, DP], tl.float32)
        first = 0
        if HAS_CLS:
            first = 1
            dk, dv = _dkdv_block(dk, dv, k, v, kvalid, group0, q_base, o_base, do_base, lse_base, stride_qn,
                                 stride_on, stride_don, 0, 1, bh, M, seed, G, threshold, keep_factor, qk_scale,
                                 offs_d, dmask, DROPOUT, CLS_TILE, BN)
        for row0 in range(first, M, BM):
            dk, dv = _dkdv_block(dk, dv, k, v, kvalid, group0, q_base, o_base, do_base, lse_base, stride_qn,
                                 stride_on, stride_don, row0, M, bh, M, seed, G, threshold, keep_factor, qk_scale,
                                 offs_d, dmask, DROPOUT, BM, BN)
        out_mask = kvalid[:, None] & dmask[None, :]
        ptrs = offs_n[:, None] * stride_dkn + offs_d[None, :]
        tl.store(dk_base + ptrs, (dk * sm_scale).to(dk_base.dtype.element_ty), mask=out_mask)
        tl.store(dv_base + ptrs, dv.to(dv_base.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _attn_dkdv_kernel(q_ptr, kv_ptr, o_ptr, do_ptr, lse_ptr, seed_ptr, dkv_ptr, q_col, k_col, v_col, dk_col,
                          dv_col, sq_b, sq_n, skv_b, skv_n, so_b, so_n, sdo_b, sdo_n, sdkv_b, sdkv_n, H, M, N,
                          threshold, keep_factor, qk_scale, sm_scale, D: tl.constexpr, DP: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, HAS_CLS: tl.constexpr, DROPOUT: tl.constexpr):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        q_base = q_ptr + b * sq_b + q_col + h * D
        k_base = kv_ptr + b * skv_b + k_col + h * D
        v_base = kv_ptr + b * skv_b + v_col + h * D
        o_base = o_ptr + b * so_b + h * D
        do_base = do_ptr + b * sdo_b + h * D
        dk_base = dkv_ptr + b * sdkv_b + dk_col + h * D
        dv_base = dkv_ptr + b * sdkv_b + dv_col + h * D
        lse_base = lse_ptr + bh.to(tl.int64) * M
        seed = tl.load(seed_ptr)
        P = N - 1
        if pid == P // BN:  # the last program: the [CLS] key's column (mask slot P)
            _dkdv_tile(q_base, k_base, v_base, o_base, do_base, lse_base, dk_base, dv_base, sq_n, skv_n, so_n,
                       sdo_n, sdkv_n, 0, 1, P // 8, bh, M, N, seed, threshold, keep_factor, qk_scale, sm_scale,
                       D, DP, BM, CLS_TILE, HAS_CLS, DROPOUT)
        else:
            _dkdv_tile(q_base, k_base, v_base, o_base, do_base, lse_base, dk_base, dv_base, sq_n, skv_n, so_n,
                       sdo_n, sdkv_n, 1 + pid * BN, N, pid * (BN // 8), bh, M, N, seed, threshold, keep_factor,
                       qk_scale, sm_scale, D, DP, BM, BN, HAS_CLS, DROPOUT)

    @triton.jit
    def _dq_block(dq, q, do, lse, delta, rows, k_base, v_base, stride_kn, key0, key_limit, group0, seed, G,
                  threshold, keep_factor, qk_scale, offs_d, dmask, DROPOUT: tl.constexpr, BN: tl.constexpr):
        offs_n = key0 + tl.arange(0, BN)
        kvalid = offs_n < key_limit
        k = _load_rows(k_base, offs_n, kvalid, stride_kn, offs_d, dmask)
        v = _load_rows(v_base, offs_n, kvalid, stride_kn, offs_d, dmask)
        _, ds = _bwd_scores(q, k, do, v, lse, kvalid, rows, group0, seed, G, threshold, keep_factor, qk_scale,
                            delta, DROPOUT, BN)
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.jit
    def _dq_tile(q_base, k_base, v_base, o_base, do_base, lse_base, dq_base, stride_qn, stride_kn, stride_on,
                 stride_don, stride_dqn, row0, row_limit, bh, M, N, seed, threshold, keep_factor, qk_scale, sm_scale,
                 D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DROPOUT: tl.constexpr):
        P = N - 1
        G = P // 8 + 2
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        offs_m, q, do, lse, delta = _query_rows(q_base, o_base, do_base, lse_base, stride_qn, stride_on, stride_don,
                                                row0, row_limit, offs_d, dmask, BM)
        rows = bh * M + offs_m
        dq = tl.zeros([BM, DP], tl.float32)
        dq = _dq_block(dq, q, do, lse, delta, rows, k_base, v_base, stride_kn, 0, 1, P // 8, seed, G, threshold,
                       keep_factor, qk_scale, offs_d, dmask, DROPOUT, CLS_TILE)
        for start in range(0, P, BN):
            dq = _dq_block(dq, q, do, lse, delta, rows, k_base, v_base, stride_kn, 1 + start, N, start // 8, seed, G,
                           threshold, keep_factor, qk_scale, offs_d, dmask, DROPOUT, BN)
        mvalid = offs_m < row_limit
        tl.store(dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :], (dq * sm_scale).to(dq_base.dtype.element_ty),
                 mask=mvalid[:, None] & dmask[None, :])

    @triton.jit
    def _attn_dq_kernel(q_ptr, kv_ptr, o_ptr, do_ptr, lse_ptr, seed_ptr, dq_ptr, q_col, k_col, v_col, dq_col,
                        sq_b, sq_n, skv_b, skv_n, so_b, so_n, sdo_b, sdo_n, sdq_b, sdq_n, H, M, N,
                        threshold, keep_factor, qk_scale, sm_scale, D: tl.constexpr, DP: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, HAS_CLS: tl.constexpr, DROPOUT: tl.constexpr):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        q_base = q_ptr + b * sq_b + q_col + h * D
        k_base = kv_ptr + b * skv_b + k_col + h * D
        v_base = kv_ptr + b * skv_b + v_col + h * D
        o_base = o_ptr + b * so_b + h * D
        do_base = do_ptr + b * sdo_b + h * D
        dq_base = dq_ptr + b * sdq_b + dq_col + h * D
        lse_base = lse_ptr + bh.to(tl.int64) * M
        seed = tl.load(seed_ptr)
        first = 1 if HAS_CLS else 0
        if HAS_CLS and pid == tl.cdiv(M - 1, BM):
            _dq_tile(q_base, k_base, v_base, o_base, do_base, lse_base, dq_base, sq_n, skv_n, so_n, sdo_n, sdq_n, 0, 1,
                     bh, M, N, seed, threshold, keep_factor, qk_scale, sm_scale, D, DP, CLS_TILE, BN, DROPOUT)
        else:
            _dq_tile(q_base, k_base, v_base, o_base, do_base, lse_base, dq_base, sq_n, skv_n, so_n, sdo_n, sdq_n,
                     first + pid * BM, M, bh, M, N, seed, threshold, keep_factor, qk_scale, sm_scale, D, DP, BM, BN,
                     DROPOUT)

    @triton.jit
    def _keep_slots_kernel(seed_ptr, out_ptr, M, N, threshold, BN: tl.constexpr):
        """uint8 [BH·M, P + 16]: the keep decision of every mask slot of mask row r (for `keep_mask`)."""
        r = tl.program_id(0)
        seed = tl.load(seed_ptr)
        P = N - 1
        G = P // 8 + 2
        rows = r + tl.zeros([1], tl.int32)
        for start in range(0, P + 16, BN):
            offs = start + tl.arange(0, BN)
            keep = _keep(seed, rows, start // 8, G, threshold, BN)
            tl.store(out_ptr + r.to(tl.int64) * (P + 16) + offs[None, :], keep.to(tl.uint8), mask=offs[None, :] < P + 16)


def _blocks(pass_name: str, blocks: dict | None) -> tuple[int, int, int, int]:
    return (blocks or DEFAULT_BLOCKS)[pass_name]


def _launch_fwd(q, kv, seed, heads, c, q_col, k_col, v_col, has_cls, threshold, blocks=None):
    b, m = q.shape[:2]
    n = kv.shape[1]
    d = c // heads
    bm, bn, warps, stages = _blocks("fwd", blocks)
    out = torch.empty(b, m, c, device=q.device, dtype=q.dtype)
    lse = torch.empty(b * heads, m, device=q.device, dtype=torch.float32)
    scale = d ** -0.5
    grid = (triton.cdiv(m - int(has_cls), bm) + int(has_cls), b * heads)
    torch.library.wrap_triton(_attn_fwd_kernel)[grid](
        q, kv, out, lse, seed, q_col, k_col, v_col, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
        out.stride(0), out.stride(1), heads, m, n, threshold, threshold_scale(threshold), scale * LOG2E,
        D=d, DP=triton.next_power_of_2(max(d, 16)), BM=bm, BN=bn, HAS_CLS=has_cls, DROPOUT=threshold > 0,
        num_warps=warps, num_stages=stages)
    return out, lse


def _launch_bwd(do, q, kv, out, lse, seed, dq, dkv, heads, q_col, k_col, v_col, dq_col, dk_col, dv_col, has_cls,
                threshold, blocks=None):
    b, m = q.shape[:2]
    n = kv.shape[1]
    c = out.shape[2]
    d = c // heads
    scale = d ** -0.5
    common = dict(D=d, DP=triton.next_power_of_2(max(d, 16)), HAS_CLS=has_cls, DROPOUT=threshold > 0)
    bm, bn, warps, stages = _blocks("dkdv", blocks)
    torch.library.wrap_triton(_attn_dkdv_kernel)[((n - 1) // bn + 1, b * heads)](
        q, kv, out, do, lse, seed, dkv, q_col, k_col, v_col, dk_col, dv_col, q.stride(0), q.stride(1), kv.stride(0),
        kv.stride(1), out.stride(0), out.stride(1), do.stride(0), do.stride(1), dkv.stride(0), dkv.stride(1), heads,
        m, n, threshold, threshold_scale(threshold), scale * LOG2E, scale, BM=bm, BN=bn, num_warps=warps,
        num_stages=stages, **common)
    bm, bn, warps, stages = _blocks("dq", blocks)
    grid = (triton.cdiv(m - int(has_cls), bm) + int(has_cls), b * heads)
    torch.library.wrap_triton(_attn_dq_kernel)[grid](
        q, kv, out, do, lse, seed, dq, q_col, k_col, v_col, dq_col, q.stride(0), q.stride(1), kv.stride(0),
        kv.stride(1), out.stride(0), out.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), heads,
        m, n, threshold, threshold_scale(threshold), scale * LOG2E, scale, BM=bm, BN=bn, num_warps=warps,
        num_stages=stages, **common)


if triton is not None:
    @torch.library.triton_op("lease::self_attention_fwd", mutates_args=())
    def self_attention_fwd(qkv: torch.Tensor, seed: torch.Tensor, heads: int,
                           threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention over qkv [B, N, 3·C] (first row [CLS]) → (O [B, N, C], log₂-sum-exp [B·H, N])."""
        c = qkv.shape[2] // 3
        return _launch_fwd(qkv, qkv, seed, heads, c, 0, c, 2 * c, True, threshold)

    @torch.library.triton_op("lease::self_attention_bwd", mutates_args=())
    def self_attention_bwd(grad: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           seed: torch.Tensor, heads: int, threshold: int) -> torch.Tensor:
        """d qkv [B, N, 3·C] for the output gradient `grad` [B, N, C]."""
        c = qkv.shape[2] // 3
        dqkv = torch.empty_like(qkv)
        _launch_bwd(grad, qkv, qkv, out, lse, seed, dqkv, dqkv, heads, 0, c, 2 * c, 0, c, 2 * c, True, threshold)
        return dqkv

    @torch.library.triton_op("lease::rows_attention_fwd", mutates_args=())
    def rows_attention_fwd(q: torch.Tensor, kv: torch.Tensor, seed: torch.Tensor, heads: int,
                           threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries q [B, M, C] (no [CLS] among them) over kv [B, N, 2·C] (first row [CLS])."""
        c = q.shape[2]
        return _launch_fwd(q, kv, seed, heads, c, 0, 0, c, False, threshold)

    @torch.library.triton_op("lease::rows_attention_bwd", mutates_args=())
    def rows_attention_bwd(grad: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, seed: torch.Tensor, heads: int,
                           threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = q.shape[2]
        dq, dkv = torch.empty_like(q), torch.empty_like(kv)
        _launch_bwd(grad, q, kv, out, lse, seed, dq, dkv, heads, 0, 0, c, 0, 0, c, False, threshold)
        return dq, dkv

    def _self_setup(ctx, inputs, output):
        qkv, seed, heads, threshold = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse, seed)
        ctx.heads, ctx.threshold = heads, threshold

    def _self_backward(ctx, grad, _grad_lse):
        qkv, out, lse, seed = ctx.saved_tensors
        return self_attention_bwd(grad.contiguous(), qkv, out, lse, seed, ctx.heads, ctx.threshold), None, None, None

    def _rows_setup(ctx, inputs, output):
        q, kv, seed, heads, threshold = inputs
        out, lse = output
        ctx.save_for_backward(q, kv, out, lse, seed)
        ctx.heads, ctx.threshold = heads, threshold

    def _rows_backward(ctx, grad, _grad_lse):
        q, kv, out, lse, seed = ctx.saved_tensors
        dq, dkv = rows_attention_bwd(grad.contiguous(), q, kv, out, lse, seed, ctx.heads, ctx.threshold)
        return dq, dkv, None, None, None

    self_attention_fwd.register_autograd(_self_backward, setup_context=_self_setup)
    rows_attention_fwd.register_autograd(_rows_backward, setup_context=_rows_setup)

    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.lease.self_attention_fwd)
    def _self_fwd_flops(qkv_shape, *args, out_shape=None, **kwargs) -> int:
        """S = q kᵀ and O = P V: 4·B·N·N·C (what `lease bench train` counts as executed attention FLOPs)."""
        return 4 * qkv_shape[0] * qkv_shape[1] * qkv_shape[1] * out_shape[0][2]

    @register_flop_formula(torch.ops.lease.rows_attention_fwd)
    def _rows_fwd_flops(q_shape, kv_shape, *args, out_shape=None, **kwargs) -> int:
        return 4 * q_shape[0] * q_shape[1] * kv_shape[1] * q_shape[2]

    @register_flop_formula(torch.ops.lease.self_attention_bwd)
    def _self_bwd_flops(grad_shape, qkv_shape, *args, out_shape=None, **kwargs) -> int:
        """dK/dV pass: S, dP, dV, dK; dQ pass: S, dP, dQ again: 14·B·M·N·C executed."""
        return 14 * grad_shape[0] * grad_shape[1] * qkv_shape[1] * grad_shape[2]

    @register_flop_formula(torch.ops.lease.rows_attention_bwd)
    def _rows_bwd_flops(grad_shape, q_shape, kv_shape, *args, out_shape=None, **kwargs) -> int:
        return 14 * grad_shape[0] * grad_shape[1] * kv_shape[1] * grad_shape[2]


def philox_seed(device: torch.device) -> torch.Tensor:
    """A fresh 62-bit Philox key from torch's generator on `device` (int64 [1])."""
    return torch.randint(0, SEED_BOUND, (1,), device=device, dtype=torch.int64)


def self_attention(qkv: torch.Tensor, heads: int, dropout_p: float, seed: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d) v with attention dropout for the packed projection qkv [B, N, 3·C] → [B, N, C].
    Drop probability round(p·2¹⁶)/2¹⁶, survivors scaled to keep the expectation (module docstring)."""
    seed = philox_seed(qkv.device) if seed is None else seed
    return self_attention_fwd(qkv.contiguous(), seed, heads, drop_threshold(dropout_p))[0]


def rows_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, dropout_p: float,
                   seed: torch.Tensor | None = None) -> torch.Tensor:
    """Queries q [B, M, C] over the packed keys and values kv [B, N, 2·C] → [B, M, C]."""
    seed = philox_seed(q.device) if seed is None else seed
    return rows_attention_fwd(q.contiguous(), kv.contiguous(), seed, heads, drop_threshold(dropout_p))[0]


def keep_mask(seed: torch.Tensor, batch_heads: int, num_queries: int, num_keys: int,
              dropout_p: float) -> torch.Tensor:
    """bool [B·H, M, N]: which attention probabilities the kernels keep for this Philox key (column 0:
    the [CLS] key), from the kernels' own mask function (the tests' fp64 references use it)."""
    slots = num_keys - 1 + CLS_ROWS
    out = torch.empty(batch_heads * num_queries, slots, dtype=torch.uint8, device=seed.device)
    _keep_slots_kernel[(batch_heads * num_queries,)](seed, out, num_queries, num_keys, drop_threshold(dropout_p),
                                                     BN=16)
    by_key = torch.cat([out[:, num_keys - 1:num_keys], out[:, :num_keys - 1]], 1)  # slot P is the [CLS] key
    return by_key.view(batch_heads, num_queries, num_keys).bool()
