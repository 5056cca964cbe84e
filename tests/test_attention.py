"""The Triton attention kernels (lease/attention.py) against a reference.

On the CPU the kernels run through Triton's interpreter (`triton_interpreter`) against an fp64
reference that applies the very keep mask the forward pass returns, so outputs and all three gradients
must match to fp32 rounding, dropout included. On a GPU they are also checked in bf16 at the ViT-B
shapes, and a compiled model using them against one using SDPA.
"""
import math

import pytest
import torch
from triton_interpreter import run_interpreted

import lease.attention as A
from lease.configs import model_config
from lease.masking import random_plan
from lease.model import LeaseModel

pytest.importorskip("triton")

CHECK = r"""
import json, math, sys
import torch
import lease.attention as A

nq, nk, d, p, block_m, block_n = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                  int(sys.argv[5]), int(sys.argv[6]))
A.TILING = A.Tiling(block_m=block_m, block_n=block_n)
b, h = 2, 3
gen = torch.Generator().manual_seed(0)
packed = torch.randn(b, max(nq, nk), 3, h, d, generator=gen)  # q, k, v as strided views, as in the model
q, k, v = packed[:, :nq, 0], packed[:, :nk, 1], packed[:, :nk, 2]
seed = torch.tensor([2**61 + 12345])
out, lse, mask = A.attention_forward(q, k, v, seed, p)
grad = torch.randn(out.shape, generator=gen)
dq, dk, dv = A.attention_backward(grad, q, k, v, out, lse, mask, p)
if p > 0:
    keep = ((mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)[..., :nk].double()
else:
    keep = torch.ones(b, h, nq, nk, dtype=torch.float64)
qd, kd, vd = (t.double().transpose(1, 2).requires_grad_() for t in (q, k, v))
scores = qd @ kd.transpose(-1, -2) / math.sqrt(d)
ref = ((torch.softmax(scores, -1) * keep * A.keep_scale(p)) @ vd).transpose(1, 2)
ref.backward(grad.double())
err = lambda a, r: float((a.double() - r).abs().max() / r.abs().max())
json.dump({"out": err(out, ref), "dq": err(dq, qd.grad.transpose(1, 2)), "dk": err(dk, kd.grad.transpose(1, 2)),
           "dv": err(dv, vd.grad.transpose(1, 2)),
           "lse": float((lse.double() - torch.logsumexp(scores, -1) / math.log(2)).abs().max()),
           "contiguous": out.is_contiguous() and list(out.shape) == [b, nq, h, d],
           "drop": 1 - float(keep.mean()), "keep_bits": keep.flatten().tolist() if p > 0 else []}, sys.stdout)
"""


def check(nq: int, nk: int, d: int, p: float, block_m: int = 32, block_n: int = 32) -> dict:
    return run_interpreted(CHECK, nq, nk, d, p, block_m, block_n)


@pytest.mark.parametrize("nq, nk, d, p", [
    (37, 37, 16, 0.0),   # only tail tiles on both axes
    (70, 45, 24, 0.3),   # bulk + tail tiles, queries ≠ keys (the decoder's masked rows), head dim not 2^k
    (64, 64, 32, 0.1),   # no tail at all
])
def test_forward_and_gradients_match_the_reference_with_the_kernels_own_mask(nq, nk, d, p):
    r = check(nq, nk, d, p)
    assert r["contiguous"]
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (key, r[key])
    assert r["lse"] < 1e-5
    if p > 0:
        n = 2 * 3 * nq * nk
        assert abs(r["drop"] - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_keep_mask_does_not_depend_on_the_tiling():
    a = check(70, 45, 16, 0.2, block_m=32, block_n=32)
    b = check(70, 45, 16, 0.2, block_m=64, block_n=16)
    assert a["keep_bits"] == b["keep_bits"] and len(a["keep_bits"]) == 2 * 3 * 70 * 45


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("heads, tokens, head_dim", [(12, 129, 64), (16, 257, 48)])  # ViT-B encoder, decoder
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_kernels_match_the_reference_in_bf16(heads, tokens, head_dim, p):
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randn(4, tokens, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = packed.unbind(2)
    out, lse, mask = A.attention_forward(q, k, v, torch.tensor([7], device="cuda"), p)
    grad = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    grads = A.attention_backward(grad, q, k, v, out, lse, mask, p)
    keep = ((mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device="cuda")) & 1).flatten(-2)[..., :tokens] \
        if p > 0 else torch.ones(1, device="cuda")
    qf, kf, vf = (t.float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    probs = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(head_dim), -1)
    ref = ((probs * keep * A.keep_scale(p)) @ vf).transpose(1, 2)
    ref.backward(grad.float())
    for got, want in zip((out, *grads), (ref.detach(), *(t.grad.transpose(1, 2) for t in (qf, kf, vf)))):
        assert float((got.float() - want).abs().max() / want.abs().max()) < 0.02


@cuda
def test_cuda_compiled_model_with_triton_attention_gives_sdpa_losses_and_gradients():
    """Whole model, dropout off, bf16 autocast: the compiled Triton-attention step against eager SDPA."""
    models = {}
    for backend in ("sdpa", "triton"):
        torch.manual_seed(0)
        cfg = model_config("tiny", attention_backend=backend, dropout=0.0, attn_dropout=0.0, codebook_dim=32)
        models[backend] = LeaseModel(cfg).cuda().train()
        models[backend].set_codebook(torch.randn(64, 32))
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_gen, (8, cfg.seq_len), device="cuda", generator=gen)
    disc = torch.randint(0, 64, (8, cfg.seq_len), device="cuda", generator=gen)
    plan = random_plan(8, cfg.seq_len, cfg.seq_len // 2, cfg.seq_len * 3 // 4, torch.device("cuda"), gen, 16)
    losses, grads = {}, {}
    for backend, model in models.items():
        step = torch.compile(model) if backend == "triton" else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step(tokens, disc, plan)
        out.loss.backward()
        losses[backend] = out.loss.float()
        grads[backend] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(losses["triton"], losses["sdpa"], rtol=2e-3)
    assert grads["triton"].keys() == grads["sdpa"].keys()
    for name, g in grads["sdpa"].items():
        assert float((grads["triton"][name] - g).norm() / g.norm().clamp_min(1e-12)) < 0.03, name
