"""Scoring the class-conditional decoder (LEASE paper §4.4, table 7): samples per class with the class
fixed (`lease.condgen.generate_class`), a grid per class, and FID / IS of all of them."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lease.condgen import SampleTail, generate_class
from lease.data import TokenSet
from lease.evaluate.fid import TokenImages, check_weights, fid_is
from lease.evaluate.generate import decode_images
from lease.evaluate.grids import save_image_grid
from lease.io import atomic_path, atomic_write_json
from lease.model import LeaseModel

log = logging.getLogger(__name__)


@dataclass
class CondGenEval:
    """What `evaluate_classes` samples and scores (the pipeline's `condgen` section holds these)."""

    samples_per_class: int = 50
    classes: int = 0  # the first N classes by label; 0: all
    sample_tail: SampleTail = "exemplar"
    grid_classes: int = 8
    grid_rows: int = 4


def evaluate_classes(model: LeaseModel, sampler, vqgan, train_tokens: TokenSet | None, reference, fid_cfg,
                     opts: CondGenEval, out: Path, device: torch.device, weights_key: str = "fid.weights") -> dict:
    """Per class `samples_per_class` MaskGIT samples with its class token (and tail) fixed, grids
    `class-<id>.png` for the first `grid_classes`, then FID / IS of all samples against `reference` through
    `lease.evaluate.fid` (null, with the file to provide at `weights_key`, when the extractor's weights are
    missing).
    Writes samples_tokens.npy [C·n, L] (row order: class by class) and condgen.json (INTERFACES.md)."""
    classes = opts.classes or model.cfg.cond_classes
    drawn = []
    for class_id in range(classes):
        tokens = generate_class(sampler, class_id, opts.samples_per_class, train_tokens, opts.sample_tail)
        if class_id < opts.grid_classes:
            shown = tokens[: opts.grid_rows * opts.grid_rows].to(device)
            save_image_grid(decode_images(vqgan, shown, sampler.grid_size, sampler.cfg.dtype),
                            out / f"class-{class_id}.png", nrow=opts.grid_rows)
        drawn.append(tokens)
    every = torch.cat(drawn)
    with atomic_path(out / "samples_tokens.npy") as tmp, tmp.open("wb") as fh:
        np.save(fh, every.numpy())
    result = {"fid": None, "isc": None, "isc_std": None, "samples_per_class": opts.samples_per_class,
              "classes": classes, "guidance": sampler.cfg.guidance, "tail": model.cfg.cond_tail,
              "sample_tail": opts.sample_tail, "protocol": sampler.cfg.preset, "extractor": fid_cfg.feature_extractor,
              "missing": None}
    try:
        result["extractor"] = str(check_weights(fid_cfg))
    except FileNotFoundError as err:
        result["missing"] = str(err).replace("fid.weights", weights_key)  # the key of the caller's config
        log.warning("class-conditional FID/IS skipped: %s", err)
    if result["missing"] is None:
        decode = lambda t: decode_images(vqgan, t.to(device), sampler.grid_size, sampler.cfg.dtype)  # noqa: E731
        scores = fid_is(TokenImages(every, decode, uint8=sampler.cfg.uint8), reference, fid_cfg, device=device)
        result.update(fid=scores["fid"], isc=scores["isc_mean"], isc_std=scores["isc_std"])
    atomic_write_json(out / "condgen.json", result)
    return result
