"""Tiny random-weight tokenizer checkpoints in the real third-party formats (for tests and the demo preset).

Each writer builds the real model class at a small width with seeded random weights and saves it exactly
as the released checkpoints are stored, so the real loading code is what reads them back:

* `save_tiny_maskgit_vqgan`: MAGE's `{"state_dict": sd}` torch file (f16 at 256 px: 16x16 codes);
* `save_tiny_taming_vqgan`: a Lightning `.ckpt` (with `loss.*` tensors, as trained ones have) and the
  YAML config in the layout of `vqgan_imagenet_f16_1024` (`configs/model.yaml`, `checkpoints/last.ckpt`);
* `save_tiny_hf_dinov2`: an HF `save_pretrained` directory (patch 14 at 224 px: 16x16 patches);
* `save_tiny_hf_clip`: an HF `CLIPModel` directory with a character-level CLIP tokenizer (`lease.clip_text`);
* `save_tiny_timm_dinov2`: the same network as `save_tiny_hf_dinov2` with the same seed and sizes, written
  in Meta's original `.pth` layout (or timm's own layout), so HF and timm loaders can be compared.

Output for a given seed and sizes is identical across runs (the global RNG is left untouched).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
import yaml
from torch import nn

from lease.cli_help import show_defaults
from lease.io import atomic_path, save_torch_file
from lease.tokenizers.dinov2 import hf_progress_bars_only_on_terminals
from lease.tokenizers.vqgan_maskgit import MaskGITVQGAN, MaskGITVQGANConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The CPU RNG seeded with `seed` inside the block, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _spread_codebook(embedding: nn.Embedding) -> None:
    """Unit-scale random codes, so that random encoders use many codes (taming inits them near zero)."""
    nn.init.normal_(embedding.weight)


# --------------------------------------------------------------------------------------- VQGANs
def save_tiny_maskgit_vqgan(path: str | Path, seed: int = 0, *, n_embed: int = 64, ch: int = 32,
                            ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 1,
                            z_channels: int = 32, resolution: int = 256) -> Path:
    """A random MaskGIT VQGAN in MAGE's checkpoint format; defaults: f16 at 256 px, 64 codes."""
    cfg = MaskGITVQGANConfig(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                             embed_dim=z_channels, n_embed=n_embed, resolution=resolution)
    with _seeded(seed):
        model = MaskGITVQGAN(cfg)
        _spread_codebook(model.quantize.embedding)
    return save_torch_file({"state_dict": model.state_dict()}, Path(path))


def tiny_taming_config(n_embed: int = 64, embed_dim: int = 16, ch: int = 32,
                       ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 1,
                       resolution: int = 256) -> dict:
    """A taming YAML config shaped like `vqgan_imagenet_f16_1024`'s, at tiny sizes."""
    return {"model": {
        "base_learning_rate": 4.5e-6,
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": embed_dim, "n_embed": n_embed,
            "ddconfig": {"double_z": False, "z_channels": embed_dim, "resolution": resolution, "in_channels": 3,
                         "out_ch": 3, "ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks,
                         "attn_resolutions": [resolution // 2 ** (len(ch_mult) - 1)], "dropout": 0.0},
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                           "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0,
                                      "disc_weight": 0.75, "codebook_weight": 1.0}},
        }}}


