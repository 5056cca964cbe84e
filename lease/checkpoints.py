"""Checkpoints: our training checkpoints (atomic, resumable), encoder export, and import of the
authors' reference LEASE, Sorcen and MAGE checkpoints by key conversion."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lease.codebook import load_codebook
from lease.configs import (AUTHORS_MAGE_LAYOUT, DECODER_CONTRAST, ENCODER_CONTRAST, MODEL_PRESETS, LossConfig,
                           ModelConfig)
from lease.io import CheckpointFileError, atomic_path, atomic_write_json, load_torch_file, load_torch_file_inert
from lease.model import LeaseModel, sincos_2d
from lease.typed_config import from_dict, to_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Reference keys with no counterpart in our model: buffers we recompute, or heads for other uses.
REFERENCE_IGNORED = ("pos2d", "cls_token", "mask_token", "dino_codebook", "token_emb.position_ids", "classifier.")
REFERENCE_REQUIRED = ("token_emb.word_embeddings.weight", "token_emb.position_embeddings.weight",
                      "blocks.0.attn.qkv.weight", "norm.weight", "decoder_embed.weight",
                      "decoder_pos_embed_learned", "decoder_blocks.0.attn.qkv.weight", "decoder_norm.weight",
                      "mlm_layer.fc.weight", "mlm_layer.bias")
# The authors' Sorcen layout (their MAGE's plus these): teacher blocks, projector pair and predictor.
SORCEN_REQUIRED = ("blocks_momentum.0.attn.qkv.weight", "projector.projector.0.weight",
                   "projector.projector.3.weight", "momentum_projector.projector.0.weight",
                   "predictor.projector.0.weight")
# Their module names → ours, by prefix (first match wins; the momentum projector before the projector).
AUTHORS_RENAMES = (("blocks_momentum.", "teacher_blocks."), ("momentum_projector.projector.", "teacher_projector."),
                   ("projector.projector.", "projector."), ("predictor.projector.", "predictor."),
                   ("classifier.", "online_classifier."))


class CheckpointError(CheckpointFileError):
    """A checkpoint file is missing, of the wrong kind, or lacks keys; the message says which."""


# ------------------------------------------------------------------------------- raw file access
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch file holding it raw or under "model"/"state_dict", `module.` stripped."""
    obj = load_torch_file(path, CheckpointError)
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (raw, or under 'model'/'state_dict')")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _heads_for(dim: int, key: str) -> int:
    for preset in MODEL_PRESETS.values():
        if preset["embed_dim" if key == "num_heads" else "decoder_embed_dim"] == dim:
            return preset[key]
    raise CheckpointError(f"cannot infer {key} for width {dim}: pass it explicitly (--{key.replace('_', '-')})")


# --------------------------------------------------------------------------- reference import
@dataclass
class ImportReport:
    config: ModelConfig
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def authors_key(key: str) -> str:
    """Our name for a key of the authors' Sorcen/MAGE layout (`AUTHORS_RENAMES`)."""
    for theirs, ours in AUTHORS_RENAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def _authors_name(key: str) -> str:
    """The authors' name for one of our keys (`authors_key` inverted)."""
    for theirs, ours in AUTHORS_RENAMES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _authors_layout(sd: dict[str, torch.Tensor], method: str, cls_token_id: int | None) -> dict[str, Any]:
    """The MAGE/Sorcen layout switches, the echo branch's widths and the classifier's, from the shapes."""
    # the vocabulary size comes from the shapes, [CLS] (unless given) from the layout: V_gen + 76, 1100 for 1024 codes
    layout = dict(AUTHORS_MAGE_LAYOUT, cls_token_id=cls_token_id, echo_contrast=method == "sorcen")
    if method == "sorcen":
        hidden, _ = sd["projector.projector.0.weight"].shape
        layout.update(projector_hidden=hidden, projector_dim=sd["projector.projector.3.weight"].shape[0],
                      predictor_hidden=sd["predictor.projector.0.weight"].shape[0])
    if "classifier.2.weight" in sd:
        layout.update(classifier_hidden=sd["classifier.0.weight"].shape[0],
                      num_classes=sd["classifier.2.weight"].shape[0])
    return layout


