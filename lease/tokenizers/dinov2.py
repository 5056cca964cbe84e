"""DINOv2 patch features of one transformer block: the input of the k-means codebook and of assignment.

Definition (the same for both loaders): the features of layer `l` are the token outputs of block `l` of the
ViT, *before* the final LayerNorm, with the [CLS] and register tokens dropped. This is what DiGIT clusters
(an intermediate block output, no final norm), what timm's `forward_intermediates(norm=False)` returns and
what HF's `hidden_states[l + 1]` holds (HF's `hidden_states[0]` is the embedding output).

`layer` indexes the list of block outputs like a Python list: 0 is the first block, -1 the last block,
and the default -3 the third from last (block depth-3, DiGIT's "l3"; block 9 of ViT-B's 12). Blocks after
the chosen one are not run.

Images are float [B,3,224,224] in [0,1]; ImageNet mean/std normalisation happens inside. A 224 input with
patch 14 gives a 16x16 grid, position-aligned with the 16x16 VQGAN grid of the 256 crop.

Loaders: an HF `Dinov2Model` / `Dinov2WithRegistersModel` directory (`from_pretrained`, local files only),
or a timm DINOv2 ViT with a local weights file in timm's layout or Meta's original `.pth` layout (converted
by timm's own `checkpoint_filter_fn`).
"""
from __future__ import annotations

import logging
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lease.io import CheckpointFileError, load_failure_message, load_torch_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_LAYER = -3
DEFAULT_IMAGE_SIZE = 224  # DINOv2-B/14 at 224 px: a 16x16 patch grid, aligned with the VQGAN's
DINOV2_HEAD_DIM = 64  # every released DINOv2 (S/B/L/g) uses 64-dim heads
HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
TIMM_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


class Dinov2LoadError(CheckpointFileError):
    """A DINOv2 checkpoint is missing, of another kind, or does not fit the model; the message says what to do."""


def block_index(layer: int, depth: int) -> int:
    """Non-negative block index for `layer` (negative counts from the end, -1 = last block)."""
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is out of range for a ViT with {depth} blocks (use {-depth}..{depth - 1})")
    return layer % depth


