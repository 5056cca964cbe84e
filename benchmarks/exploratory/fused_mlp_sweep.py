"""The fused MLP backward's Triton GEMM (lease/fused_mlp.py) at ViT-B's MLP shapes: bf16 agreement with the
module path, and its time per tile shape against cuBLAS plus the compile-fused elementwise kernels.

Exploratory measurement behind the README's "Two follow-ups" paragraph. It runs at commit 7a41f24 only
(the fused MLP backward it measures was reverted in the next commit), on a CUDA GPU:
    git checkout 7a41f24 && PYTHONPATH=. .venv/bin/python benchmarks/exploratory/fused_mlp_sweep.py
"""
import torch
import torch.nn as nn
from triton.testing import do_bench
import lease.fused_mlp as fm
from lease.dropout import draw_keep_bits, keep_scale, unpack_bits
torch.manual_seed(0)
dev = "cuda"
P = 0.1

# 1. correctness in bf16 at the decoder shape (eager), same masks
rows, dim, hidden = 256 * 257, 768, 3072
fc1, fc2 = nn.Linear(dim, hidden).to(dev), nn.Linear(hidden, dim).to(dev)
x = torch.randn(rows, dim, device=dev, requires_grad=True)
g = torch.randn(rows, dim, device=dev)
params = [x, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
def run(forward):
    for t in params: t.grad = None
    torch.manual_seed(1)
    with torch.autocast("cuda", torch.bfloat16):
        out = forward()
    out.float().backward(g)
    return [out.detach().float()] + [t.grad.clone() for t in params]
def module_path():
    h = nn.functional.gelu(fc1(x))
    keep = unpack_bits(draw_keep_bits(h.numel(), P, x.device), h.numel())
    return fc2(h * keep.view(h.shape) * keep_scale(P))
a, b = run(lambda: fm.fused_gelu_mlp(x, fc1, fc2, P)), run(module_path)
for n, u, v in zip(["out", "x", "w1", "b1", "w2", "b2"], a, b):
    print(f"CHECK {n}: max rel err {((u - v).abs().max() / v.abs().max()).item():.2e}, cos {torch.nn.functional.cosine_similarity(u.flatten(), v.flatten(), 0).item():.6f}")

# 2. kernel config sweep vs unfused chain (compiled)
def unfused(grad, w2, h, bits):
    d = grad @ w2
    keep = unpack_bits(bits, h.numel()).view(h.shape)
    hf = h.float()
    cdf = 0.5 * (1 + torch.erf(hf * 0.7071067811865476))
    dh = (d.float() * keep * keep_scale(P) * (cdf + hf * torch.exp(-0.5 * hf * hf) * 0.3989422804014327)).to(h.dtype)
    return dh, dh.float().sum(0)
cu = torch.compile(unfused)
for M in (256 * 257, 256 * 129):
    grad = torch.randn(M, dim, device=dev, dtype=torch.bfloat16)
    w2 = torch.randn(dim, hidden, device=dev, dtype=torch.bfloat16) * 0.03
    h = torch.randn(M, hidden, device=dev, dtype=torch.bfloat16)
    bits = draw_keep_bits(M * hidden, P, h.device)
    ref = do_bench(lambda: cu(grad, w2, h, bits), warmup=50, rep=300)
    mm = do_bench(lambda: grad @ w2, warmup=50, rep=300)
    print(f"SWEEP M={M}: unfused compiled {ref*1e3:.0f} us (cuBLAS mm alone {mm*1e3:.0f} us)")
    for bm, bn, bk, w, s, gm in [(128,128,64,8,3,8),(128,128,64,4,4,8),(128,128,64,8,4,8),(128,256,64,8,3,8),(128,256,64,8,4,8),
                                  (128,128,128,8,3,8),(256,128,64,8,3,8),(64,256,64,4,4,8),(128,256,32,8,5,8),(128,128,64,4,3,8)]:
        fm.BLOCK_M, fm.BLOCK_N, fm.BLOCK_K, fm.NUM_WARPS, fm.NUM_STAGES, fm.GROUP_M = bm, bn, bk, w, s, gm
        try:
            t = do_bench(lambda: fm.mlp_hidden_grad(grad, w2, h, bits, keep_scale(P), True), warmup=50, rep=300)
            out = fm.mlp_hidden_grad(grad, w2, h, bits, keep_scale(P), True)
            r = cu(grad, w2, h, bits)
            err = ((out[0].float() - r[0].float()).abs().max() / r[0].float().abs().max()).item()
            print(f"SWEEP M={M} BM={bm} BN={bn} BK={bk} warps={w} stages={s}: {t*1e3:.0f} us  (rel err {err:.1e})", flush=True)
        except Exception as e:
            print(f"SWEEP M={M} BM={bm} BN={bn} BK={bk} warps={w} stages={s}: failed {type(e).__name__}: {str(e)[:100]}")
