"""Gradients of split_cls's [CLS] query row, eager and compiled, against fp64, at the ViT-B encoder and
decoder shapes; on the GPU when there is one, else the CPU.

    python benchmarks/exploratory/cls_row_compiled.py

Two forms of the same softmax over N scores: "broadcast", q times k summed over the head dimension (what
split_cls's [CLS] row was until the compiled model's [CLS] gradients were traced to it), and
"matmul", two one-row matmuls (`single_query`, its form until split_cls moved into Triton kernels).
q, k, v are views of one packed projection, as in the model, or contiguous copies of them; the output
gradient is a plain [B, H, D] tensor. Each form runs eagerly, compiled as `torch.compile` does by default,
and compiled as the trainer compiles (`lease.train.compile_for_training`: inductor's comprehensive padding
off). Each line gives the relative error of dq, dk and dv. On an H100 (torch 2.11.0, 2026-11-25) the
broadcast form compiled by default gave dq and dk 1.5 at the encoder's shape and NaN at the decoder's, in
both layouts; every other line read 1.6-1.7e-3. On the CPU (torch 2.14.1, where inductor does not pad) every line reads 1.6-1.7e-3.
"""
import logging

import torch

from lease.train import compile_for_training

SHAPES = {"encoder": (12, 129, 64), "decoder": (16, 257, 48)}  # heads, tokens, head dim (ViT-B)
BATCH = 8


def broadcast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q[:, :, 0, None].float() * k.float()).sum(-1) * q.shape[-1] ** -0.5
    return (scores.softmax(-1)[..., None] * v.float()).sum(2).to(v.dtype)


def single_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """One query per head, q [B, H, D] over k, v [B, H, N, D] → [B, H, D], as two one-row matmuls in fp32."""
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        scores = q[:, :, None].to(acc) @ k.to(acc).transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = torch.nn.functional.dropout(scores.softmax(-1), dropout_p)
        return (probs @ v.to(acc))[:, :, 0].to(v.dtype)


def matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return single_query(q[:, :, 0], k, v, 0.0)


def errors(fn, heads: int, tokens: int, head_dim: int, packed_views: bool, device: torch.device) -> list[float]:
    gen = torch.Generator(device=device).manual_seed(0)
    packed = torch.randn(BATCH, tokens, 3, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    leaves = [t.detach() if packed_views else t.contiguous() for t in packed.unbind(2)]
    leaves = [t.requires_grad_() for t in leaves]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    grad = torch.randn(BATCH, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    got = torch.autograd.grad(fn(*(t.transpose(1, 2) for t in leaves)), leaves, grad)
    ref = torch.autograd.grad(matmul(*(t.transpose(1, 2) for t in exact)), exact, grad.double())
    return [float((a.double() - r).norm() / r.norm()) for a, r in zip(got, ref)]


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for form in (broadcast, matmul):
        for packed_views in (True, False):
            for part, shape in SHAPES.items():
                for mode, fn in (("eager", form), ("compiled", torch.compile(form, dynamic=False)),
                                 ("trainer", compile_for_training(form, "default", dynamic=False))):
                    dq, dk, dv = errors(fn, *shape, packed_views, device)
                    logging.info("%s %-9s %-12s %-7s %-8s dq %.1e  dk %.1e  dv %.1e", device.type, form.__name__,
                                 "packed views" if packed_views else "contiguous", part, mode, dq, dk, dv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
