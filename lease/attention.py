"""Softmax attention with the [CLS] token's row and column taken out of the fused kernel.

LEASE attends over [CLS] + 128 kept tokens in the ViT-B encoder and [CLS] + 256 canvas slots in the
decoder: one token more than a multiple of 64. SDPA's fused kernels tile both axes in 64 or 128, so
that one token costs a whole extra tile per axis: on an H100 cuDNN's forward + backward takes
0.89 ms at 129 tokens and 0.54 ms at 128, 2.51 ms at 257 and 1.51 ms at 256 (batch 256, dropout 0.1;
`lease bench train --attention-only`). So the same attention is computed in three parts:

* the patch queries against the patch keys: SDPA's cuDNN kernel, which also returns each row's
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
query's row are left, each one score per row (softmax backward, dropout included):

    ∂L/∂s₀ = β·κ·(dO·v₀) − β·D,   ∂L/∂q += ∂L/∂s₀ · k₀/√d,   ∂L/∂k₀ = Σ ∂L/∂s₀ · q/√d,   ∂L/∂v₀ = Σ β·κ·dO

Dropout keeps its meaning: every attention probability is dropped independently with probability p
and the kept ones scaled by 1/(1 − p); the kernel draws the masks of the patch keys, torch's
generator those of the [CLS] column and row, which are saved for the backward (one value per row).

The model takes this path with `model.attention_backend=split_cls`.
"""
from __future__ import annotations

import torch

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
    other rows. Same result as `F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)`; the
    output's memory is [B, M, H, D], so that merging the heads is a view."""
    if dropout_p != 0.0 and not q.is_cuda:
        raise ValueError("split_cls_attention on the CPU takes no attention dropout (the CPU kernel has none)")
    return _SplitCls.apply(q, k, v, dropout_p, q_has_cls)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit inputs (as the fused kernels accumulate), the input's own dtype otherwise."""
    return torch.promote_types(t.dtype, torch.float32)


def _keep_factor(like: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """κ per element of `like`: 0 with probability p, else 1 / (1 − p)."""
    if dropout_p == 0.0:
        return torch.ones_like(like)
    return (torch.rand_like(like) >= dropout_p).to(like.dtype) / (1.0 - dropout_p)


def _heads_inner(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, H, mᵢ, D] parts joined along the rows into a [B, H, M, D] view of [B, M, H, D] memory."""
    return torch.cat([p.transpose(1, 2) for p in parts], 1).transpose(1, 2)


class _SplitCls(torch.autograd.Function):
    """Queries [B, H, M, D] over keys and values [B, H, 1 + P, D]: the patch keys in the fused kernel,
    the [CLS] column merged through the log-sum-exp, the [CLS] query's row (if q has it) on its own."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, q_has_cls):
        scale, acc = q.shape[-1] ** -0.5, _accumulation_dtype(q)
        q_rest = q[:, :, 1:] if q_has_cls else q
        k0, v0 = k[:, :, :1].to(acc), v[:, :, :1].to(acc)
        out_p, lse_p, kernel_lse, kernel_state = _fused_forward(q_rest, k[:, :, 1:], v[:, :, 1:], dropout_p, scale)
        s0 = (q_rest.to(acc) * k0).sum(-1) * scale
        lse = torch.logaddexp(lse_p, s0)
        beta = (s0 - lse).exp()
        beta_kept = beta * _keep_factor(beta, dropout_p)
        parts = [(lse_p - lse).exp()[..., None] * out_p.to(acc) + beta_kept[..., None] * v0]
        row_prob = row_kept = q.new_empty(0)
        if q_has_cls:
            row_prob = ((q[:, :, :1].to(acc) * k.to(acc)).sum(-1) * scale).softmax(-1)  # [B, H, N]
            row_kept = row_prob * _keep_factor(row_prob, dropout_p)
            parts.insert(0, (row_kept[..., None] * v.to(acc)).sum(2, keepdim=True))
        out = _heads_inner([part.to(q.dtype) for part in parts])
        saved, ctx.kernel_values = kernel_state
        ctx.save_for_backward(q, k, v, out, _as_kernel_lse(lse, kernel_lse), beta, beta_kept, row_prob, row_kept,
                              *saved)
        ctx.dropout_p, ctx.scale, ctx.q_has_cls = dropout_p, scale, q_has_cls
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, beta, beta_kept, row_prob, row_kept, *kernel_saved = ctx.saved_tensors
        acc, scale, first = beta.dtype, ctx.scale, 1 if ctx.q_has_cls else 0
        q_rest, grad_rest, out_rest = q[:, :, first:], grad[:, :, first:], out[:, :, first:]
        k0, v0 = k[:, :, :1].to(acc), v[:, :, :1].to(acc)
        # The kernel's backward with the whole row's ℓ and O: the patch keys' share, exactly.
        dq_p, dk_p, dv_p = _fused_backward(grad_rest, q_rest, k[:, :, 1:], v[:, :, 1:], out_rest,
                                           lse, (kernel_saved, ctx.kernel_values), ctx.dropout_p, scale)
        g = grad_rest.to(acc)
        ds0 = beta_kept * (g * v0).sum(-1) - beta * (g * out_rest.to(acc)).sum(-1)  # ∂L/∂s₀ per query row
        dq = dq_p.to(acc) + (ds0 * scale)[..., None] * k0
        dk = torch.cat([((ds0 * scale)[..., None] * q_rest.to(acc)).sum(2, keepdim=True), dk_p.to(acc)], 2)
        dv = torch.cat([(beta_kept[..., None] * g).sum(2, keepdim=True), dv_p.to(acc)], 2)
        if ctx.q_has_cls:
            g0, q0 = grad[:, :, :1].to(acc), q[:, :, :1].to(acc)
            ds_row = row_kept * (g0 * v.to(acc)).sum(-1) - row_prob * (g0 * out[:, :, :1].to(acc)).sum(-1)
            dq = torch.cat([((ds_row * scale)[..., None] * k.to(acc)).sum(2, keepdim=True), dq], 2)
            dk = dk + (ds_row * scale)[..., None] * q0
            dv = dv + row_kept[..., None] * g0
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _as_kernel_lse(lse: torch.Tensor, kernel_lse: torch.Tensor) -> torch.Tensor:
    """The merged ℓ [B, H, M] in the shape and strides of the kernel's own log-sum-exp output."""
    return kernel_lse.new_empty_strided(kernel_lse.shape, kernel_lse.stride()).copy_(lse.view(kernel_lse.shape))


def _fused_forward(q, k, v, dropout_p: float, scale: float):
    """SDPA's fused kernel with its log-sum-exp: → (out, ℓ [B, H, M] fp32, the kernel's ℓ tensor, state for
    `_fused_backward`: the tensors to save and the plain values)."""
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
