"""Triton kernels compiled for a GPU architecture without a GPU (`compile_for`; registers and spills by
`resources`), and the instruction floors read from their SASS: how many instructions per element the
exact-erf GELU passes need.

The GELU + dropout passes on the MLP's 4C-wide tensors are bound by instruction issue rather than by
memory: the exact GELU's erf alone compiles to about 30 instructions per element, more than a
bandwidth-bound pass leaves time for. Their floor is therefore the larger of their bytes over the copy
rate and their instructions over the issue rate (each SM issues four warp instructions per clock, 128
thread instructions).

The count comes from reference Triton kernels that do the passes' arithmetic (the model's GELU,
`nn.GELU()` with erf, and its dropout with the bit-packed mask of `lease/dropout.py`), compiled for the
GPU's architecture with Triton's own ptxas and disassembled with its cuobjdump, which needs no GPU.
Each thread handles a fixed number of elements in straight-line code, so static instructions over
elements per thread is what each element costs. The kernels load eight elements per mask byte, the
cheapest unpacking found; inductor's kernels count more (their time over this floor says how much).
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from typing import Any, Callable

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROWS_PER_PROGRAM = 128  # mask bytes per program: 8 elements each, one byte per thread at 4 warps
NUM_WARPS = 4
THREAD_INSTRUCTIONS_PER_SM_CLOCK = 4 * 32  # four schedulers, one warp instruction each per clock
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _offsets_and_keep(bits_ptr, ROWS: tl.constexpr):
    """Element offsets [ROWS, 8] of this program and their keep decisions (bit j of byte r)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    lanes = tl.arange(0, 8)
    bits = tl.load(bits_ptr + rows)
    keep = ((bits[:, None] >> lanes[None, :].to(tl.uint8)) & 1) != 0
    return rows[:, None] * 8 + lanes[None, :], keep


@triton.jit
def gelu_dropout_fwd_kernel(x_ptr, bits_ptr, y_ptr, scale, ROWS: tl.constexpr):
    """y = GELU(x) · keep · scale, GELU(x) = x · Φ(x) = ½ x (1 + erf(x / √2)); 16-bit x and y."""
    offsets, keep = _offsets_and_keep(bits_ptr, ROWS)
    x = tl.load(x_ptr + offsets).to(tl.float32)
    gelu = 0.5 * x * (1.0 + tl.math.erf(x * SQRT_HALF))
    tl.store(y_ptr + offsets, tl.where(keep, gelu * scale, 0.0).to(y_ptr.dtype.element_ty))


@triton.jit
def gelu_dropout_bwd_kernel(x_ptr, bits_ptr, dy_ptr, dx_ptr, scale, ROWS: tl.constexpr):
    """dx = dy · keep · scale · GELU'(x), GELU'(x) = Φ(x) + x φ(x)."""
    offsets, keep = _offsets_and_keep(bits_ptr, ROWS)
    x = tl.load(x_ptr + offsets).to(tl.float32)
    dy = tl.load(dy_ptr + offsets).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT_HALF))
    pdf = tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    tl.store(dx_ptr + offsets, tl.where(keep, dy * scale * (cdf + x * pdf), 0.0).to(dx_ptr.dtype.element_ty))


@triton.jit
def dropout_fwd_kernel(x_ptr, bits_ptr, y_ptr, scale, ROWS: tl.constexpr):
    """y = x · keep · scale: the same pass without GELU, to show what the erf costs."""
    offsets, keep = _offsets_and_keep(bits_ptr, ROWS)
    x = tl.load(x_ptr + offsets).to(tl.float32)
    tl.store(y_ptr + offsets, tl.where(keep, x * scale, 0.0).to(y_ptr.dtype.element_ty))


