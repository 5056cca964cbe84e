"""Compile lease/kernels_attention.py's kernels for sm_90 without a GPU and print their resources.

    python benchmarks/exploratory/compile_attention_sm90.py [BM BN warps stages ...]

Catches what Triton's interpreter does not (globals, constexpr use, layouts) and reports registers,
spills and shared memory per kernel and tile choice (Triton's own ptxas).
"""
import os
import sys

from benchmarks.sass import compile_for, resources
from lease import kernels_attention as ka

TYPES = {"ptr": "*bf16", "lse_ptr": "*fp32", "seed_ptr": "*i64", "out_ptr": "*u8"}


def param_type(name: str) -> str:
    if name in TYPES:
        return TYPES[name]
    if name.endswith("_ptr"):
        return TYPES["ptr"]
    return "fp32" if name in ("keep_factor", "qk_scale", "sm_scale") else "i32"


def compile_one(fn, constexprs, warps, stages):
    k = compile_for(fn, constexprs, param_type, num_warps=warps, num_stages=stages)
    regs, stack = resources(k)
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
