"""The Triton attention kernels (lease/attention.py) against an fp64 reference, on the CPU.

The kernels run through Triton's interpreter in a subprocess (the interpreter is chosen when the
kernels are defined). The reference applies the very keep mask the forward pass returns, so outputs
and all three gradients must match to fp32 rounding, dropout included.
"""
import json
import os
import subprocess
import sys

import pytest

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


def run_interpreted(nq: int, nk: int, d: int, p: float, block_m: int = 32, block_n: int = 32) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK, *map(str, (nq, nk, d, p, block_m, block_n))], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("nq, nk, d, p", [
    (37, 37, 16, 0.0),   # only tail tiles on both axes
    (70, 45, 24, 0.3),   # bulk + tail tiles, queries ≠ keys (the decoder's masked rows), head dim not 2^k
    (64, 64, 32, 0.1),   # no tail at all
])
def test_forward_and_gradients_match_the_reference_with_the_kernels_own_mask(nq, nk, d, p):
    r = run_interpreted(nq, nk, d, p)
    assert r["contiguous"]
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (key, r[key])
    assert r["lse"] < 1e-5
    if p > 0:
        n = 2 * 3 * nq * nk
        assert abs(r["drop"] - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_keep_mask_does_not_depend_on_the_tiling():
    a = run_interpreted(70, 45, 16, 0.2, block_m=32, block_n=32)
    b = run_interpreted(70, 45, 16, 0.2, block_m=64, block_n=16)
    assert a["keep_bits"] == b["keep_bits"] and len(a["keep_bits"]) == 2 * 3 * 70 * 45