def reference_model_config(sd: dict[str, torch.Tensor], *, vocab_gen: int, num_heads: int | None = None,
                           decoder_num_heads: int | None = None, cls_token_id: int | None = None,
                           mask_token_id: int | None = None, contrast_on: str = "encoder",
                           method: str = "lease") -> ModelConfig:
    """Read every size from the state dict's shapes; only heads and V_gen are not in the shapes.

    `method` names the layout: "lease" (the authors' LEASE), "sorcen" or "mage" (LTH14/mage's
    pretraining layout: Sorcen's keys without teacher, projectors and predictor)."""
    required = REFERENCE_REQUIRED + (SORCEN_REQUIRED if method == "sorcen" else ())
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(f"not a {method} reference checkpoint: missing keys {missing}")
    vocab_size, dim = sd["token_emb.word_embeddings.weight"].shape
    dec_dim = sd["decoder_embed.weight"].shape[0]
    seq_plus_cls = sd["token_emb.position_embeddings.weight"].shape[0]
    grid = int(round((seq_plus_cls - 1) ** 0.5))
    if grid * grid + 1 != seq_plus_cls:
        raise CheckpointError(f"position table has {seq_plus_cls} rows, not a square grid plus [CLS]")
    sizes = dict(
        embed_dim=dim, depth=_count_blocks(sd, "blocks"),
        num_heads=num_heads or _heads_for(dim, "num_heads"),
        decoder_embed_dim=dec_dim, decoder_depth=_count_blocks(sd, "decoder_blocks"),
        decoder_num_heads=decoder_num_heads or _heads_for(dec_dim, "decoder_num_heads"),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, vocab_gen=vocab_gen, vocab_size=vocab_size,
        mask_token_id=mask_token_id, grid_size=grid, decoder_pos_rows=sd["decoder_pos_embed_learned"].shape[1])
    if method != "lease":
        return from_dict(ModelConfig, {**sizes, **_authors_layout(sd, method, cls_token_id)}, prefix="model.")
    codebook_dim = sd["proj_to_dino.0.weight"].shape[0] if "proj_to_dino.0.weight" in sd else None
    if contrast_on in DECODER_CONTRAST and "dec_to_dino.weight" not in sd:
        raise CheckpointError(f"contrast_on={contrast_on!r} needs 'dec_to_dino.weight', absent in checkpoint")
    if contrast_on in ENCODER_CONTRAST and codebook_dim is None:
        raise CheckpointError(f"contrast_on={contrast_on!r} needs 'proj_to_dino.0.weight', absent in checkpoint")
    if codebook_dim is None and "dec_to_dino.weight" in sd:
        codebook_dim = sd["dec_to_dino.weight"].shape[0]
    return from_dict(ModelConfig, dict(
        sizes, cls_token_id=cls_token_id, codebook_dim=codebook_dim,
        contrast_on=contrast_on if codebook_dim else "none"), prefix="model.")


