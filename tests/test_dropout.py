"""The Philox dropout mask (lease/dropout.py): its statistics, layout and determinism.

The Triton kernel runs on the GPU when there is one, and otherwise on the CPU through Triton's
interpreter, in a subprocess because the interpreter is chosen when the kernel is defined.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from lease.dropout import Dropout, drop_threshold, keep_scale, unpack_bits

pytest.importorskip("triton")

MASK_STATS = r"""
import json, sys
import torch
from lease.dropout import DRAWS_PER_CALL, drop_threshold, philox_keep_bits, unpack_bits

n, p, device = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
t, num_bytes = drop_threshold(p), -(-n // DRAWS_PER_CALL)
mask = lambda seed: unpack_bits(philox_keep_bits(torch.tensor([seed], device=device), num_bytes, t), n).cpu()
a, again, other = mask(1234), mask(1234), mask(1235)
# element 8c + j is bit j of byte c: the low or high half of Philox word j // 2 of counter c
lanes = a[: n - n % DRAWS_PER_CALL].view(-1, DRAWS_PER_CALL).float()
lane_drop = (1 - lanes.mean(dim=0)).tolist()
centred = lanes - lanes.mean()
lane_corr = max(abs(float((centred[:, i] * centred[:, j]).mean() / centred.var()))
                for i in range(DRAWS_PER_CALL) for j in range(i + 1, DRAWS_PER_CALL))
f = a.float() - a.float().mean()
json.dump({"drop": 1 - a.float().mean().item(), "same_seed_equal": bool(torch.equal(a, again)),
           "other_seed_differ": (a ^ other).float().mean().item(), "lane_drop": lane_drop,
           "lane_corr": lane_corr, "neighbour_corr": float((f[1:] * f[:-1]).mean() / f.var()),
           "tail_dtype": str(a.dtype), "len": a.numel()}, sys.stdout)
"""


def run_kernel(n: int, p: float) -> dict:
    """MASK_STATS on the GPU, or through Triton's interpreter without one; a failure shows the
    script's stderr."""
    device, env = ("cuda", dict(os.environ)) if torch.cuda.is_available() else \
        ("cpu", {**os.environ, "TRITON_INTERPRET": "1"})
    out = subprocess.run([sys.executable, "-c", MASK_STATS, str(n), str(p), device], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise AssertionError(f"interpreted script failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def test_philox_mask_drops_at_the_rate_with_independent_lanes():
    n, p = 8 * 1024 * 40 + 123, 0.1  # a partial last block and a partial last byte too
    stats = run_kernel(n, p)
    assert stats["len"] == n and stats["tail_dtype"] == "torch.bool"
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(stats["drop"] - p) < 5 * sigma
    assert stats["same_seed_equal"]
    assert abs(stats["other_seed_differ"] - 2 * p * (1 - p)) < 0.01  # independent masks disagree this often
    lane_sigma = (p * (1 - p) / (n // 8)) ** 0.5
    assert all(abs(d - p) < 5 * lane_sigma for d in stats["lane_drop"])  # both 16-bit halves of all 4 words
    assert stats["lane_corr"] < 0.02 and abs(stats["neighbour_corr"]) < 0.02


def test_threshold_and_scale_keep_the_expectation_exact():
    t = drop_threshold(0.1)
    assert t == 6554 and abs(t / 2**16 - 0.1) < 1e-5
    assert keep_scale(0.1) * (1 - t / 2**16) == pytest.approx(1.0, abs=1e-15)
    assert drop_threshold(0.0) == 0 and keep_scale(0.0) == 1.0
    with pytest.raises(ValueError, match="dropout probability"):
        drop_threshold(1.0)


def test_dropout_module_is_identity_in_eval_and_torch_dropout_on_cpu():
    x = torch.randn(4, 8)
    drop = Dropout(0.5, "triton")
    assert torch.equal(drop.eval()(x), x)
    drop.train()
    torch.manual_seed(0)
    ours = drop(x)
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.5, training=True))  # CPU: torch's kernel


def test_unpacked_bits_follow_element_order():
    packed = torch.tensor([0b00000101, 0b11111111], dtype=torch.uint8)
    assert unpack_bits(packed, 10).tolist() == [True, False, True, False, False, False, False, False, True, True]


def test_masked_scale_backward_uses_the_same_mask():
    from lease.dropout import _MaskedScale
    x = torch.randn(5, 7, requires_grad=True)
    packed = torch.randint(0, 256, (5,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(5, 7)
    _MaskedScale.apply(x, packed, 2.0).backward(grad)
    keep = unpack_bits(packed, 35).view(5, 7)
    assert 0 < keep.sum() < 35
    assert torch.equal(x.grad, grad * keep * 2.0)
