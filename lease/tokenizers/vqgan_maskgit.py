"""MaskGIT-style VQGAN with the exact state-dict layout of MAGE's `vqgan_jax_strongaug.ckpt`.

The MAGE/LEASE generative tokenizer was trained in JAX (MaskGIT) and converted to a torch state dict.
Its layers differ from taming-transformers' in ways that change the numbers, so taming's classes cannot
load it:

* GroupNorm(32 groups, eps 1e-6) and swish; the 3x3 convs inside residual blocks and the encoder's input
  conv carry no bias;
* a residual block that changes the width applies its 1x1 shortcut to the *residual branch output*
  (out = h + W h), not to the block input (a quirk of the JAX original that the weights depend on);
* the encoder downsamples with 2x2 average pooling, the decoder upsamples with nearest x2 then a 3x3 conv;
* no attention blocks and no quant / post-quant convs; codes are the nearest codebook rows by squared L2.

Input images are in [0, 1]. All sizes come from `MaskGITVQGANConfig`, which `infer_config` reads from a
state dict, so nothing here assumes the released widths (ch 128, 1024 codes) or the test fixture's.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lease.io import CheckpointFileError, load_torch_file
from lease.tokenizers import ConvVQGANTokenizer
from lease.typed_config import require

log = logging.getLogger(__name__)

GROUPS = 32
NORM_EPS = 1e-6


@dataclass
class MaskGITVQGANConfig:
    """Sizes of the MaskGIT VQGAN (MAGE's released model: ch 128, ch_mult 1,1,2,2,4, 2 blocks, 256, 1024)."""

    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    resolution: int = 256

    def __post_init__(self) -> None:
        require(self.ch > 0 and self.ch % GROUPS == 0, "ch", f"must be a positive multiple of {GROUPS} (GroupNorm)")
        require(len(self.ch_mult) >= 1 and all(m > 0 for m in self.ch_mult), "ch_mult", "needs positive entries")
        require(self.num_res_blocks >= 1, "num_res_blocks", "must be >= 1")
        require(self.z_channels == self.embed_dim, "embed_dim",
                f"must equal z_channels ({self.z_channels}): this VQGAN has no quant conv between them")
        require(self.n_embed >= 1, "n_embed", "must be >= 1")
        require(self.resolution % self.downsample_factor == 0, "resolution",
                f"must be divisible by the downsampling factor {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor


def channels_last_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """F.group_norm's numbers from per-channel statistics over H·W, combined per group.

    One fp32 pass gives each channel's mean and variance (`torch.var_mean`, which compiles to a single
    Welford reduction); a group's variance is then the mean of its channels' variances plus the variance
    of their means (the law of total variance; every channel has H·W values). For NHWC tensors the
    reduction reads along the contiguous channel axis, where one over each group's strided channel slice
    compiles to slow kernels; and one pass instead of a mean pass then a squared-deviation pass reads the
    activation once less (benchmarks/results/tokenize-vqgan-encode-*).
    """
    b, c = x.shape[:2]
    per_group = c // num_groups
    xf = x.float()
    channel_var, channel_mean = torch.var_mean(xf, dim=(2, 3), correction=0)
    channel_var = channel_var.view(b, num_groups, per_group)
    channel_mean = channel_mean.view(b, num_groups, per_group)
    mean = channel_mean.mean(dim=2, keepdim=True)
    var = channel_var.mean(dim=2, keepdim=True) + (channel_mean - mean).square().mean(dim=2, keepdim=True)
    mean = mean.expand(b, num_groups, per_group).reshape(b, c, 1, 1)
    inv_std = torch.rsqrt(var + eps).expand(b, num_groups, per_group).reshape(b, c, 1, 1)
    y = (xf - mean) * inv_std * weight.float().view(1, c, 1, 1) + bias.float().view(1, c, 1, 1)
    return y.to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose compiled form uses `channels_last_group_norm` on NHWC inputs (eager keeps
    PyTorch's native kernel, which is the faster of the two without compilation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return channels_last_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm(GROUPS, channels, eps=NORM_EPS)


class ResBlock(nn.Module):
    """Pre-activation residual block; a width change projects the branch output, as in the JAX original."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(out_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        # The input is dropped when the width changes: the "shortcut" is W·h (the weights were trained so).
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _res_stack(in_ch: int, out_ch: int, count: int) -> nn.ModuleList:
    return nn.ModuleList([ResBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(count)])


class Encoder(nn.Module):
    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        in_ch = cfg.ch
        for width in widths:
            level = nn.Module()
            level.block = _res_stack(in_ch, width, cfg.num_res_blocks)
            self.down.append(level)
            in_ch = width
        self.mid = _mid_blocks(widths[-1], cfg.num_res_blocks)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        for block in self.mid.values():
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = _mid_blocks(widths[-1], cfg.num_res_blocks)
        # `up[i]` holds level i (finest is 0) and runs from coarsest to finest, as in the checkpoint layout.
        levels: list[nn.Module] = []
        in_ch = widths[-1]
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.block = _res_stack(in_ch, widths[i], cfg.num_res_blocks)
            if i > 0:
                level.upsample = Upsample(widths[i])
            levels.insert(0, level)
            in_ch = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid.values():
            h = block(h)
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _mid_blocks(width: int, count: int) -> nn.ModuleDict:
    # The checkpoint names the middle blocks block_1, block_2, ...
    return nn.ModuleDict({f"block_{i + 1}": ResBlock(width, width) for i in range(count)})


class Codebook(nn.Module):
    """The code vectors (`quantize.embedding.weight`) and the nearest-code search."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [B,h,w] of the nearest code (squared L2) for latents z [B,D,h,w]."""
        return nearest_code(z, self.embedding.weight)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors [B,D,h,w] for indices [B,h,w]."""
        return self.embedding(codes).permute(0, 3, 1, 2)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z - c_k||² for every position of z [B,D,h,w], against codebook [K,D], as int64 [B,h,w].

    ||z||² is the same for every k, so the argmin of ||c_k||² - 2 z·c_k suffices: one [N,D]x[D,K] matmul,
    no [N,K,D] difference tensor. Done in fp32 whatever the network's dtype: bf16 distances would flip
    near-ties between codes.
    """
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
    book = codebook.float()
    dist = torch.addmm((book * book).sum(1), flat, book.t(), beta=1.0, alpha=-2.0)
    return dist.argmin(dim=1).view(b, h, w)


class MaskGITVQGAN(nn.Module):
    """Encoder, codebook and decoder of the MAGE VQGAN; state-dict keys match `vqgan_jax_strongaug.ckpt`."""

    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Codebook(cfg.n_embed, cfg.embed_dim)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] -> code indices int64 [B,H/f,W/f]."""
        return self.quantize.nearest(self.encoder(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [B,h,w] -> decoder output [B,3,hf,wf] (nominally [0,1]; not clamped)."""
        return self.decoder(self.quantize.lookup(codes).to(self.decoder.conv_in.weight.dtype))


class MaskGITTokenizer(ConvVQGANTokenizer):
    """`GenerativeTokenizer` over a `MaskGITVQGAN` (inputs already in [0,1], the network's own range)."""

    def __init__(self, model: MaskGITVQGAN, *, dtype: torch.dtype | None = None, channels_last: bool | None = None,
                 compile: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        super().__init__(num_codes=model.cfg.n_embed, grid_size=model.cfg.grid_size,
                         image_size=model.cfg.resolution, input_range=(0.0, 1.0),
                         device=model.quantize.embedding.weight.device, dtype=dtype, channels_last=channels_last,
                         compile=compile)

    def _conv_modules(self) -> list[nn.Module]:
        return [self.model.encoder, self.model.decoder]

    def _encode_net(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def _decode_net(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes)


# ------------------------------------------------------------------------------------------ loading
class VQGANCheckpointError(CheckpointFileError):
    """A VQGAN checkpoint is missing, of another kind, or lacks keys; the message says which and what to do."""


def _level_count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def describe_checkpoint_kind(sd: dict[str, torch.Tensor]) -> str:
    """A short guess of what a state dict is, for error messages."""
    if any(k.startswith("quant_conv.") or k.startswith("post_quant_conv.") for k in sd) or \
            any(k.startswith("encoder.mid.attn_") for k in sd):
        return "a taming-transformers VQModel (has quant_conv / attention); load it with kind='taming'"
    if any(k.startswith(("loss.discriminator.", "loss.perceptual_loss.")) for k in sd):
        return "a taming-transformers training checkpoint; load it with kind='taming'"
    if "token_emb.word_embeddings.weight" in sd or "blocks.0.attn.qkv.weight" in sd:
        return "a LEASE/MAGE pretraining checkpoint (transformer), not a VQGAN"
    if "model" in sd or "optimizer" in sd:
        return "a training checkpoint of this project, not a VQGAN"
    return f"an unknown state dict ({len(sd)} entries, e.g. {sorted(sd)[:3]})"


def infer_config(sd: dict[str, torch.Tensor]) -> MaskGITVQGANConfig:
    """Read widths, levels, blocks per level and code count from the tensors themselves."""
    needed = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight",
              "decoder.conv_in.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise VQGANCheckpointError(f"not a MaskGIT VQGAN state dict: missing {missing}; found "
                                   f"{describe_checkpoint_kind(sd)}")
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in sd):
        raise VQGANCheckpointError(f"found {describe_checkpoint_kind(sd)}")
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _level_count(sd, "encoder.down")
    blocks = _level_count(sd, "encoder.down.0.block")
    if levels == 0 or blocks == 0:
        raise VQGANCheckpointError("MaskGIT VQGAN state dict has no encoder.down.<i>.block.<j> entries")
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise VQGANCheckpointError(f"level widths {widths} are not multiples of ch={ch}")
    n_embed, embed_dim = sd["quantize.embedding.weight"].shape
    z_channels = sd["encoder.conv_out.weight"].shape[0]
    # The resolution is not in the weights (the nets are fully convolutional); 16x16 codes per image is the
    # MAGE setting, so the nominal resolution is 16 times the downsampling factor.
    return MaskGITVQGANConfig(ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=blocks,
                              z_channels=z_channels, embed_dim=embed_dim, n_embed=n_embed,
                              resolution=16 * 2 ** (levels - 1))


def read_vqgan_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a `{"state_dict": sd}` (or raw) torch file, with a clear error for anything else."""
    obj = load_torch_file(path, VQGANCheckpointError, " (MAGE's VQGAN file is vqgan_jax_strongaug.ckpt)")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise VQGANCheckpointError(f"{path} holds {type(obj).__name__}, expected {{'state_dict': ...}} of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        raise VQGANCheckpointError(f"{path}: expected a state dict of tensors, found {describe_checkpoint_kind(obj)}")
    return {re.sub(r"^module\.", "", k): v for k, v in tensors.items()}


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that lists missing / unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:4]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})" if unexpected else "",
                 f"shape mismatches: {wrong[:4]}" if wrong else ""]
        raise VQGANCheckpointError(f"{source} does not match the MaskGIT VQGAN layout: "
                                   + "; ".join(p for p in parts if p))
    model.load_state_dict(sd)


def load_maskgit_vqgan(path: str | Path, device: str | torch.device = "cpu",
                       config: MaskGITVQGANConfig | None = None) -> MaskGITVQGAN:
    """Build a `MaskGITVQGAN` from MAGE's checkpoint (sizes inferred unless `config` is given), eval mode."""
    sd = read_vqgan_state_dict(path)
    cfg = config or infer_config(sd)
    model = MaskGITVQGAN(cfg)
    load_state_dict_strict(model, sd, str(path))
    log.info("loaded MaskGIT VQGAN %s: ch %d x %s, %d codes of dim %d, f%d", path, cfg.ch, cfg.ch_mult,
             cfg.n_embed, cfg.embed_dim, cfg.downsample_factor)
    return model.eval().requires_grad_(False).to(device)
