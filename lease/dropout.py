"""Dropout whose random mask costs one Philox call per eight elements on CUDA.

`torch.compile` lowers dropout to one Philox-4x32-10 call per element and keeps one of its four 32-bit
words. A ViT-B LEASE step makes about 4·10⁹ keep/drop decisions outside attention, so that RNG is a
visible share of the step. Here a Triton kernel uses all 128 bits of each call as eight 16-bit uniforms
u, and keeps an element when u ≥ t with t = round(p·2¹⁶). The drop probability is therefore
p' = t / 2¹⁶ (p = 0.1 gives 0.1000061) and survivors are scaled by 1 / (1 − p'), so E[out] = x exactly.

The kernel writes the mask bit-packed, one byte per Philox call. Unpacking it is ordinary tensor code,
so `torch.compile` fuses it, and the multiply, into the kernels that apply the mask; the backward pass
keeps only the packed bytes.

Each call draws a fresh 62-bit Philox key from torch's CUDA generator, so masks follow
`torch.manual_seed` and the generator state saved in checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton ships with the CUDA builds of torch; without it dropout falls back to torch's kernel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

UNIFORM_BITS = 16
DRAWS_PER_CALL = 128 // UNIFORM_BITS  # uniforms per Philox-4x32 call
SEED_BOUND = 2**62
BYTES_PER_PROGRAM = 1024  # mask bytes (Philox calls) per Triton program


def drop_threshold(p: float) -> int:
    """t with keep ⇔ u ≥ t for a 16-bit uniform u; the realised drop probability is t / 2¹⁶."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * 2**UNIFORM_BITS)


def keep_scale(p: float) -> float:
    """1 / (1 − p') for the realised drop probability p' of `drop_threshold`."""
    return threshold_scale(drop_threshold(p))


def threshold_scale(threshold: int) -> float:
    """1 / (1 − t / 2¹⁶): the survivors' scale for the threshold t of `drop_threshold`."""
    return 1.0 / (1.0 - threshold / 2**UNIFORM_BITS)


if triton is not None:
    @triton.jit
    def _keep_bits(word, threshold, shift: tl.constexpr):
        """Keep decisions from the low and high 16 bits of a 32-bit word, as bits `shift` and `shift + 1`."""
        low = ((word & 0xFFFF) >= threshold).to(tl.uint8) << shift
        return low | (((word >> 16) >= threshold).to(tl.uint8) << (shift + 1))

    @triton.jit
    def _keep_mask_kernel(seed_ptr, out_ptr, num_bytes, threshold, BLOCK: tl.constexpr):
        # Philox counter c gives byte c of the mask: the eight decisions for elements 8c .. 8c+7.
        seed = tl.load(seed_ptr)
        counter = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w0, w1, w2, w3 = tl.randint4x(seed, counter)
        bits = _keep_bits(w0, threshold, 0) | _keep_bits(w1, threshold, 2) | _keep_bits(w2, threshold, 4)
        bits = bits | _keep_bits(w3, threshold, 6)
        tl.store(out_ptr + counter, bits, mask=counter < num_bytes)

    @torch.library.triton_op("lease::philox_keep_bits", mutates_args=())
    def philox_keep_bits(seed: torch.Tensor, num_bytes: int, threshold: int) -> torch.Tensor:
        """uint8 [num_bytes]: bit j of byte c keeps element 8c + j; Philox key from int64 `seed` [1]."""
        out = torch.empty(num_bytes, dtype=torch.uint8, device=seed.device)

        def grid(meta):
            return (triton.cdiv(num_bytes, BYTES_PER_PROGRAM),)

        torch.library.wrap_triton(_keep_mask_kernel)[grid](seed, out, num_bytes, threshold, BLOCK=BYTES_PER_PROGRAM)
        return out


def fast_dropout_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """bool [numel] from a bit-packed uint8 mask (element i is bit i % 8 of byte i // 8).

    Under `torch.compile` this indexing fuses into the kernel that applies the mask, so only the
    packed bytes travel through memory (and are what the backward pass saves).
    """
    shifts = torch.arange(DRAWS_PER_CALL, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten()[:numel].bool()


class _MaskedScale(torch.autograd.Function):
    """x · mask · scale with the mask given bit-packed; the backward pass keeps only the packed bytes.

    (Left to itself, `torch.compile`'s partitioner saves the unpacked mask, which costs a byte per element
    of writes in the forward pass and of reads in the backward pass.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.scale = scale
        return x * unpack_bits(packed, x.numel()).view(x.shape) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (packed,) = ctx.saved_tensors
        return grad * unpack_bits(packed, grad.numel()).view(grad.shape) * ctx.scale, None, None


def keep_bits(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """A fresh bit-packed keep mask for `numel` elements (CUDA): one Philox key from torch's generator."""
    seed = torch.randint(0, SEED_BOUND, (1,), device=device, dtype=torch.int64)
    return philox_keep_bits(seed, -(-numel // DRAWS_PER_CALL), drop_threshold(p))


def philox_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of `x` (CUDA) with a fresh Philox key: drop probability p' = drop_threshold(p) / 2¹⁶."""
    return _MaskedScale.apply(x, keep_bits(x.numel(), p, x.device), keep_scale(p))


class Dropout(nn.Module):
    """`nn.Dropout` with the cheap Philox mask (`impl="triton"`) in CUDA code that `torch.compile` traces.

    Run eagerly, unpacking the mask and applying it are separate passes over memory, slower than torch's
    one fused dropout kernel, which is used there and on the CPU.
    """

    def __init__(self, p: float, impl: str = "triton"):
        super().__init__()
        drop_threshold(p)  # validates p
        self.p, self.impl = p, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.impl == "triton" and fast_dropout_available(x) and torch.compiler.is_compiling():
            return philox_dropout(x, self.p)
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, impl={self.impl}"
