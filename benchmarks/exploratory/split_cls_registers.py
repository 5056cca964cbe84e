"""Registers and local-memory stack (spills) of lease/attention.py's kernels compiled for sm_90, without a
GPU (Triton's own ptxas and cuobjdump), at the ViT-B head dims and the module's tile sizes.

    python benchmarks/exploratory/split_cls_registers.py [warps ...]

On 2026-12-04 (Triton 3.8), 4 warps: 64-row tiles took 244-255 registers and spilled up to 88 bytes of
stack; the 16-row / 16-key tiles the module now uses take 64-92 (124 for the [CLS] row's forward at head
dim 48), with no stack.
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

from lease import attention as at

FP32_POINTERS = ("lsep_ptr", "lse_ptr", "beta_ptr", "lse_row_ptr", "part_ptr", "qpart_ptr")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
KERNELS = [(at._split_cls_column_fwd_kernel, {"BM": at.BLOCK_ROWS}), (at._split_cls_row_fwd_kernel, {"BN": at.ROW_STEP}),
           (at._split_cls_column_bwd_kernel, {"BM": at.BLOCK_ROWS}),
           (at._split_cls_keys_bwd_kernel, {"BN": at.BLOCK_KEYS, "CLS_QUERY": True})]


def resources(kernel, consts: dict, warps: int) -> tuple[str, str]:
    params = inspect.signature(kernel.fn).parameters
    consts = {k: v for k, v in consts.items() if k in params}
    signature = {n: "constexpr" if n in consts else "*fp32" if n in FP32_POINTERS else "*u8" if n == "keep_ptr"
                 else "*bf16" if n.endswith("_ptr") else "i32" for n in params}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return re.search(r"REG:(\d+)", usage).group(1), re.search(r"STACK:(\d+)", usage).group(1)


def main(warps_list: list[int]) -> None:
    for head_dim in (64, 48):
        common = {"SCALE": head_dim ** -0.5, "KEEP": 1 / 0.9, "D": head_dim, "DP": 64, "DROPOUT": True, "WIDE": False}
        for kernel, extra in KERNELS:
            for warps in warps_list:
                regs, stack = resources(kernel, {**common, **extra}, warps)
                print(f"d={head_dim} {kernel.fn.__name__:>30} {warps} warps: {regs} registers, {stack} B stack", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [at.NUM_WARPS])
