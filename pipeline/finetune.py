"""The pipeline's side of `lease eval finetune`: a manifest's images as the fine-tuning views.

`lease.evaluate.finetune` trains on any `AugmentedImages`; this module reads the manifest stage's parquet
and decodes with the pipeline's image loader, so that the core package needs neither.
"""
from __future__ import annotations

from pathlib import Path

from lease.evaluate.finetune import Views
from lease.evaluate.online import AugmentConfig, AugmentedImages, view_transform
from lease.images import decode_location
from pipeline.manifest import read_manifest


def manifest_views(manifest: Path, aug: AugmentConfig, seed: int) -> Views:
    """The manifest's train split as RandAug views and its val split as validation views."""
    views = []
    for split, view in (("train", "randaug"), ("val", "val")):
        rows = read_manifest(manifest, split=split)
        views.append(AugmentedImages(rows["location"].to_pylist(), rows["label"].to_pylist(), view_transform(aug, view),
                                     decode_location, seed=seed))
    return views[0], views[1]