def import_reference(checkpoint: str | Path, codebook: str | Path | None = None, *, method: str = "lease",
                     vocab_gen: int = 1024, num_heads: int | None = None, decoder_num_heads: int | None = None,
                     cls_token_id: int | None = None, mask_token_id: int | None = None,
                     contrast_on: str = "encoder", loss_cfg: LossConfig | None = None
                     ) -> tuple[LeaseModel, ImportReport]:
    """A project model computing the same numbers as the authors' checkpoint (+ its codebook, LEASE only).

    `method`: "lease", "sorcen" or "mage" (see `reference_model_config`)."""
    sd = read_state_dict(checkpoint)
    cfg = reference_model_config(sd, vocab_gen=vocab_gen, num_heads=num_heads,
                                 decoder_num_heads=decoder_num_heads, cls_token_id=cls_token_id,
                                 mask_token_id=mask_token_id, contrast_on=contrast_on, method=method)
    if method != "lease":
        return _import_authors(sd, cfg, checkpoint, loss_cfg)
    if "pos2d" in sd and not torch.allclose(sd["pos2d"].reshape(-1, cfg.embed_dim),
                                            sincos_2d(cfg.embed_dim, cfg.grid_size), atol=1e-5):
        raise CheckpointError("the checkpoint's pos2d table differs from the 2-D sin-cos table we compute")
    model = LeaseModel(cfg, loss_cfg)
    own = model.state_dict()
    report = ImportReport(config=cfg)
    converted = {}
    for key, value in sd.items():
        if key in own:
            if own[key].shape != value.shape:
                raise CheckpointError(f"key {key}: checkpoint shape {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            converted[key] = value
            report.loaded.append(key)
        elif key.startswith(REFERENCE_IGNORED) or key in ("dec_to_dino.weight", "proj_to_dino.0.weight"):
            report.ignored.append(key)
        else:
            raise CheckpointError(f"unexpected key {key!r} in reference checkpoint {checkpoint}")
    missing = [k for k in own if k not in converted and not k.startswith(("codebook_unit", "neighbour_"))]
    if missing:
        raise CheckpointError(f"reference checkpoint {checkpoint} lacks keys {missing}")
    model.load_state_dict(converted, strict=False)
    if cfg.contrast_on != "none":
        centroids = load_codebook(codebook)
        if centroids.shape[1] != cfg.codebook_dim:
            raise CheckpointError(f"codebook dim mismatch: {codebook} has D={centroids.shape[1]} but the "
                                  f"checkpoint projects to {cfg.codebook_dim}")
        model.set_codebook(centroids)
    log.info("imported %d tensors from %s (ignored: %s)", len(report.loaded), checkpoint, report.ignored)
    return model, report


def _import_authors(sd: dict[str, torch.Tensor], cfg: ModelConfig, checkpoint: str | Path,
                    loss_cfg: LossConfig | None) -> tuple[LeaseModel, ImportReport]:
    """Sorcen/MAGE: every tensor of our model from its renamed key (`authors_key`); the checkpoint's
    other keys (patch embedding, fixed tables, other heads) are unused and listed in one log line."""
    model = LeaseModel(cfg, loss_cfg)
    own = model.state_dict()
    report = ImportReport(config=cfg)
    converted = {}
    for key, value in sd.items():
        name = authors_key(key)
        if name not in own:
            report.ignored.append(key)
            continue
        if own[name].shape != value.shape:
            raise CheckpointError(f"key {key}: checkpoint shape {tuple(value.shape)} vs model {tuple(own[name].shape)}")
        converted[name] = value
        report.loaded.append(key)
    missing = [_authors_name(k) for k in own if k not in converted]
    if missing:
        raise CheckpointError(f"reference checkpoint {checkpoint} lacks keys {missing}")
    model.load_state_dict(converted)
    log.info("imported %d tensors from %s; unused keys: %s", len(report.loaded), checkpoint, report.ignored)
    return model, report


# --------------------------------------------------------------------- our training checkpoints
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write a training checkpoint (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """One of our training checkpoints, read on the CPU (where torch takes RNG states), weights only."""
    state = load_torch_file(path, CheckpointError)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise CheckpointError(f"{path} is not a lease training checkpoint (format {FORMAT_VERSION}); "
                              "for the authors' checkpoints use `lease import-reference`")
    return state


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LeaseModel:
    """Rebuild the model (config + weights + codebook buffers) from one of our checkpoints."""
    state = load_checkpoint(path)
    cfg = from_dict(ModelConfig, state["model_config"], prefix="model.")
    loss_cfg = from_dict(LossConfig, state.get("loss_config", {}), prefix="loss.")
    model = LeaseModel(cfg, loss_cfg)
    sd = state["model"]
    for name in ("codebook_unit", "neighbour_index", "neighbour_weight", "tail_centroids"):
        if name in sd:  # buffers sized by the codebook: resize before loading
            setattr(model, name, torch.empty_like(sd[name]))
    model.load_state_dict(sd)
    return model.to(device)


# ------------------------------------------------------ files only full unpickling can read
_PLAIN_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_DROPPED = object()


def convert_checkpoint(src: str | Path, dst: str | Path, *, trust_checkpoint: bool) -> list[str]:
    """Rewrite a torch file that pickles Python objects as one every loader here reads (weights only); the
    file is read weights-only too (`lease.io.load_torch_file_inert`), so no code it names runs.

    Tensors and plain data survive (dicts, lists, tuples, numbers, strings; numpy values become tensors
    or numbers, an `argparse.Namespace` a dict), so a Lightning checkpoint keeps its `state_dict`. Other
    objects (callbacks, loggers, custom classes) are dropped: their places are logged and returned.
    """
    src, dst = Path(src), Path(dst)
    if not trust_checkpoint:
        raise CheckpointError(f"converting {src} rewrites the tensors and plain data of a file that pickles Python "
                              "objects (those are dropped, none of their code runs): pass --trust-checkpoint only "
                              "for a file whose origin you trust")
    dropped: list[str] = []
    log.warning("reading %s beyond weights-only because --trust-checkpoint vouches for it (the Python objects it "
                "names are kept as inert records, and dropped)", src)
    plain = _plain_data(load_torch_file_inert(src, CheckpointError), "", dropped)
    if plain is _DROPPED:
        raise CheckpointError(f"{src} holds no tensors or plain data, only {dropped[0]}")
    with atomic_path(dst) as tmp:
        torch.save(plain, tmp)
        load_torch_file(tmp, CheckpointError)  # the output must read where the input was refused
    if dropped:
        log.warning("%s: dropped %d non-data objects: %s", src, len(dropped), "; ".join(dropped))
    log.info("wrote %s (weights-only loadable) from %s", dst, src)
    return dropped


def _plain_data(obj: Any, where: str, dropped: list[str]) -> Any:
    """`obj` as tensors and built-in containers and scalars, or `_DROPPED` (noted in `dropped`)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()  # a Parameter or tensor subclass becomes a plain tensor
    if type(obj) in _PLAIN_SCALARS:  # exact types: an IntEnum or str subclass would pickle its class
        return obj
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        items = ((key, _plain_data(value, f"{where}[{key!r}]", dropped)) for key, value in obj.items()
                 if _plain_key(key, where, dropped))
        return {key: value for key, value in items if value is not _DROPPED}
    if isinstance(obj, (list, tuple)):
        values = (_plain_data(value, f"{where}[{i}]", dropped) for i, value in enumerate(obj))
        kept = [value for value in values if value is not _DROPPED]
        return kept if isinstance(obj, list) else tuple(kept)
    dropped.append(f"{where or 'the whole file'} ({type(obj).__module__}.{type(obj).__qualname__})")
    return _DROPPED


def _plain_key(key: Any, where: str, dropped: list[str]) -> bool:
    if type(key) in _PLAIN_SCALARS:
        return True
    dropped.append(f"{where}[key {key!r}] ({type(key).__module__}.{type(key).__qualname__})")
    return False


ENCODER_KEYS = ("token_emb.word_embeddings", "token_emb.position_embeddings", "token_emb.LayerNorm", "blocks.", "norm.")


def export_encoder(model: LeaseModel, out_dir: str | Path) -> Path:
    """Encoder weights (token embedding, blocks, final norm; not Sorcen's teacher) as safetensors, config
    JSON beside them (its layout switches say how to embed: vocabulary ids, 2-D sin-cos or not)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(ENCODER_KEYS)}
    target = out_dir / "encoder.safetensors"
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "lease-encoder", "version": str(FORMAT_VERSION)})
    atomic_write_json(out_dir / "encoder_config.json", to_dict(model.cfg))
    return target


