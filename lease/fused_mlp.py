"""The transformer MLP, fc2(dropout(GELU(fc1(x)))), with its hidden layer's backward in one Triton GEMM.

Autograd runs the hidden layer's backward as three passes over the [rows, hidden] activations (4× the
model width): cuBLAS writes fc2's input gradient, a fused elementwise kernel reads it back with fc1's
output and the dropout mask to apply the dropout and GELU backward, and a reduction reads them once more
for fc1's bias gradient. Here one GEMM computes fc2's input gradient and, in its epilogue while the tile
is still in registers, the rest (h = fc1's output, m the keep mask, s = 1 / (1 − p')):

    ∂L/∂h = (∂L/∂z · W₂) ∘ m · s ∘ GELU'(h),   ∂L/∂b₁ = Σ_rows ∂L/∂h

with GELU'(h) = Φ(h) + h·φ(h) (the exact, erf GELU of the authors' code). Each row block writes its
column sums; one small sum over blocks gives ∂L/∂b₁ (deterministic: no atomics). The forward pass and
the other gradients are the usual cuBLAS matmuls and `torch.compile`-fused elementwise kernels.

The dropout mask is lease/dropout.py's bit-packed Philox mask (one bit per hidden element, bit i % 8 of
byte i // 8 in row-major order), drawn in the same order as the module path, so a fused and an unfused
model that share weights and RNG state draw the same masks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lease.dropout import draw_keep_bits, keep_scale, triton, unpack_bits

if triton is not None:
    import triton.language as tl

# Tile shape of the fused GEMM. Measured on an H100 at ViT-B's MLP shapes (README, "fused MLP backward");
# the row block also fixes how many partial bias sums there are.
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, NUM_WARPS, NUM_STAGES = 128, 128, 64, 8, 8, 3

if triton is not None:
    @triton.jit
    def _hidden_grad_kernel(grad_ptr, w2_ptr, h_ptr, bits_ptr, out_ptr, bias_part_ptr, M, N, K, scale,
                            HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # grad [M, K] · w2 [K, N] → the hidden gradient [M, N]; h, out [M, N]; bias_part [cdiv(M, BLOCK_M), N]
        pid = tl.program_id(0)
        blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        # programs in groups of GROUP_M row blocks walk the columns together, so w2's tiles stay in L2
        group_size = GROUP_M * blocks_n
        first_m = (pid // group_size) * GROUP_M
        rows_in_group = min(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_in_group
        pid_n = (pid % group_size) // rows_in_group

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # loads wrap around the edges (their results there are never stored), so only K needs a mask
        load_rows = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M)
        load_cols = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = grad_ptr + load_rows[:, None].to(tl.int64) * K + ks[None, :]
        b_ptrs = w2_ptr + ks[:, None] * N + load_cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * N

        inside = (rows < M)[:, None] & (cols < N)[None, :]
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        # autograd hands the dropout backward fc2's input gradient in the activations' dtype: round as it does
        grad = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        if HAS_DROPOUT:
            packed = tl.load(bits_ptr + offsets // 8, mask=inside, other=0).to(tl.int32)
            keep = (packed >> (offsets % 8).to(tl.int32)) & 1
            grad = grad * keep.to(tl.float32) * scale
        h = tl.load(h_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        hidden_grad = (grad * (cdf + h * pdf)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, hidden_grad, mask=inside)
        column_sums = tl.sum(tl.where(inside, hidden_grad.to(tl.float32), 0.0), axis=0)
        tl.store(bias_part_ptr + pid_m * N + cols, column_sums, mask=cols < N)

    @torch.library.triton_op("lease::mlp_hidden_grad", mutates_args=())
    def mlp_hidden_grad(grad: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, bits: torch.Tensor,
                        scale: float, has_dropout: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂L/∂h [M, N], ∂L/∂b₁ [N] fp32) from ∂L/∂z `grad` [M, K], fc2's weight [K, N], fc1's output h
        [M, N] and the packed keep mask `bits` (ignored without dropout)."""
        (m, k), n = grad.shape, w2.shape[1]
        out = torch.empty_like(h)
        bias_parts = torch.empty((triton.cdiv(m, BLOCK_M), n), dtype=torch.float32, device=h.device)

        def grid(meta):
            return (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)

        torch.library.wrap_triton(_hidden_grad_kernel)[grid](
            grad, w2, h, bits, out, bias_parts, m, n, k, scale, HAS_DROPOUT=has_dropout, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        return out, bias_parts.sum(0)


def fused_mlp_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


class _GeluMlp(torch.autograd.Function):
    """z = fc2(dropout(GELU(fc1(x)))) on 2-D x; every input already in the compute dtype."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p: float):
        h = torch.addmm(b1, x, w1.t())
        has_dropout = p > 0.0
        bits = draw_keep_bits(h.numel(), p, h.device) if has_dropout else h.new_empty(0, dtype=torch.uint8)
        hidden = nn.functional.gelu(h)
        if has_dropout:
            hidden = hidden * unpack_bits(bits, h.numel()).view(h.shape) * keep_scale(p)
        ctx.save_for_backward(x, w1, w2, h, hidden, bits)
        ctx.scale, ctx.has_dropout = keep_scale(p) if has_dropout else 1.0, has_dropout
        return torch.addmm(b2, hidden, w2.t())

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, h, hidden, bits = ctx.saved_tensors
        grad = grad.contiguous()
        grad_h, grad_b1 = mlp_hidden_grad(grad, w2, h, bits, ctx.scale, ctx.has_dropout)
        grad_w2, grad_b2 = grad.t() @ hidden, grad.sum(0)
        grad_w1, grad_x = grad_h.t() @ x, grad_h @ w1
        return grad_x, grad_w1, grad_b1.to(w1.dtype), grad_w2, grad_b2, None


def fused_gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, p: float) -> torch.Tensor:
    """fc2(dropout_p(GELU(fc1(x)))) for x [..., C], in autocast's dtype when autocast is on (as
    nn.Linear would compute), with the hidden layer's backward fused (module docstring). CUDA, or the
    CPU under Triton's interpreter."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    args = [t.to(dtype) for t in (x.reshape(-1, x.shape[-1]), fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    with torch.autocast(device, enabled=False):
        out = _GeluMlp.apply(*args, p)
    return out.view(*x.shape[:-1], out.shape[-1])