PASSES = {"forward": gelu_dropout_fwd_kernel, "backward": gelu_dropout_bwd_kernel, "dropout only": dropout_fwd_kernel}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def compile_for(kernel, constexprs: dict[str, Any], param_type: Callable[[str], str], arch: int = 90,
                **options: int):
    """`kernel` compiled for sm_`arch` (Triton's own ptxas: no GPU needed), every parameter that is not
    among `constexprs` (those of them the kernel takes) typed by `param_type(name)`; `options` such as
    num_warps, num_stages."""
    params = inspect.signature(kernel.fn).parameters
    constexprs = {k: v for k, v in constexprs.items() if k in params}
    signature = {n: "constexpr" if n in constexprs else param_type(n) for n in params}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def cuobjdump(compiled, flag: str) -> str:
    """cuobjdump's `flag` output (-sass, --dump-resource-usage) for a `compile_for` result."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([CUOBJDUMP, flag, cubin.name], capture_output=True, text=True, check=True).stdout


def resources(compiled) -> tuple[int, int]:
    """Registers per thread and local-memory stack bytes (spills) of a `compile_for` result."""
    usage = cuobjdump(compiled, "--dump-resource-usage")
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def _reference_param_type(name: str) -> str:
    return "fp32" if name == "scale" else "*u8" if name == "bits_ptr" else "*bf16"


def sass_instructions(kernel, arch: int) -> list[str]:
    """Opcodes of a reference kernel (PASSES) compiled for sm_`arch` with bf16 tensors, in program order
    (NOPs left out)."""
    compiled = compile_for(kernel, {"ROWS": ROWS_PER_PROGRAM}, _reference_param_type, arch, num_warps=NUM_WARPS)
    return [op for op in _INSTRUCTION.findall(cuobjdump(compiled, "-sass")) if op != "NOP"]


def instructions_per_element(arch: int = 90) -> dict[str, float]:
    """SASS instructions per element of each reference pass (PASSES) for sm_`arch`."""
    elements_per_thread = ROWS_PER_PROGRAM * 8 / (NUM_WARPS * 32)
    return {name: round(len(sass_instructions(kernel, arch)) / elements_per_thread, 2)
            for name, kernel in PASSES.items()}


SPLIT_CLS_FP32_POINTERS = ("lsep_ptr", "lse_ptr", "beta_ptr", "lse_row_ptr", "part_ptr", "qpart_ptr")


def split_cls_param_type(name: str) -> str:
    """The types `lease.attention`'s split_cls kernels take in training (bf16 activations, fp32 softmax
    state, uint8 keep flags, int32 sizes and strides)."""
    if name in SPLIT_CLS_FP32_POINTERS:
        return "*fp32"
    return "*u8" if name == "keep_ptr" else "*bf16" if name.endswith("_ptr") else "i32"


def split_cls_kernels(head_dim: int, cls_query: bool = True) -> list[tuple[Any, dict[str, Any]]]:
    """Each split_cls kernel with its compile-time constants at `head_dim`, dropout on, the module's tiles."""
    from lease import attention as at

    common = dict(SCALE=head_dim ** -0.5, KEEP=1 / 0.9, D=head_dim, DP=max(16, triton.next_power_of_2(head_dim)),
                  DROPOUT=True, WIDE=False)
    tiles = [(at._split_cls_column_fwd_kernel, {"BM": at.BLOCK_ROWS}), (at._split_cls_row_fwd_kernel, {"BN": at.ROW_STEP}),
             (at._split_cls_column_bwd_kernel, {"BM": at.BLOCK_ROWS}),
             (at._split_cls_keys_bwd_kernel, {"BN": at.BLOCK_KEYS, "CLS_QUERY": cls_query}),
             (at._split_cls_query_grad_kernel, {})]
    return [(kernel, {**common, **extra}) for kernel, extra in tiles]


def issue_rate(sm_count: int, sm_clock_mhz: float) -> float:
    """Thread instructions per second the GPU can issue at that clock."""
    return sm_count * THREAD_INSTRUCTIONS_PER_SM_CLOCK * sm_clock_mhz * 1e6