class Dinov2Features(nn.Module):
    """Images in [0,1] -> patch features [B, N, D] of one block (pre-final-norm, prefix tokens dropped).

    `backend` runs the ViT up to block `block` and returns all its tokens; `num_prefix_tokens` ([CLS] +
    registers) are dropped. Runs in `dtype` (bf16 weights by default on CUDA; LayerNorm and softmax
    accumulate in fp32) and returns float32 features.
    """

    def __init__(self, backend: Literal["hf", "timm"], model: nn.Module, *, depth: int, embed_dim: int,
                 patch_size: int, num_prefix_tokens: int, layer: int = DEFAULT_LAYER,
                 image_size: int = DEFAULT_IMAGE_SIZE,
                 dtype: torch.dtype | None = None, compile: bool = False) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
        self.backend, self.model = backend, model.eval().requires_grad_(False)
        self.depth, self.embed_dim, self.patch_size = depth, embed_dim, patch_size
        self.num_prefix_tokens, self.image_size = num_prefix_tokens, image_size
        self.layer, self.block, self.compiled = layer, block_index(layer, depth), compile
        self.grid_size = image_size // patch_size
        device = next(model.parameters()).device
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.model.to(self.dtype)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1), persistent=False)
        self._tokens_fn = torch.compile(self._block_tokens, dynamic=False) if compile else self._block_tokens

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def reconfigured(self, dtype: torch.dtype | None = None, compile: bool | None = None) -> Dinov2Features:
        """The same network with another dtype / compile setting (None keeps the current one); for benchmarks."""
        return Dinov2Features(self.backend, self.model, depth=self.depth, embed_dim=self.embed_dim,
                              patch_size=self.patch_size, num_prefix_tokens=self.num_prefix_tokens, layer=self.layer,
                              image_size=self.image_size, dtype=dtype or self.dtype,
                              compile=self.compiled if compile is None else compile)

    def _block_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens ([CLS], registers, patches) after block `self.block`, for normalised images x."""
        if self.backend == "hf":
            h = self.model.embeddings(x)
            for blk in self.model.encoder.layer[: self.block + 1]:
                h = blk(h)
            return h
        return self.model.forward_intermediates(x, indices=[self.block], norm=False, stop_early=True,
                                                output_fmt="NLC", intermediates_only=True,
                                                return_prefix_tokens=False)[0]

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0,1], got {images.dtype} (divide uint8 images by 255)")
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images (the center crop), got "
                             f"{tuple(images.shape[2:])}")
        x = (images.to(self.device, torch.float32, non_blocking=True) - self.mean) / self.std
        tokens = self._tokens_fn(x.to(self.dtype))
        if self.backend == "hf":
            tokens = tokens[:, self.num_prefix_tokens:]
        return tokens.float()


# ------------------------------------------------------------------------------------------- HF
def hf_progress_bars_only_on_terminals() -> None:
    """Hugging Face's load/save bars print one fragment per update into piped logs: off there."""
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def load_hf_dinov2(model_dir: str | Path, device: str | torch.device = "cpu", layer: int = DEFAULT_LAYER,
                   image_size: int = DEFAULT_IMAGE_SIZE, dtype: torch.dtype | None = None,
                   compile: bool = False) -> Dinov2Features:
    """Features from an HF `Dinov2Model` / `Dinov2WithRegistersModel` directory (never contacts a hub)."""
    from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

    hf_progress_bars_only_on_terminals()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise Dinov2LoadError(f"{model_dir} is not an HF model directory (no config.json); expected the output of "
                              "save_pretrained, e.g. a local copy of facebook/dinov2-base")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type not in HF_MODEL_TYPES:
        raise Dinov2LoadError(f"{model_dir} holds an HF {config.model_type!r} model; expected one of {HF_MODEL_TYPES}")
    cls = Dinov2Model if config.model_type == "dinov2" else Dinov2WithRegistersModel
    try:
        model = cls.from_pretrained(model_dir, local_files_only=True, attn_implementation="sdpa", weights_only=True)
    except pickle.UnpicklingError as err:  # a pytorch_model.bin that pickles more than tensors
        torch_files = sorted(model_dir.glob("*.bin"))
        culprit = torch_files[0] if len(torch_files) == 1 else model_dir
        raise Dinov2LoadError(load_failure_message(culprit, err)) from err
    except (OSError, ValueError, RuntimeError) as err:
        raise Dinov2LoadError(f"cannot load {cls.__name__} from {model_dir}: {err}") from err
    registers = getattr(config, "num_register_tokens", 0)
    log.info("loaded HF %s from %s: %d blocks, dim %d, %d registers, features of block %d", cls.__name__,
             model_dir, config.num_hidden_layers, config.hidden_size, registers,
             block_index(layer, config.num_hidden_layers))
    return Dinov2Features("hf", model.to(device), depth=config.num_hidden_layers, embed_dim=config.hidden_size,
                          patch_size=config.patch_size, num_prefix_tokens=1 + registers, layer=layer,
                          image_size=image_size, dtype=dtype, compile=compile)


# ----------------------------------------------------------------------------------------- timm
@dataclass
class TimmDinov2Arch:
    """What a DINOv2 ViT looks like, read from its weights (timm or Meta layout)."""

    embed_dim: int
    depth: int
    patch_size: int
    mlp_ratio: float
    reg_tokens: int
    layer_scale: bool

    @property
    def model_name(self) -> str:
        return "vit_base_patch14_reg4_dinov2" if self.reg_tokens else "vit_base_patch14_dinov2"


def infer_timm_arch(sd: dict[str, torch.Tensor], source: str) -> TimmDinov2Arch:
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise Dinov2LoadError(f"{source} is not a DINOv2 ViT state dict (no cls_token / patch_embed.proj.weight; "
                              f"found e.g. {sorted(sd)[:4]}); HF directories load with backend 'hf'")
    if "blocks.0.mlp.w12.weight" in sd:
        raise Dinov2LoadError(f"{source} uses a SwiGLU MLP (ViT-g); only the fc1/fc2 MLP models (S/B/L) are supported")
    embed_dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    registers = sd.get("register_tokens", sd.get("reg_token"))
    return TimmDinov2Arch(embed_dim=embed_dim, depth=depth, patch_size=sd["patch_embed.proj.weight"].shape[-1],
                          mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                          reg_tokens=0 if registers is None else registers.shape[1],
                          layer_scale="blocks.0.ls1.gamma" in sd)


