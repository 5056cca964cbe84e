"""Class-conditional generation from the frozen encoder (LEASE paper §4.4, tables 7 and A.5).

The pretrained model is loaded, everything but the decoder is frozen (no gradient, and in eval mode so
the encoder's dropout is off: "the encoder is kept completely frozen"), and the decoder is fine-tuned by
the reconstruction loss alone (eq. 1, the pretraining mask law) with extra input rows beside the canvas
(`LeaseModel.condition_rows`): a class token, a linear map of CLIP's text feature of "An image of a
{class}" (`lease.clip_text`), and with `tail: centroids` the discriminative centroid of every patch. A
learned null class token replaces the class with probability `null_prob`, so sampling can use
classifier-free guidance. Training is `lease.train`'s loop (checkpoints, exact resume, metrics, DDP under
torchrun); a completed run exports the conditional decoder (`export_conditional_decoder`).

Table A.5's settings are the defaults of `train` (`TABLE_A5`): AdamW, base lr 1.5e-4, batch 4096, 300
epochs, 5 warm-up, clip 3.0, label smoothing 0.1, dropout 0.5.

Sampling (MaskGIT, `lease.evaluate.generate`) needs a tail without an image: `sample_tail` "exemplar"
takes the codebook ids of a random training image of the class (the tails the decoder was trained on),
"class_mode" the per-position most frequent id among the class's training images (one tail per class).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from lease.checkpoints import ENCODER_KEYS, CheckpointError, load_checkpoint
from lease.cli_help import show_defaults
from lease.codebook import load_codebook
from lease.configs import TABLE_A5, ModelConfig, TrainConfig, condgen_train_config  # noqa: F401 (TABLE_A5: re-exported)
from lease.data import TokenSet
from lease.io import atomic_path, atomic_write_json
from lease.model import Condition, LeaseModel
from lease.typed_config import ConfigError, apply_overrides, from_dict, load_yaml, require, to_dict

log = logging.getLogger(__name__)

# Trained in condgen: the decoder and the conditioning inputs; every other parameter stays as pretrained
DECODER_PREFIXES = ("decoder_embed.", "decoder_pos_embed_learned", "decoder_blocks.", "decoder_norm.", "mlm_layer.",
                    "class_proj.", "null_class", "tail_proj.", "tail_pos_embed")
CONDITION_BUFFERS = ("class_text", "tail_centroids")
# Settings of the conditional run's `train.model` that apply to the pretrained architecture: speed
# switches and the fine-tuning dropout; the sizes and layout come from the pretraining checkpoint
RUN_MODEL_FIELDS = ("dropout", "attention_backend", "sdpa_kernel", "dropout_impl", "residual_dtype",
                    "decode_masked_only")
SampleTail = Literal["exemplar", "class_mode"]


@dataclass
class CondGenConfig:
    """One conditional decoder fine-tuning run (`lease train-condgen`)."""

    pretrained: str = ""  # our pretraining checkpoint (checkpoint.pt of `lease train`)
    class_embeddings: str = ""  # .npy [num_classes, D] of CLIP text features (`lease class-embeddings`)
    tail: Literal["centroids", "none"] = "centroids"  # centroids: LEASE; none: the class token alone (Sorcen)
    tail_positions: Literal["shared", "own"] = "shared"  # the tail's positions: the decoder's grid table, or own
    null_prob: float = 0.1  # share of training rows with the null class token (classifier-free guidance)
    train: TrainConfig = field(default_factory=lambda: condgen_train_config({}))

    def __post_init__(self) -> None:
        require(0.0 <= self.null_prob < 1.0, "null_prob", "must be in [0, 1)")
        require(self.tail == "none" or bool(self.train.data.codebook) or not self.pretrained, "train.data.codebook",
                "the centroid tail needs the codebook file (tail=none trains without it)")


def condgen_config(data: dict[str, Any]) -> CondGenConfig:
    """Plain data → CondGenConfig; `train` goes through `condgen_train_config` (errors name `train.<key>`)."""
    data = dict(data)
    train = data.pop("train", None) or {}
    if not isinstance(train, dict):
        raise ConfigError(f"train: expected a mapping, got {train!r}")
    try:
        train_cfg = condgen_train_config(train)
    except ConfigError as err:
        raise ConfigError(f"train.{err}") from None
    return from_dict(CondGenConfig, {**data, "train": train_cfg})


# ----------------------------------------------------------------------------------------- model
def conditional_model_config(base: ModelConfig, cfg: CondGenConfig, class_text_shape: tuple[int, int],
                             codebook_dim: int | None) -> ModelConfig:
    """The pretrained architecture with the conditioning inputs, without the pretraining-only heads."""
    run = {name: getattr(cfg.train.model, name) for name in RUN_MODEL_FIELDS}
    return dataclasses.replace(
        base, contrast_on="none", echo_contrast=False, num_classes=0, **run,
        codebook_dim=codebook_dim if cfg.tail == "centroids" else base.codebook_dim,
        cond_classes=class_text_shape[0], cond_text_dim=class_text_shape[1], cond_tail=cfg.tail,
        cond_tail_positions=cfg.tail_positions, cond_null_prob=cfg.null_prob)


def conditional_model(cfg: CondGenConfig) -> LeaseModel:
    """The pretrained weights in the conditional model, the conditioning installed, all but the decoder frozen."""
    from lease.clip_text import load_class_embeddings

    state = load_checkpoint(cfg.pretrained)
    base = from_dict(ModelConfig, state["model_config"], prefix="model.")
    class_text = load_class_embeddings(cfg.class_embeddings)
    centroids = load_codebook(cfg.train.data.codebook) if cfg.tail == "centroids" else None
    model = LeaseModel(conditional_model_config(base, cfg, tuple(class_text.shape),
                                                None if centroids is None else centroids.shape[1]))
    load_pretrained(model, state["model"], cfg.pretrained)
    model.set_condition(class_text, centroids)
    freeze_all_but_decoder(model)
    return model


def is_condition_key(key: str) -> bool:
    return key.startswith(("class_proj.", "null_class", "tail_proj.", "tail_pos_embed") + CONDITION_BUFFERS)


def load_pretrained(model: LeaseModel, sd: dict[str, torch.Tensor], source: str | Path) -> None:
    """Every encoder and decoder tensor from the pretraining state dict (its contrast, echo and classifier
    heads are left out); the conditioning inputs keep their initialisation."""
    own = model.state_dict()
    absent = sorted(k for k in own if not is_condition_key(k) and k not in sd)
    if absent:
        raise CheckpointError(f"{source} lacks {len(absent)} tensors of the model, e.g. {absent[:3]}: "
                              "not a pretraining checkpoint of this architecture")
    model.load_state_dict({k: v for k, v in sd.items() if k in own and not is_condition_key(k)}, strict=False)


def freeze_all_but_decoder(model: LeaseModel) -> list[str]:
    """Only the decoder and the conditioning inputs keep gradients; the rest is put in eval mode too (no
    dropout in the frozen encoder). Returns the trained parameters' names."""
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(DECODER_PREFIXES))
        if param.requires_grad:
            trained.append(name)
    for name, module in model.named_children():
        if not name.startswith(tuple(p.split(".")[0] for p in DECODER_PREFIXES)):
            module.eval()
    return trained


