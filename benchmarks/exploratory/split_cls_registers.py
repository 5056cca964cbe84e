"""Registers and local-memory stack (spills) of lease/attention.py's kernels compiled for sm_90, without a
GPU (Triton's own ptxas and cuobjdump, `benchmarks.sass`), at the ViT-B head dims and the module's tiles.

    python benchmarks/exploratory/split_cls_registers.py [warps ...]

On 2026-12-04 (Triton 3.8), 4 warps: 64-row tiles took 244-255 registers and spilled up to 88 bytes of
stack; the 16-row / 16-key tiles the module now uses take 64-92 (124 for the [CLS] row's forward at head
dim 48), with no stack.
"""
import sys

from benchmarks.sass import compile_for, resources, split_cls_kernels, split_cls_param_type
from lease.attention import NUM_WARPS


def main(warps_list: list[int]) -> None:
    for head_dim in (64, 48):
        for kernel, consts in split_cls_kernels(head_dim):
            for warps in warps_list:
                regs, stack = resources(compile_for(kernel, consts, split_cls_param_type, num_warps=warps))
                print(f"d={head_dim} {kernel.fn.__name__:>30} {warps} warps: {regs} registers, {stack} B stack", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [NUM_WARPS])
