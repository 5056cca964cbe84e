"""Class embeddings from CLIP's text encoder: one prompt per class name (LEASE paper §4.4, Sorcen supplement I).

Each class name fills one template (default Sorcen's "An image of a {}"); a local Hugging Face `CLIPModel`
directory (config.json, the weights, the tokenizer files) encodes the prompts; the L2-normalised text
features, [num_classes, D] (D = CLIP's projection width), are the conditioning the decoder's class token
is mapped from (`lease.condgen`). Nothing is downloaded (`local_files_only`); a missing or incomplete
directory fails naming what to provide.

The features are cached by (digest of the checkpoint's files, names, template): `class_embeddings` in a
cache directory returns the stored array for the same triple without loading CLIP, and any change re-keys.
`lease.tokenizers.tiny.save_tiny_hf_clip` writes a random-weight CLIP in the same layout (tests, demo).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lease.configs import CONDGEN_TEMPLATE as DEFAULT_TEMPLATE
from lease.io import atomic_path, atomic_write_json, file_digest, json_digest

log = logging.getLogger(__name__)

CLIP_FILES_HINT = ("a Hugging Face CLIPModel directory as `save_pretrained` writes it (config.json, "
                   "model.safetensors or pytorch_model.bin, and the tokenizer: tokenizer.json or vocab.json + "
                   "merges.txt), e.g. a local copy of openai/clip-vit-base-patch32")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ClipNotFound(FileNotFoundError):
    """The CLIP checkpoint is missing or incomplete; the message names what to provide."""


@dataclass
class ClassEmbeddings:
    features: torch.Tensor  # float32 [num_classes, D]
    names: list[str]
    template: str
    key: str  # the cache key: digest of (checkpoint digest, names, template)
    cached: bool  # read from the cache, CLIP not loaded


def check_clip_dir(path: str | Path) -> Path:
    """`path` as a CLIPModel directory, or ClipNotFound naming the files to provide."""
    path = Path(path) if path else Path()
    if not str(path) or str(path) == ".":
        raise ClipNotFound(f"class embeddings need {CLIP_FILES_HINT}: set condgen.clip to its path")
    if not path.is_dir():
        raise ClipNotFound(f"CLIP checkpoint {path} does not exist: provide {CLIP_FILES_HINT}")
    if not (path / "config.json").is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ClipNotFound(f"{path} is not a complete CLIPModel directory (config.json and weights): provide "
                           f"{CLIP_FILES_HINT}")
    return path


def checkpoint_digest(path: str | Path) -> str:
    """Digest of every file of the checkpoint directory (names and contents)."""
    path = check_clip_dir(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return json_digest([[str(p.relative_to(path)), file_digest(p)] for p in files])


def prompts(names: list[str], template: str) -> list[str]:
    if "{}" not in template:
        raise ValueError(f"condgen.template {template!r} has no '{{}}' for the class name")
    return [template.format(name.replace("_", " ")) for name in names]


@torch.inference_mode()
def encode_prompts(clip_dir: str | Path, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised CLIP text features [len(texts), D] (the projection's output, as CLIP compares them)."""
    from transformers import AutoTokenizer, CLIPModel

    from lease.tokenizers.dinov2 import hf_progress_bars_only_on_terminals

    clip_dir = check_clip_dir(clip_dir)
    hf_progress_bars_only_on_terminals()
    try:
        tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ClipNotFound(f"{clip_dir} has no usable tokenizer ({err}): provide {CLIP_FILES_HINT}") from None
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    out = []
    for lo in range(0, len(texts), batch_size):
        batch = tokenizer(texts[lo : lo + batch_size], padding=True, truncation=True, return_tensors="pt")
        features = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        features = getattr(features, "pooler_output", features)  # newer transformers return an output object
        out.append(F.normalize(features.float(), dim=-1))
    return torch.cat(out)


def class_embeddings(clip_dir: str | Path, names: list[str], template: str = DEFAULT_TEMPLATE,
                     cache_dir: str | Path | None = None) -> ClassEmbeddings:
    """One CLIP text feature per class name, cached in `cache_dir` by (checkpoint digest, names, template)."""
    if not names:
        raise ValueError("class embeddings need at least one class name")
    key = json_digest({"clip": checkpoint_digest(clip_dir), "names": list(names), "template": template})[:16]
    cached = Path(cache_dir) / f"class-embeddings-{key}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        features = torch.from_numpy(np.load(cached))
        log.info("class embeddings: cache hit %s", cached)
        return ClassEmbeddings(features, list(names), template, key, cached=True)
    features = encode_prompts(clip_dir, prompts(names, template))
    if cached is not None:
        save_class_embeddings(cached, features, names, template, key)
    return ClassEmbeddings(features, list(names), template, key, cached=False)


def save_class_embeddings(path: str | Path, features: torch.Tensor, names: list[str], template: str,
                          key: str) -> Path:
    """The array as .npy and, beside it, a JSON of what it holds (names in row order, template, key)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, features.float().numpy())
    atomic_write_json(path.with_suffix(".json"), {"names": list(names), "template": template, "key": key,
                                                  "shape": list(features.shape)})
    return path


def load_class_embeddings(path: str | Path) -> torch.Tensor:
    array = np.load(path)
    if array.ndim != 2:
        raise ValueError(f"{path}: class embeddings must be [num_classes, D], got shape {array.shape}")
    return torch.from_numpy(array).float()


def read_names_file(path: str | Path) -> list[str]:
    """Class names, one per line in label order; a line `wnid name, more names` (ImageNet's LOC_synset_mapping
    layout) gives its first name after the id."""
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        head, _, rest = line.partition(" ")
        if rest and head[:1] == "n" and head[1:].isdigit():
            line = rest
        names.append(line.split(",")[0].strip())
    if not names:
        raise ValueError(f"names file {path} holds no class names")
    return names


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip", required=True, help="a local Hugging Face CLIPModel directory")
    names = parser.add_mutually_exclusive_group(required=True)
    names.add_argument("--names", type=Path, help="class names file, one per line in label order (or `wnid name`)")
    names.add_argument("--classes", help="comma-separated class names in label order")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt with {} for the class name")
    parser.add_argument("--out", type=Path, required=True, help=".npy to write ([num_classes, D]; a .json beside it)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="reuse features cached by (checkpoint, names, "
                        "template)")


def run_cli(args: argparse.Namespace) -> int:
    names = read_names_file(args.names) if args.names else [n.strip() for n in args.classes.split(",") if n.strip()]
    emb = class_embeddings(args.clip, names, args.template, args.cache_dir)
    save_class_embeddings(args.out, emb.features, names, args.template, emb.key)
    log.info("wrote %s: %d classes x %d (key %s%s)", args.out, *emb.features.shape, emb.key,
             ", from the cache" if emb.cached else "")
    return 0