# ------------------------------------------------------------------------------------ train, export
def train_condgen(cfg: CondGenConfig, out_dir: str | Path, resume: bool = False,
                  stop_after: int | None = None) -> dict:
    """Fine-tune the conditional decoder through `lease.train.train` (checkpoint, resume, metrics, DDP)."""
    from lease.train import train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        (out_dir / "condgen_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return train(cfg.train, out_dir, resume=resume, stop_after=stop_after,
                 build=lambda *_: conditional_model(cfg), export=export_conditional_decoder)


def export_conditional_decoder(model: LeaseModel, out_dir: str | Path) -> Path:
    """The decoder, the conditioning inputs and buffers, and the token embeddings the MLM head scores
    against, as safetensors with the model config beside them. With the pretraining's encoder export
    (`lease export`) they make the whole sampler (`load_conditional_export`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = DECODER_PREFIXES + CONDITION_BUFFERS + ("token_emb.word_embeddings",)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(keep)}
    target = out_dir / "conditional_decoder.safetensors"
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "lease-conditional-decoder"})
    atomic_write_json(out_dir / "conditional_decoder_config.json", to_dict(model.cfg))
    return target


def load_conditional_export(decoder_dir: str | Path, encoder_dir: str | Path,
                            device: str | torch.device = "cpu") -> LeaseModel:
    """A conditional model from `export_conditional_decoder`'s and `export_encoder`'s directories."""
    decoder_dir, encoder_dir = Path(decoder_dir), Path(encoder_dir)
    cfg = from_dict(ModelConfig, json.loads((decoder_dir / "conditional_decoder_config.json").read_text()),
                    prefix="model.")
    model = LeaseModel(cfg)
    decoder = load_file(str(decoder_dir / "conditional_decoder.safetensors"))
    encoder = {k: v for k, v in load_file(str(encoder_dir / "encoder.safetensors")).items()
               if k.startswith(ENCODER_KEYS)}
    if "tail_centroids" in decoder:
        model.tail_centroids = torch.empty_like(decoder["tail_centroids"])
    tensors = {**encoder, **decoder}
    absent = sorted(k for k in model.state_dict() if k not in tensors)
    if absent:
        raise CheckpointError(f"{decoder_dir} + {encoder_dir} do not make a conditional model: missing {absent[:3]}")
    model.load_state_dict(tensors)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------- sampling
def sampling_tails(tokens: TokenSet, class_id: int, count: int, mode: SampleTail,
                   generator: torch.Generator) -> torch.Tensor:
    """Codebook ids [count, L] to condition `count` samples of `class_id` on, from its training images."""
    rows = (tokens.labels == class_id).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError(f"class {class_id} has no training images to take a centroid tail from "
                         "(or use condgen.tail=none)")
    disc = tokens.disc[rows].long()
    if mode == "exemplar":
        picks = torch.randint(rows.numel(), (count,), generator=generator, device=generator.device).cpu()
        return disc[picks]
    if mode == "class_mode":
        return disc.mode(dim=0).values.expand(count, -1).clone()
    raise ValueError(f"sample_tail must be exemplar or class_mode, got {mode!r}")


def class_condition(model: LeaseModel, class_id: int, count: int, tails: torch.Tensor | None,
                    device: torch.device) -> Condition:
    """The fixed conditioning of `count` samples of one class (tails: codebook ids, for `cond_tail`)."""
    if not 0 <= class_id < model.cfg.cond_classes:
        raise ValueError(f"class {class_id} is outside the decoder's {model.cfg.cond_classes} classes")
    if (tails is None) != (model.tail_proj is None):
        raise ValueError("a centroid-tail decoder needs tails, a class-token decoder none")
    classes = torch.full((count,), class_id, dtype=torch.long, device=device)
    return Condition(classes, None if tails is None else tails.to(device))


def generate_class(sampler, class_id: int, count: int, tokens: TokenSet | None, mode: SampleTail) -> torch.Tensor:
    """`count` MaskGIT samples uint16 [count, L] of one class (full batches, as `MaskGitSampler.generate`)."""
    model, batch = sampler.model, sampler.cfg.batch_size
    out = torch.empty(count, model.cfg.seq_len, dtype=torch.uint16)
    for lo in range(0, count, batch):
        tails = None if model.tail_proj is None else sampling_tails(tokens, class_id, batch, mode, sampler.generator)
        condition = class_condition(model, class_id, batch, tails, sampler.device)
        drawn = sampler.sample(batch, condition)[: count - lo]
        out[lo : lo + drawn.shape[0]] = drawn.to(torch.int32).cpu().to(torch.uint16)
    return out


# ---------------------------------------------------------------------------------------------- CLI
def load_condgen_config(path: str | None, overrides: list[str], **fixed: str | None) -> CondGenConfig:
    data = load_yaml(path) if path else {}
    data.update({k: v for k, v in fixed.items() if v})
    return condgen_config(apply_overrides(data, overrides))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML of a CondGenConfig (pretrained, class_embeddings, tail, train: ...)")
    parser.add_argument("--pretrained", default=None, help="pretraining checkpoint (overrides the config's)")
    parser.add_argument("--class-embeddings", default=None, help=".npy of CLIP class features (lease class-embeddings)")
    parser.add_argument("--out", required=True, help="run directory (checkpoint, metrics, export)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. tail=none train.batch_size=256 "
                        "train.data.shards=DIR train.data.codebook=centroids.npy")


def run_cli(args: argparse.Namespace) -> int:
    cfg = load_condgen_config(args.config, args.overrides, pretrained=args.pretrained,
                              class_embeddings=args.class_embeddings)
    result = train_condgen(cfg, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))  # the command's result, for scripts
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lease train-condgen", description=__doc__)
    add_arguments(parser)
    return run_cli(show_defaults(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