def load_encoder(export_dir: str | Path, device: str | torch.device = "cpu") -> LeaseModel:
    """An `export_encoder` directory back as a model whose encoder (`features`, `forward_encoder_full`) is
    the exported one, for any method; it has no contrast, echo or classifier heads, and its decoder is
    not part of the export (left at initialisation)."""
    export_dir = Path(export_dir)
    cfg = from_dict(ModelConfig, json.loads((export_dir / "encoder_config.json").read_text()), prefix="model.")
    model = LeaseModel(dataclasses.replace(cfg, contrast_on="none", echo_contrast=False, num_classes=0))
    tensors = load_file(str(export_dir / "encoder.safetensors"))
    absent = sorted(k for k in model.state_dict() if k.startswith(ENCODER_KEYS) and k not in tensors)
    if absent:
        raise CheckpointError(f"{export_dir} is not a complete encoder export: missing {absent}")
    model.load_state_dict(tensors, strict=False)
    return model.to(device)


def save_reference_import(model: LeaseModel, out: str | Path, source: str) -> Path:
    """Save an imported reference model as one of our checkpoints (model + configs, no optimizer)."""
    return save_checkpoint(out, {"model": model.state_dict(), "model_config": to_dict(model.cfg),
                                 "loss_config": to_dict(model.loss_cfg), "step": 0, "imported_from": source})


def describe_import(report: ImportReport) -> str:
    return json.dumps({"config": to_dict(report.config), "loaded": len(report.loaded),
                       "ignored": report.ignored}, indent=2)

