"""taming-transformers VQGAN (`VQModel`) from a Lightning `.ckpt` and its YAML config (inputs in [-1,1]).

The model is built by the installed `taming-transformers-rom1504` package (the later state of the taming
repository, with `VectorQuantizer2`, which the released f16 checkpoints need). Two things make it load on
a current, offline stack:

* taming imports `pytorch_lightning.utilities.distributed.rank_zero_only`, which Lightning 2 removed: we
  register a module of that name exposing Lightning's current `rank_zero_only` before importing taming;
* the config's `lossconfig` (LPIPS + discriminator) would fetch VGG/LPIPS weights: we replace it by
  taming's `DummyLoss` and drop the checkpoint's `loss.*` tensors, which encoding never uses.

Released configs: `vqgan_imagenet_f16_1024` / `_16384` (`model.params`: embed_dim, n_embed, ddconfig).
"""
from __future__ import annotations

import importlib
import logging
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lease.io import load_torch_file
from lease.tokenizers import ConvVQGANTokenizer
from lease.tokenizers.vqgan_maskgit import VQGANCheckpointError, load_state_dict_strict, nearest_code
from lease.typed_config import load_yaml

log = logging.getLogger(__name__)

VQMODEL_TARGET = "taming.models.vqgan.VQModel"
DUMMY_LOSS = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}
LEGACY_LIGHTNING_MODULE = "pytorch_lightning.utilities.distributed"


def import_taming_vqmodel() -> type[nn.Module]:
    """taming's `VQModel` class, after aliasing the Lightning module name that taming still imports."""
    if LEGACY_LIGHTNING_MODULE not in sys.modules:
        try:
            importlib.import_module(LEGACY_LIGHTNING_MODULE)
        except ImportError:
            from pytorch_lightning.utilities import rank_zero_only

            alias = types.ModuleType(LEGACY_LIGHTNING_MODULE)
            alias.rank_zero_only = rank_zero_only
            sys.modules[LEGACY_LIGHTNING_MODULE] = alias
    try:
        from taming.models.vqgan import VQModel
    except ImportError as err:
        raise ImportError(f"cannot import taming-transformers ({err}); install the pinned "
                          "taming-transformers-rom1504 and einops (requirements.txt)") from err
    return VQModel


def read_model_params(config_path: str | Path) -> dict[str, Any]:
    """`model.params` of a taming YAML config (the whole file, or just its `model` section)."""
    data = load_yaml(config_path)
    model = data.get("model", data)
    target = model.get("target")
    if target != VQMODEL_TARGET:
        raise VQGANCheckpointError(f"{config_path}: model target is {target!r}; this backend loads {VQMODEL_TARGET} "
                                   "configs (e.g. vqgan_imagenet_f16_1024's model.yaml)")
    params = dict(model.get("params") or {})
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
    if missing:
        raise VQGANCheckpointError(f"{config_path}: model.params lacks {missing}")
    if params.get("remap") is not None:
        raise VQGANCheckpointError(f"{config_path}: codebook remapping (params.remap) is not supported")
    return params


def read_lightning_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """`state_dict` of a Lightning checkpoint, without the training-only `loss.*` tensors."""
    # Lightning checkpoints of the taming era also pickle callback objects: refused here (they could run
    # code), they load after one trusted `lease convert-checkpoint`, which keeps the state dict.
    obj = load_torch_file(path, VQGANCheckpointError, " (e.g. vqgan_imagenet_f16_1024/last.ckpt)")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        found = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise VQGANCheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict'; found {found}); a MAGE "
                                   "vqgan_jax_strongaug.ckpt loads with kind='maskgit'")
    sd = {k: v for k, v in obj["state_dict"].items() if not k.startswith("loss.")}
    if "quant_conv.weight" not in sd:
        raise VQGANCheckpointError(f"{path} has no quant_conv: not a taming VQModel (a MaskGIT VQGAN such as "
                                   "vqgan_jax_strongaug.ckpt loads with kind='maskgit')")
    return sd


def load_taming_vqgan(checkpoint: str | Path, config: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """taming `VQModel` from a Lightning `.ckpt` + YAML config, with the loss replaced, in eval mode."""
    params = read_model_params(config)
    sd = read_lightning_state_dict(checkpoint)
    vq_model = import_taming_vqmodel()
    params.update(lossconfig=DUMMY_LOSS, ckpt_path=None)
    model = vq_model(**params)
    load_state_dict_strict(model, sd, str(checkpoint))
    log.info("loaded taming VQModel %s: %d codes of dim %d, ch %d x %s", checkpoint, params["n_embed"],
             params["embed_dim"], params["ddconfig"]["ch"], params["ddconfig"]["ch_mult"])
    return model.eval().requires_grad_(False).to(device)


class TamingTokenizer(ConvVQGANTokenizer):
    """`GenerativeTokenizer` over a taming `VQModel`: [0,1] images are mapped to [-1,1] for the network."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None, channels_last: bool | None = None,
                 compile: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        encoder = model.encoder
        factor = 2 ** (encoder.num_resolutions - 1)
        super().__init__(num_codes=model.quantize.n_e, grid_size=encoder.resolution // factor,
                         image_size=encoder.resolution, input_range=(-1.0, 1.0),
                         device=model.quantize.embedding.weight.device, dtype=dtype, channels_last=channels_last,
                         compile=compile)

    def _conv_modules(self) -> list[nn.Module]:
        return [self.model.encoder, self.model.quant_conv, self.model.post_quant_conv, self.model.decoder]

    def _encode_net(self, x: torch.Tensor) -> torch.Tensor:
        # Same metric as taming's VectorQuantizer2 (squared L2), in fp32 against the fp32 codebook.
        return nearest_code(self.model.quant_conv(self.model.encoder(x)), self.model.quantize.embedding.weight)

    def _decode_net(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.model.quantize.embedding(codes).permute(0, 3, 1, 2)
        return self.model.decode(z.to(self.model.post_quant_conv.weight.dtype))
