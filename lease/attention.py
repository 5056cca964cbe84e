"""Softmax attention with the [CLS] token's row and column taken out of the fused kernel.

LEASE attends over [CLS] + 128 kept tokens in the ViT-B encoder and [CLS] + 256 canvas slots in the
decoder: one token more than a multiple of 64. SDPA's fused kernels tile both axes in 64 or 128, so
that one token costs a whole extra tile per axis: on an H100 cuDNN's forward + backward takes
0.89 ms at 129 tokens and 0.54 ms at 128, 2.51 ms at 257 and 1.51 ms at 256 (batch 256, dropout 0.1;
`lease bench train --attention-only`). So the same attention is computed in three parts:

* the patch queries against the patch keys: SDPA's cuDNN kernel, which also returns each row's
  log-sum-exp ℓ of its scores;
* the [CLS] key's column for those queries: one score per row, s₀ = q·k₀/√d, merged with the
  kernel's output through ℓ (below);
* the [CLS] query's row: one softmax over N scores, linear in N.

Merging one extra key into a finished softmax (per query row; κ ∈ {0, 1/(1 − p)} is that key's
dropout keep factor, the kernel applies its own to the other keys):

    ℓ' = logaddexp(ℓ, s₀),  α = exp(ℓ − ℓ'),  β = exp(s₀ − ℓ'),  O = α·O_p + β·κ·v₀

Backward: the kernel's backward gets dO_p = α·dO, and the loss also depends on ℓ through α and β:
g = ∂L/∂ℓ = αβ (dO·O_p − κ dO·v₀), and ∂L/∂s₀ = −g. FlashAttention's backward reads O only through
D = rowsum(dO ∘ O), in dS = P ∘ (dP − D); a gradient g on ℓ = logsumexp(S) adds g·P to dS, which is
the same as replacing D by D − g. So the kernel is given O' = O_p − g·dO_p / ‖dO_p‖², whose
rowsum(dO_p ∘ O') is D − g. O' stays within β‖O_p − κ v₀‖ of O_p (bounded even as dO → 0).

Dropout keeps its meaning: every attention probability is dropped independently with probability p
and the kept ones scaled by 1/(1 − p); the kernel draws the masks of the patch keys, torch's
generator those of the [CLS] column and row.

The merge is extra elementwise work: timed alone the split is slower than cuDNN on the whole
sequence, and so is the compiled ViT-B training step with it (README, "Training speed"). The model
takes this path with `model.attention_backend=split_cls`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def split_cls_supported(q: torch.Tensor) -> bool:
    """Whether the model routes these inputs here: cuDNN's kernel needs CUDA, 16 bits and sm80+. (The
    function also runs on the CPU without dropout, through the CPU flash kernel; the tests use that.)"""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def split_cls_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                        q_has_cls: bool = True) -> torch.Tensor:
    """softmax(q kᵀ/√d) v with attention dropout, for q [B, H, M, D] and k, v [B, H, N, D] whose first
    row is [CLS]; `q_has_cls`: q's first row is the [CLS] query too (self-attention) rather than M
    other rows. Same result as `F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)`."""
    if not q_has_cls:
        return _FirstKeyApart.apply(q, k, v, dropout_p)
    cls_row = _single_query(q[:, :, 0], k, v, dropout_p)
    rest = _FirstKeyApart.apply(q[:, :, 1:], k, v, dropout_p)
    return torch.cat([cls_row[:, :, None], rest], 2)


def _single_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """One query per head, q [B, H, D] over k, v [B, H, N, D] → [B, H, D]: a softmax over N scores.

    Two batched matmuls of one row each, outside autocast so that the scores stay in fp32 as in the
    fused kernels. Not a broadcast product summed over D: compiled by torch 2.11 on CUDA with inductor's
    comprehensive padding on, that form's gradients for q and k came out 150 % off, or NaN
    (benchmarks/exploratory/cls_row_compiled.py; the trainer now compiles with that pass off)."""
    acc = _accumulation_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        scores = q[:, :, None].to(acc) @ k.to(acc).transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = F.dropout(scores.softmax(-1), dropout_p)
        return (probs @ v.to(acc))[:, :, 0].to(v.dtype)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit inputs (as the fused kernels accumulate), the input's own dtype otherwise."""
    return torch.promote_types(t.dtype, torch.float32)


