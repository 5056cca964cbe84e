"""Gradients of split_cls's [CLS] query row (`lease.attention._single_query`), eager and compiled,
against fp64, at the ViT-B encoder and decoder shapes; on the GPU when there is one, else the CPU.

    python benchmarks/exploratory/cls_row_compiled.py

Compiled into the model, split_cls gets the gradient of the decoder's [CLS] position embedding wrong
on an H100 with torch 2.11 (the known failure in tests/test_attention.py). This isolates the [CLS]
row: q, k, v are views of one packed projection as in the model, and the output gradient is a plain
[B, H, D] tensor. Each line gives the relative error of dq, dk and dv. On the CPU (torch 2.14.1)
every line reads 1.6-1.7e-3, eager and compiled; not yet run on a GPU.
"""
import logging

import torch

from lease.attention import _single_query

SHAPES = {"encoder": (12, 129, 64), "decoder": (16, 257, 48)}  # heads, tokens, head dim (ViT-B)
BATCH = 8


def cls_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _single_query(q[:, :, 0], k, v, 0.0)


def errors(fn, heads: int, tokens: int, head_dim: int, device: torch.device) -> list[float]:
    gen = torch.Generator(device=device).manual_seed(0)
    packed = torch.randn(BATCH, tokens, 3, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    leaves = [t.detach().requires_grad_() for t in packed.unbind(2)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    grad = torch.randn(BATCH, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    got = torch.autograd.grad(fn(*(t.transpose(1, 2) for t in leaves)), leaves, grad)
    ref = torch.autograd.grad(cls_row(*(t.transpose(1, 2) for t in exact)), exact, grad.double())
    return [float((a.double() - r).norm() / r.norm()) for a, r in zip(got, ref)]


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compiled = torch.compile(cls_row, dynamic=False)
    for part, shape in SHAPES.items():
        for mode, fn in (("eager", cls_row), ("compiled", compiled)):
            dq, dk, dv = errors(fn, *shape, device)
            logging.info("%s %s %s: dq %.1e  dk %.1e  dv %.1e", device.type, part, mode, dq, dk, dv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
