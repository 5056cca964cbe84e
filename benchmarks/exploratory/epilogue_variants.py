"""Where the fused GEMM's time goes: the same kernel with its epilogue pieces switched on one at a time
(pre-activation load, mask read per element or as bytes, bias sums, prefetching before the main loop).

Exploratory measurement behind the README's "Two follow-ups" paragraph. It runs at commit 7a41f24 only
(the fused MLP backward it measures was reverted in the next commit), on a CUDA GPU:
    git checkout 7a41f24 && PYTHONPATH=. .venv/bin/python benchmarks/exploratory/epilogue_variants.py
"""
import torch, triton, triton.language as tl
from triton.testing import do_bench
from lease.dropout import draw_keep_bits

@triton.jit
def k(grad_ptr, w2_ptr, h_ptr, bits_ptr, out_ptr, bias_part_ptr, M, N, K, scale,
      EPI_H: tl.constexpr, EPI_BITS: tl.constexpr, EPI_SUM: tl.constexpr, A_INT64: tl.constexpr, K_MASK: tl.constexpr,
      BITS_BYTES: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * blocks_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    load_rows = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M)
    load_cols = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    if A_INT64:
        a_ptrs = grad_ptr + load_rows[:, None].to(tl.int64) * K + ks[None, :]
    else:
        a_ptrs = grad_ptr + load_rows[:, None] * K + ks[None, :]
    b_ptrs = w2_ptr + ks[:, None] * N + load_cols[None, :]
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    if PREFETCH:
        h_pre = tl.load(h_ptr + offsets, mask=inside, other=0.0)
        byte_offs = rows[:, None] * (N // 8) + (pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8))[None, :]
        packed_pre = tl.load(bits_ptr + byte_offs)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if K_MASK:
            k_left = K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)
        else:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * N
    grad = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    if EPI_BITS:
        if BITS_BYTES:
            # one byte per 8 columns, expanded in registers
            byte_offs = rows[:, None] * (N // 8) + (pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8))[None, :]
            if PREFETCH:
                packed = packed_pre.to(tl.int32)
            else:
                packed = tl.load(bits_ptr + byte_offs).to(tl.int32)
            bitsx = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
            keep = tl.reshape(bitsx, (BLOCK_M, BLOCK_N))
        else:
            packed = tl.load(bits_ptr + offsets // 8, mask=inside, other=0).to(tl.int32)
            keep = (packed >> (offsets % 8)) & 1
        grad = grad * keep.to(tl.float32) * scale
    if EPI_H:
        if PREFETCH:
            h = h_pre.to(tl.float32)
        else:
            h = tl.load(h_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        grad = grad * (cdf + h * pdf)
    hidden_grad = grad.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, hidden_grad, mask=inside)
    if EPI_SUM:
        column_sums = tl.sum(tl.where(inside, hidden_grad.to(tl.float32), 0.0), axis=0)
        tl.store(bias_part_ptr + pid_m * N + cols, column_sums, mask=cols < N)

dev = "cuda"
M, K, N = 256 * 257, 768, 3072
grad = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
w2 = torch.randn(K, N, device=dev, dtype=torch.bfloat16) * 0.03
h = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
bits = draw_keep_bits(M * N, 0.1, h.device)
out = torch.empty_like(h)
print("mm", do_bench(lambda: grad @ w2, warmup=50, rep=300) * 1e3)
for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 3), (64, 256, 64, 4, 3), (128, 128, 64, 8, 4)]:
    part = torch.empty(triton.cdiv(M, bm), N, device=dev)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    for name, flags in [("gemm", (0, 0, 0, 0, 0, 0, 0)), ("+h+bits bytes+sum", (1, 1, 1, 0, 0, 1, 0)),
                        ("prefetch +h+bits", (1, 1, 0, 0, 0, 1, 1)), ("prefetch +h+bits+sum", (1, 1, 1, 0, 0, 1, 1))]:
        f = lambda: k[grid](grad, w2, h, bits, out, part, M, N, K, 1.1, *flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
        try:
            t = do_bench(f, warmup=20, rep=200)
            print(f"VAR {bm}x{bn}x{bk} w{w} s{s} {name}: {t*1e3:.0f} us", flush=True)
        except Exception as e:
            print(f"VAR {bm}x{bn}x{bk} w{w} s{s} {name}: failed {type(e).__name__} {str(e)[:200]}", flush=True)
# correctness of the byte-expanded, prefetched variant against the gather variant
part = torch.empty(triton.cdiv(M, 128), N, device=dev)
grid = (triton.cdiv(M, 128) * triton.cdiv(N, 128),)
outs = []
for flags in [(1, 1, 1, 0, 0, 0, 0), (1, 1, 1, 0, 0, 1, 1)]:
    o = torch.empty_like(h)
    k[grid](grad, w2, h, bits, o, part, M, N, K, 1.1, *flags, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    outs.append(o)
print("SAME", torch.equal(outs[0], outs[1]))
