"""Attention with only the [CLS] query's row apart, the keys left whole, against cuDNN on the whole
sequence, at the ViT-B encoder and decoder shapes (batch 256; forward + backward; needs a CUDA GPU).

    python benchmarks/exploratory/cls_query_apart.py

`model.attention_backend=split_cls` takes both the [CLS] row and the [CLS] column out of cuDNN's kernel
and merges the column back through the log-sum-exp. This variant keeps the [CLS] key inside the kernel,
so there is nothing to merge: cuDNN runs the N - 1 patch queries against all N keys, and the [CLS]
query's row is `lease.attention._single_query`; the two are concatenated. It would save the extra query
tile. On an H100 (torch 2.11.0, cuDNN 9.19, 2026-11-25) it was slower, and not kept:

    part     dropout  cuDNN, N tokens   this variant   cuDNN, N - 1 tokens (no [CLS])
    encoder  0.1      0.897 ms          1.547 ms       0.465 ms
    encoder  0        0.666 ms          1.675 ms       0.429 ms
    decoder  0.1      2.511 ms          3.562 ms       1.501 ms
    decoder  0        1.752 ms          3.010 ms       1.140 ms

(An earlier run of the same computation read the same to 0.02 ms at the decoder's shape; at the
encoder's, whose kernels are shorter, it differed by up to 0.23 ms, the variant still the slowest.)
Its result matches fp64 as the fused kernels do (decoder shape, batch 8, no dropout: output 2.2e-3,
dq, dk, dv 2.4-2.9e-3 relative error), which the script logs last.
"""
import functools
import logging
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from lease.attention import _single_query
from benchmarks.train import _fwd_bwd, _packed_qkv, _pinned_sdpa, time_cuda
from lease.train import compile_for_training

SHAPES = {"encoder": (12, 129, 64), "decoder": (16, 257, 48)}  # heads, tokens, head dim (ViT-B)
BATCH = 256


def cls_query_apart(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    cls_row = _single_query(q[:, :, 0], k, v, dropout_p)
    rest = _pinned_sdpa(SDPBackend.CUDNN_ATTENTION, q[:, :, 1:], k, v, dropout_p=dropout_p)
    return torch.cat([cls_row[:, :, None], rest], 2)


def relative_errors(attend) -> list[float]:
    """Output, dq, dk, dv against fp64 SDPA at the decoder's shape, batch 8, no dropout."""
    heads, tokens, head_dim = SHAPES["decoder"]
    q, k, v = (torch.randn(8, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    out = attend(q, k, v, dropout_p=0.0)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*exact)
    ref_grads = torch.autograd.grad(ref, exact, grad.double())
    pairs = zip((out, *grads), (ref, *ref_grads))
    return [float((a.detach().double() - b.detach()).norm() / b.detach().norm()) for a, b in pairs]


def main() -> None:
    compiled = compile_for_training(cls_query_apart, "default", dynamic=False)
    cudnn = functools.partial(_pinned_sdpa, SDPBackend.CUDNN_ATTENTION)
    for (part, (heads, tokens, head_dim)), dropout in ((s, p) for s in SHAPES.items() for p in (0.1, 0.0)):
        for name, attend, n in (("cuDNN", cudnn, tokens), ("this variant", compiled, tokens),
                                ("cuDNN without [CLS]", cudnn, tokens - 1)):
            step = functools.partial(_fwd_bwd, functools.partial(attend, dropout_p=dropout),
                                     *_packed_qkv(BATCH, n, heads, head_dim))
            ms = statistics.median(time_cuda(step, warmup=5, steps=50))
            logging.info("%s dropout %g %s (N=%d): %.3f ms", part, dropout, name, n, ms)
    errors = " ".join(f"{e:.1e}" for e in relative_errors(compiled))
    logging.info("relative error vs fp64 (out, dq, dk, dv): %s", errors)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
