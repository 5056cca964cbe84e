"""Checkpoints named the way the field names them, found in this machine's own caches, never downloaded.

- a Hugging Face id (`facebook/dinov2-base`): the snapshot directory in the local HF cache
  (`HF_HUB_CACHE` / `HF_HOME`), through `huggingface_hub.snapshot_download(local_files_only=True)`;
- a timm name (`timm:vit_base_patch14_dinov2.lvd142m`): its weights file, from the HF cache (timm's
  `hf_hub_id`) or torch hub's checkpoint folder (timm's download URL's file name).

A name that is not cached is an error saying how to bring it onto the machine. A spec that is an existing
path is returned as it is, so paths keep working everywhere names do.
"""
from __future__ import annotations

import re
from pathlib import Path

TIMM_PREFIX = "timm:"
HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class NotCachedError(FileNotFoundError):
    """A named checkpoint that this machine's caches do not hold."""


def is_checkpoint_name(spec: str) -> bool:
    """True for `timm:NAME` and for an HF-style `org/name` that is not an existing path."""
    return spec.startswith(TIMM_PREFIX) or (HF_ID.fullmatch(spec) is not None and not Path(spec).exists())


def resolve_checkpoint(spec: str) -> Path:
    """The local file or directory that `spec` (a path, an HF id or `timm:NAME`) stands for."""
    if spec.startswith(TIMM_PREFIX):
        return _timm_weights(spec[len(TIMM_PREFIX):])
    if is_checkpoint_name(spec):
        return _hf_snapshot(spec)
    return Path(spec)


def _hf_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise NotCachedError(
            f"{repo_id} is neither a directory here nor in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"nothing is downloaded at run time: fetch it where there is network (`huggingface-cli download "
            f"{repo_id}`) and copy the cache here (or set HF_HUB_CACHE to it), or give the model directory's path"
            ) from None


def _timm_weights(name: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise NotCachedError(f"timm knows no pretrained model {name!r} (see timm.list_pretrained())")
    if cfg.hf_hub_id:
        for filename in HF_WEIGHT_FILES:
            try:
                return Path(hf_hub_download(cfg.hf_hub_id, filename, local_files_only=True))
            except LocalEntryNotFoundError:
                continue
    tried = [f"{cfg.hf_hub_id} in {constants.HF_HUB_CACHE}"] if cfg.hf_hub_id else []
    if cfg.url:
        import torch.hub

        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if cached.is_file():
            return cached
        tried.append(str(cached))
    raise NotCachedError(f"timm:{name}'s weights are not cached here (looked for {' and '.join(tried)}); nothing is "
                         "downloaded at run time: fetch them where there is network (timm.create_model(name, "
                         "pretrained=True)) and copy the cache here, or give the weights file's path")
