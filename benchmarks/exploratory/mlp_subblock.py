"""One MLP sub-block (LayerNorm, fc1, GELU, dropout, fc2, residual) at ViT-B's decoder and encoder shapes,
forward + backward, compiled: argv[1] = default | autotune (inductor's max_autotune_gemm) | fused
(model.mlp_backward=fused).

Exploratory measurement behind the README's "Two follow-ups" paragraph. It runs at commit 7a41f24 only
(the fused MLP backward it measures was reverted in the next commit), on a CUDA GPU:
    git checkout 7a41f24 && PYTHONPATH=. .venv/bin/python benchmarks/exploratory/mlp_subblock.py {default,autotune,fused}
"""

import sys, time, torch
import torch.nn as nn
from lease.model import Mlp
from lease.dropout import Dropout

mode = sys.argv[1]
torch.manual_seed(0)
dev = "cuda"

def make(dim=768, hidden=3072):
    norm = nn.LayerNorm(dim, eps=1e-6).to(dev)
    mlp = Mlp(dim, hidden, Dropout(0.1), fused_backward=(mode == "fused")).to(dev)
    def f(x):
        with torch.autocast("cuda", torch.bfloat16):
            y = mlp(norm(x))
            return (x + y).to(y.dtype)
    return f, list(norm.parameters()) + list(mlp.parameters())

opts = {"max_autotune_gemm": True} if mode == "autotune" else {}
for name, rows in [("decoder", 256 * 257), ("encoder", 256 * 129)]:
    f, params = make()
    cf = torch.compile(f, options=opts)
    x = torch.randn(rows // 256, 256, 768, device=dev, dtype=torch.bfloat16).transpose(0, 1).contiguous().requires_grad_()
    g = torch.randn_like(x)
    t0 = time.time()
    for _ in range(3):
        cf(x).backward(g)
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(20):
            cf(x).backward(g)
        end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 20)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            cf(x).backward(g)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=90), flush=True)
    print(f"RESULT {mode} {name} rows={rows}: {sorted(times)[2]:.3f} ms fwd+bwd per MLP sub-block (compile {compile_s:.0f} s)", flush=True)