def _keep_factor(like: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """κ per element of `like`: 0 with probability p, else 1 / (1 − p)."""
    if dropout_p == 0.0:
        return torch.ones_like(like)
    return (torch.rand_like(like) >= dropout_p).to(like.dtype) / (1.0 - dropout_p)


class _FirstKeyApart(torch.autograd.Function):
    """Queries q [B, H, M, D] over keys [B, H, 1 + P, D]: the P keys in the fused kernel, the first
    merged through the log-sum-exp (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p):
        scale, acc = q.shape[-1] ** -0.5, _accumulation_dtype(q)
        k0, v0 = k[:, :, :1].to(acc), v[:, :, :1].to(acc)
        out_p, lse_p, kernel_state = _fused_forward(q, k[:, :, 1:], v[:, :, 1:], dropout_p, scale)
        s0 = (q.to(acc) * k0).sum(-1) * scale
        lse = torch.logaddexp(lse_p, s0)
        alpha, beta = (lse_p - lse).exp(), (s0 - lse).exp()
        keep0 = _keep_factor(beta, dropout_p)
        out = alpha[..., None] * out_p.to(acc) + (beta * keep0)[..., None] * v0
        saved, ctx.kernel_values = kernel_state
        ctx.save_for_backward(q, k, v, out_p, alpha, beta, keep0, *saved)
        ctx.dropout_p, ctx.scale = dropout_p, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out_p, alpha, beta, keep0, *kernel_saved = ctx.saved_tensors
        acc = alpha.dtype
        k0, v0 = k[:, :, :1].to(acc), v[:, :, :1].to(acc)
        grad = grad.to(acc)
        grad_lse = alpha * beta * ((grad * out_p.to(acc)).sum(-1) - keep0 * (grad * v0).sum(-1))
        grad_p = alpha[..., None] * grad
        sq_norm = grad_p.square().sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
        out_shifted = out_p.to(acc) - grad_lse[..., None] * grad_p / sq_norm
        dq, dk_p, dv_p = _fused_backward(grad_p.to(q.dtype), q, k[:, :, 1:], v[:, :, 1:], out_shifted.to(q.dtype),
                                         (kernel_saved, ctx.kernel_values), ctx.dropout_p, ctx.scale)
        grad_s0 = -grad_lse * ctx.scale
        dq = dq.to(acc) + grad_s0[..., None] * k0
        dk0 = (grad_s0[..., None] * q.to(acc)).sum(2, keepdim=True)
        dv0 = ((beta * keep0)[..., None] * grad).sum(2, keepdim=True)
        dk = torch.cat([dk0, dk_p.to(acc)], 2).to(k.dtype)
        dv = torch.cat([dv0, dv_p.to(acc)], 2).to(v.dtype)
        return dq.to(q.dtype), dk, dv, None


def _fused_forward(q, k, v, dropout_p: float, scale: float):
    """SDPA's fused kernel with its log-sum-exp: → (out, ℓ [B, H, M] fp32, state for `_fused_backward`:
    the tensors to save and the plain values)."""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, dropout_p, False, False, scale=scale)
        return out, lse.view(q.shape[:3]), ((lse, seed, offset), (cum_q, cum_k, max_q, max_k))
    if dropout_p != 0.0:
        raise ValueError("split_cls_attention on the CPU takes no attention dropout (the CPU kernel has none)")
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse, ((lse,), ())


def _fused_backward(grad, q, k, v, out, state: tuple, dropout_p: float, scale: float):
    saved, values = state
    if q.is_cuda:
        lse, seed, offset = saved
        cum_q, cum_k, max_q, max_k = values
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, dropout_p, False, scale=scale)
    (lse,) = saved
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, False,
                                                                     scale=scale)