def save_tiny_taming_vqgan(directory: str | Path, seed: int = 0, **sizes) -> tuple[Path, Path]:
    """A random taming `VQModel`: (checkpoints/last.ckpt, configs/model.yaml) under `directory`.

    `sizes` go to `tiny_taming_config`. The checkpoint carries a stand-in `loss.*` tensor like trained ones.
    """
    from lease.tokenizers.vqgan_taming import DUMMY_LOSS, import_taming_vqmodel

    directory = Path(directory)
    config = tiny_taming_config(**sizes)
    params = dict(config["model"]["params"], lossconfig=DUMMY_LOSS)
    with _seeded(seed):
        model = import_taming_vqmodel()(**params)
        _spread_codebook(model.quantize.embedding)
        disc_weight = torch.randn(8, 3, 4, 4)
    sd = {**model.state_dict(), "loss.discriminator.main.0.weight": disc_weight}
    ckpt = save_torch_file({"state_dict": sd, "epoch": 0, "global_step": 0}, directory / "checkpoints" / "last.ckpt")
    yaml_path = directory / "configs" / "model.yaml"
    with atomic_path(yaml_path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    return ckpt, yaml_path


# --------------------------------------------------------------------------------------- DINOv2
def tiny_hf_dinov2(seed: int = 0, *, hidden_size: int = 128, depth: int = 4, num_heads: int = 2,
                   registers: int = 4, image_size: int = 224, patch_size: int = 14) -> nn.Module:
    """A random HF `Dinov2WithRegistersModel` (or `Dinov2Model` when registers=0); patch 14 at 224 px.

    The default width keeps DINOv2's 64-dim heads, so loaders that infer the head count need no hint.
    """
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    common = dict(hidden_size=hidden_size, num_hidden_layers=depth, num_attention_heads=num_heads, mlp_ratio=4,
                  image_size=image_size, patch_size=patch_size, layerscale_value=0.5)
    with _seeded(seed):
        if registers:
            model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
        else:
            model = Dinov2Model(Dinov2Config(**common))
        # HF initialises the [CLS], register and mask tokens to zero: random values make them matter.
        emb = model.embeddings
        for token in [emb.cls_token, emb.mask_token] + ([emb.register_tokens] if registers else []):
            nn.init.normal_(token, std=0.5)
    return model.eval()


def save_tiny_hf_dinov2(directory: str | Path, seed: int = 0, **sizes) -> Path:
    """`tiny_hf_dinov2(seed, **sizes)` written with `save_pretrained` (config.json + safetensors)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_progress_bars_only_on_terminals()
    tiny_hf_dinov2(seed, **sizes).save_pretrained(tmp)
    # save_pretrained writes several files: build them aside, then swap the directory in.
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def meta_state_dict_from_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of an HF DINOv2 model in Meta's original layout (as `dinov2_vitb14_reg4_pretrain.pth`)."""
    emb = model.embeddings
    sd = {"cls_token": emb.cls_token, "pos_embed": emb.position_embeddings, "mask_token": emb.mask_token,
          "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
          "norm.weight": model.layernorm.weight, "norm.bias": model.layernorm.bias}
    if hasattr(emb, "register_tokens"):
        sd["register_tokens"] = emb.register_tokens
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention
        sd.update({
            f"blocks.{i}.norm1.weight": layer.norm1.weight, f"blocks.{i}.norm1.bias": layer.norm1.bias,
            f"blocks.{i}.attn.qkv.weight": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
            f"blocks.{i}.attn.qkv.bias": torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
            f"blocks.{i}.attn.proj.weight": attn.o_proj.weight, f"blocks.{i}.attn.proj.bias": attn.o_proj.bias,
            f"blocks.{i}.ls1.gamma": layer.layer_scale1.lambda1,
            f"blocks.{i}.norm2.weight": layer.norm2.weight, f"blocks.{i}.norm2.bias": layer.norm2.bias,
            f"blocks.{i}.mlp.fc1.weight": layer.mlp.fc1.weight, f"blocks.{i}.mlp.fc1.bias": layer.mlp.fc1.bias,
            f"blocks.{i}.mlp.fc2.weight": layer.mlp.fc2.weight, f"blocks.{i}.mlp.fc2.bias": layer.mlp.fc2.bias,
            f"blocks.{i}.ls2.gamma": layer.layer_scale2.lambda1,
        })
    return {k: v.detach().clone() for k, v in sd.items()}


def save_tiny_timm_dinov2(path: str | Path, seed: int = 0, *, layout: str = "meta", **sizes) -> Path:
    """The network of `tiny_hf_dinov2(seed, **sizes)` as a timm-loadable weights file.

    layout "meta": Meta's original `.pth` keys (what timm converts on load); "timm": timm's own keys, as
    timm's `checkpoint_filter_fn` converts them (a `.safetensors` path is written as safetensors).
    """
    from safetensors.torch import save_file

    from lease.tokenizers.dinov2 import create_timm_dinov2, infer_timm_arch, to_timm_layout

    path = Path(path)
    hf_model = tiny_hf_dinov2(seed, **sizes)
    sd = meta_state_dict_from_hf(hf_model)
    if layout == "meta":
        return save_torch_file(sd, path)
    if layout != "timm":
        raise ValueError(f"unknown layout {layout!r}: use 'meta' or 'timm'")
    arch = infer_timm_arch(sd, "tiny DINOv2")
    model = create_timm_dinov2(arch, num_heads=hf_model.config.num_attention_heads,
                               image_size=hf_model.config.image_size)
    sd = {k: v.contiguous() for k, v in to_timm_layout(sd, model, arch).items()}
    if path.suffix == ".safetensors":
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp))
        return path
    return save_torch_file(sd, path)


# ------------------------------------------------------------------------------------------ CLIP
def save_tiny_hf_clip(directory: str | Path, seed: int = 0, *, hidden_size: int = 32, layers: int = 2,
                      heads: int = 2, projection_dim: int = 32) -> Path:
    """A random-weight `CLIPModel` with a character-level CLIP tokenizer (CLIP's byte alphabet, no merges),
    written by `save_pretrained` in the real layout."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    hf_progress_bars_only_on_terminals()
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = CLIPTokenizer(vocab=_char_vocab(), merges=[])
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=1,
                  num_attention_heads=heads, image_size=32, patch_size=16)
    with _seeded(seed):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _char_vocab() -> dict[str, int]:
    """CLIP's 256 byte characters, each also word-final, and the special tokens: with no merges the
    tokenizer splits words into characters."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def main(argv: list[str] | None = None) -> int:
    """Write the whole tiny tokenizer set under one directory (the demo preset's "checkpoints")."""
    parser = argparse.ArgumentParser(prog="lease demo-assets", description=main.__doc__)
    parser.add_argument("out", type=Path, help="directory to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = show_defaults(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = [save_tiny_maskgit_vqgan(args.out / "vqgan_maskgit_tiny.ckpt", args.seed),
             *save_tiny_taming_vqgan(args.out / "vqgan_taming_tiny", args.seed),
             save_tiny_hf_dinov2(args.out / "dinov2_hf_tiny", args.seed),
             save_tiny_timm_dinov2(args.out / "dinov2_meta_tiny.pth", args.seed)]
    for p in paths:
        log.info("wrote %s", p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
