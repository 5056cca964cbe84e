"""cuDNN attention's backward after an earlier call with the same q, k, v but the output gradient in
another memory layout; needs a CUDA GPU.

    python benchmarks/exploratory/cudnn_grad_layout.py

PyTorch caches its cuDNN SDPA backward graphs under the shapes and strides of q, k and v, while each
graph is built for the strides that the output gradient had at its first call
(`aten/src/ATen/native/cudnn/MHA.cpp`, cuDNN >= 9.5.1). For each SDPA kernel this script runs one
forward + backward with the gradient [B, H, N, D]-contiguous, then one with the same q, k, v and the
gradient as a transposed [B, N, H, D] tensor (the layout a `.transpose(1, 2).reshape(B, N, C)`
consumer hands back), then the two orders again at another batch size (a fresh cache entry). Each
line is the relative error of dq, dk, dv against fp64. The model's own calls keep one layout per
q, k, v layout (`tests/test_attention.py` checks its gradients against the math kernel).
"""
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, TOKENS, HEAD_DIM = 16, 257, 48  # the ViT-B decoder's attention
KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def output_grad(batch: int, layout: str) -> torch.Tensor:
    shape = (batch, HEADS, TOKENS, HEAD_DIM) if layout == "BHND" else (batch, TOKENS, HEADS, HEAD_DIM)
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    return g if layout == "BHND" else g.transpose(1, 2)


def relative_errors(kernel: SDPBackend, batch: int, layout: str) -> list[float]:
    """q, k, v as views of one packed projection, as the model has them; errors of their gradients."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    packed = torch.randn(batch, TOKENS, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    leaves = [t.detach().requires_grad_() for t in packed.unbind(2)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    grad = output_grad(batch, layout)
    with sdpa_kernel([kernel]):
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves))
    got = torch.autograd.grad(out, leaves, grad)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in exact)), exact,
                              grad.double())
    return [float((a.double() - r).norm() / r.norm()) for a, r in zip(got, ref)]


def main() -> None:
    for name, kernel in KERNELS.items():
        for batch, order in ((8, ("BHND", "BNHD")), (6, ("BNHD", "BHND"))):
            for layout in order:
                dq, dk, dv = relative_errors(kernel, batch, layout)
                logging.info("%-9s batch %d, output grad %s: dq %.1e  dk %.1e  dv %.1e", name, batch, layout, dq, dk, dv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
