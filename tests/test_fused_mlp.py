"""The fused MLP backward (lease/fused_mlp.py) against autograd through the module graph.

Its Triton GEMM runs here on the CPU through Triton's interpreter (in a subprocess: the interpreter is
chosen when a kernel is defined), in fp32, since the interpreter's 16-bit matmul is not exact; the CUDA
tests run the same comparison in bf16 on the GPU.
"""
import json
import os
import subprocess
import sys

import pytest

from lease.configs import ModelConfig
from lease.typed_config import ConfigError, from_dict

pytest.importorskip("triton")

COMPARE = r"""
import json, sys
import torch.nn as nn
from lease.dropout import draw_keep_bits, keep_scale, unpack_bits
from lease.fused_mlp import fused_gelu_mlp

rows, dim, hidden, p = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
torch.manual_seed(0)
fc1, fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
x = torch.randn(rows, dim, requires_grad=True)
grad_out = torch.randn(rows, dim)
params = [x, fc1.weight, fc1.bias, fc2.weight, fc2.bias]

def run(forward):
    for t in params:
        t.grad = None
    torch.manual_seed(1)
    out = forward()
    out.backward(grad_out)
    return [out.detach()] + [t.grad.clone() for t in params]

def module_path():
    hidden_act = nn.functional.gelu(fc1(x))
    if p > 0:
        keep = unpack_bits(draw_keep_bits(hidden_act.numel(), p, x.device), hidden_act.numel())
        hidden_act = hidden_act * keep.view(hidden_act.shape) * keep_scale(p)
    return fc2(hidden_act)

fused, reference = run(lambda: fused_gelu_mlp(x, fc1, fc2, p)), run(module_path)
names = ["out", "x", "w1", "b1", "w2", "b2"]
torch.manual_seed(1)
dropped = 1 - unpack_bits(draw_keep_bits(rows * hidden, p, x.device), rows * hidden).float().mean() if p > 0 else 0
json.dump({n: ((a - b).abs().max() / b.abs().max()).item() for n, a, b in zip(names, fused, reference)}
          | {"dropped": float(dropped)}, sys.stdout)
"""


def compare_interpreted(rows: int, dim: int, hidden: int, p: float) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", COMPARE, str(rows), str(dim), str(hidden), str(p)], env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise AssertionError(f"interpreted script failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


@pytest.mark.parametrize("p", [0.1, 0.0])
def test_fused_mlp_backward_matches_autograd(p):
    # sizes that leave partial tiles on every axis: rows and hidden columns past a multiple of the
    # block, and a reduction shorter than one K block
    errors = compare_interpreted(rows=300, dim=40, hidden=160, p=p)
    assert abs(errors["dropped"] - p) < 0.01  # the masks compared were real ones
    for name in ("out", "x", "w1", "b1", "w2", "b2"):
        assert errors[name] < 1e-5, (name, errors)


def test_mlp_backward_switch_is_validated():
    assert from_dict(ModelConfig, {"mlp_backward": "fused"}).mlp_backward == "fused"
    with pytest.raises(ConfigError, match="mlp_backward"):
        from_dict(ModelConfig, {"mlp_backward": "triton"})