def create_timm_dinov2(arch: TimmDinov2Arch, num_heads: int | None = None,
                       image_size: int = DEFAULT_IMAGE_SIZE,
                       model_name: str | None = None) -> nn.Module:
    """A randomly initialised timm DINOv2 ViT of the given architecture (no classifier head)."""
    import timm

    heads = num_heads or arch.embed_dim // DINOV2_HEAD_DIM
    if heads < 1 or arch.embed_dim % heads:
        raise Dinov2LoadError(f"cannot split width {arch.embed_dim} into heads of {DINOV2_HEAD_DIM}: pass num_heads")
    return timm.create_model(model_name or arch.model_name, pretrained=False, num_classes=0, img_size=image_size,
                             patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
                             num_heads=heads, mlp_ratio=arch.mlp_ratio, reg_tokens=arch.reg_tokens,
                             no_embed_class=arch.reg_tokens > 0, init_values=1e-5 if arch.layer_scale else None)


def to_timm_layout(sd: dict[str, torch.Tensor], model: nn.Module, arch: TimmDinov2Arch) -> dict[str, torch.Tensor]:
    """timm's own conversion of a DINOv2 state dict (Meta or timm layout) for `model`'s position grid.

    The stored grid (37x37 for 518-px checkpoints) is resampled once here with bicubic interpolation,
    antialiased for register models only: the setting Meta's models use at run time (`interpolate_antialias`)
    and HF's `Dinov2WithRegistersModel` / `Dinov2Model` copy, so timm and HF give the same features at 224.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(sd, model, antialias=arch.reg_tokens > 0)


def read_timm_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors file, or of a torch file read weights-only (raw as Meta ships it,
    or under timm's training-checkpoint keys, picked in timm's order: EMA weights first)."""
    from timm.models import clean_state_dict, load_state_dict

    if weights.suffix != ".safetensors":
        obj = load_torch_file(weights, Dinov2LoadError)
        wrapped = [k for k in TIMM_WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
        sd = obj[wrapped[0]] if wrapped else obj
        if not isinstance(sd, dict):
            raise Dinov2LoadError(f"{weights} holds {type(sd).__name__}, not a state dict")
        return clean_state_dict(sd)
    try:
        return load_state_dict(str(weights))
    except Exception as err:  # noqa: BLE001 - any failure to read means "not a weights file"
        raise Dinov2LoadError(f"{weights} is not a readable weights file ({type(err).__name__}: {err})") from err


def load_timm_dinov2(weights: str | Path, device: str | torch.device = "cpu", layer: int = DEFAULT_LAYER,
                     image_size: int = DEFAULT_IMAGE_SIZE, num_heads: int | None = None,
                     model_name: str | None = None,
                     dtype: torch.dtype | None = None, compile: bool = False) -> Dinov2Features:
    """Features from a timm DINOv2 ViT built from a local weights file (.pth/.bin/.safetensors).

    Sizes come from the weights; `num_heads` defaults to embed_dim / 64 (all released DINOv2 models).
    Meta's original layout (`mask_token`, `register_tokens`, pos_embed with a [CLS] slot) and any stored
    position grid (518 px checkpoints) are converted by timm's `checkpoint_filter_fn` (see `to_timm_layout`).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise Dinov2LoadError(f"DINOv2 weights {weights} do not exist (e.g. Meta's dinov2_vitb14_reg4_pretrain.pth)")
    sd = read_timm_weights(weights)
    arch = infer_timm_arch(sd, str(weights))
    model = create_timm_dinov2(arch, num_heads, image_size, model_name)
    sd = to_timm_layout(sd, model, arch)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise Dinov2LoadError(f"{weights} does not fit {model_name or arch.model_name} ({arch}): missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(sd)
    log.info("loaded timm %s from %s: %d blocks, dim %d, %d heads, %d registers, features of block %d",
             model_name or arch.model_name, weights, arch.depth, arch.embed_dim, model.blocks[0].attn.num_heads,
             arch.reg_tokens,
             block_index(layer, arch.depth))
    return Dinov2Features("timm", model.to(device), depth=arch.depth, embed_dim=arch.embed_dim,
                          patch_size=arch.patch_size, num_prefix_tokens=model.num_prefix_tokens, layer=layer,
                          image_size=image_size, dtype=dtype, compile=compile)


def load_dinov2(backend: Literal["hf", "timm"], path: str | Path, device: str | torch.device = "cpu",
                layer: int = DEFAULT_LAYER, **options) -> Dinov2Features:
    """`load_hf_dinov2` (directory) or `load_timm_dinov2` (weights file) by name; options go through."""
    if backend == "hf":
        return load_hf_dinov2(path, device, layer, **options)
    if backend == "timm":
        return load_timm_dinov2(path, device, layer, **options)
    raise ValueError(f"unknown DINOv2 backend {backend!r}: use 'hf' (model directory) or 'timm' (weights file)")
