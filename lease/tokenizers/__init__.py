"""Tokenizers of the offline precompute: generative (VQGAN codes) and discriminative (DINOv2 features).

Every generative tokenizer has one interface, whatever checkpoint it came from:

    codes = tok.encode(images)   # float [B,3,H,W] in [0,1]  ->  int64 [B,H/f,W/f]
    images = tok.decode(codes)   # int64 [B,h,w]             ->  float [B,3,hf,wf] in [0,1]

Each backend maps [0,1] to the range its network was trained on (MaskGIT VQGAN: [0,1]; taming: [-1,1]).
`load_vqgan(kind, checkpoint, ...)` builds one; `codes_to_uint16` is the storage conversion.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
from torch import nn

VQGAN_KINDS = ("maskgit", "taming")


class GenerativeTokenizer(ABC):
    """Images in [0,1] <-> grids of integer codes. Subclasses set the attributes below."""

    num_codes: int  # codebook size: codes are in [0, num_codes)
    grid_size: int  # codes per side for an `image_size` input (16 for the f16 VQGANs at 256 px)
    image_size: int  # the input side length the tokenizer is used at
    device: torch.device

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images [B,3,H,W] in [0,1] -> int64 codes [B,H/f,W/f]."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes [B,h,w] -> float32 images [B,3,hf,wf] clamped to [0,1]."""

    def check_images(self, images: torch.Tensor) -> None:
        """Shape and dtype checks (no device sync): say what was passed and what is expected."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0,1], got {images.dtype} (divide uint8 images by 255)")
        factor = self.image_size // self.grid_size
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(f"image sides {tuple(images.shape[2:])} must be multiples of the downsampling "
                             f"factor {factor} (crop to {self.image_size}x{self.image_size})")

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 3:
            raise ValueError(f"expected codes [B,h,w], got shape {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got {codes.dtype}")


class ConvVQGANTokenizer(GenerativeTokenizer):
    """Shared execution of convolutional VQGANs: precision, memory layout, torch.compile, inference mode.

    The conv stacks run in `dtype` (bf16 by default on CUDA) with their weights cast once; GroupNorm on
    bf16 inputs still accumulates its statistics in fp32. The codebook and the nearest-code distances stay
    fp32. channels_last (default on CUDA) lets cuDNN pick its NHWC tensor-core kernels; `compile=True`
    wraps the encode and decode paths in torch.compile (fuses GroupNorm + swish + casts).
    Subclasses set `model`, implement `_encode_net` / `_decode_net` on network-range inputs and list the
    modules to cast.
    """

    model: nn.Module

    def __init__(self, *, num_codes: int, grid_size: int, image_size: int, input_range: tuple[float, float],
                 device: torch.device, dtype: torch.dtype | None = None, channels_last: bool | None = None,
                 compile: bool = False) -> None:
        self.num_codes, self.grid_size, self.image_size = num_codes, grid_size, image_size
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
        self.memory_format = torch.channels_last if (on_cuda if channels_last is None else channels_last) \
            else torch.contiguous_format
        self.input_low, self.input_high = input_range
        self.compiled = compile
        for module in self._conv_modules():
            module.to(dtype=self.dtype, memory_format=self.memory_format)
        self._encode_fn = torch.compile(self._encode_net, dynamic=False) if compile else self._encode_net
        self._decode_fn = torch.compile(self._decode_net, dynamic=False) if compile else self._decode_net

    def reconfigured(self, dtype: torch.dtype | None = None, channels_last: bool | None = None,
                     compile: bool | None = None) -> ConvVQGANTokenizer:
        """The same network with other execution options (None keeps the current one); for benchmarks.

        Casting to a lower precision and back does not restore the original fp32 weights.
        """
        return type(self)(self.model, dtype=dtype or self.dtype,
                          channels_last=self.memory_format == torch.channels_last if channels_last is None
                          else channels_last, compile=self.compiled if compile is None else compile)

    @abstractmethod
    def _conv_modules(self) -> list[nn.Module]:
        """The modules that run in `self.dtype` (everything but the codebook)."""

    @abstractmethod
    def _encode_net(self, x: torch.Tensor) -> torch.Tensor:
        """Network-range images (already in dtype and memory format) -> int64 codes [B,h,w]."""

    @abstractmethod
    def _decode_net(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes [B,h,w] -> network-range images."""

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        x = images.to(self.device, non_blocking=True)
        if (self.input_low, self.input_high) != (0.0, 1.0):
            x = x * (self.input_high - self.input_low) + self.input_low
        return self._encode_fn(x.to(dtype=self.dtype, memory_format=self.memory_format))

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_unclamped(codes).clamp_(0.0, 1.0)

    @torch.inference_mode()
    def decode_unclamped(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoder output mapped to [0,1] nominally, float32, without clamping (for exact comparisons)."""
        self.check_codes(codes)
        out = self._decode_fn(codes.to(self.device, torch.int64, non_blocking=True)).float()
        if (self.input_low, self.input_high) != (0.0, 1.0):
            out = (out - self.input_low) / (self.input_high - self.input_low)
        return out


def codes_to_uint16(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Codes as uint16 for storage, after checking they lie in [0, num_codes) and that uint16 can hold them.

    The range check reads two numbers back from the device (one sync per call): call it once per batch.
    """
    if num_codes > 1 << 16:
        raise ValueError(f"{num_codes} codes do not fit in uint16 (at most 65536)")
    if codes.is_floating_point():
        raise ValueError(f"expected integer codes, got {codes.dtype}")
    if codes.numel():
        lo, hi = (int(v) for v in torch.aminmax(codes))
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"codes span [{lo}, {hi}], outside [0, {num_codes}): wrong tokenizer or codebook size")
    return codes.to(torch.int32).to(torch.uint16)


def load_vqgan(kind: Literal["maskgit", "taming"], checkpoint: str | Path, config: str | Path | None = None,
               device: str | torch.device = "cpu", **options) -> GenerativeTokenizer:
    """A generative tokenizer from a checkpoint.

    kind "maskgit": MAGE's `vqgan_jax_strongaug.ckpt` (`config` unused: sizes come from the weights).
    kind "taming": a taming-transformers Lightning `.ckpt` with its YAML `config` (required).
    `options` go to the backend (dtype, channels_last, compile).
    """
    if kind == "maskgit":
        from lease.tokenizers.vqgan_maskgit import MaskGITTokenizer, load_maskgit_vqgan

        if config is not None:
            raise ValueError("kind='maskgit' reads its sizes from the checkpoint: pass no config file")
        return MaskGITTokenizer(load_maskgit_vqgan(checkpoint, device), **options)
    if kind == "taming":
        from lease.tokenizers.vqgan_taming import TamingTokenizer, load_taming_vqgan

        if config is None:
            raise ValueError("kind='taming' needs the model's YAML config (e.g. model.yaml beside last.ckpt)")
        return TamingTokenizer(load_taming_vqgan(checkpoint, config, device), **options)
    raise ValueError(f"unknown VQGAN kind {kind!r}: use one of {VQGAN_KINDS}")
