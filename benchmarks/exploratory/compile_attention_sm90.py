"""Compile lease/kernels_attention.py's kernels for sm_90 without a GPU and print their resources.

    python benchmarks/exploratory/compile_attention_sm90.py [BM BN warps stages ...]

Catches what Triton's interpreter does not (globals, constexpr use, layouts) and reports registers,
spills and shared memory per kernel and tile choice (Triton's own ptxas).
"""
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lease import kernels_attention as ka

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {"ptr": "*bf16", "lse_ptr": "*fp32", "seed_ptr": "*i64", "out_ptr": "*u8", "float": "fp32", "int": "i32"}


def signature(fn, constexprs):
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("lse_ptr", "seed_ptr", "out_ptr"):
            sig[name] = TYPES[name]
        elif name.endswith("_ptr"):
            sig[name] = TYPES["ptr"]
        elif name in ("keep_factor", "qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(fn, constexprs, warps, stages):
    src = ASTSource(fn=fn, signature=signature(fn, constexprs), constexprs=constexprs)
    k = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    return regs, stack, k.metadata.shared


def main(configs):
    for bm, bn, warps, stages in configs:
        for d in (64, 48)[:int(os.environ.get("HEAD_DIMS", 2))]:
            for has_cls in (True, False)[:int(os.environ.get("CLS_CASES", 2))]:
                common = {"D": d, "DP": 64, "BM": bm, "BN": bn, "HAS_CLS": has_cls, "DROPOUT": True}
                for fn in (ka._attn_fwd_kernel, ka._attn_dkdv_kernel, ka._attn_dq_kernel):
                    regs, stack, smem = compile_one(fn, common, warps, stages)
                    print(f"{fn.fn.__name__:>20} BM={bm} BN={bn} w={warps} s={stages} D={d} cls={has_cls}: "
                          f"{regs} regs, {stack} B stack, {smem} B shared", flush=True)
    print(compile_one(ka._keep_slots_kernel, {"BN": 16}, 4, 2))


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]] or [64, 64, 4, 2]
    main([tuple(args[i:i + 4]) for i in range(0, len(args), 4)])
