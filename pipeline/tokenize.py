"""Tokenize: JPEG → both crops → VQGAN codes + DINOv2 codebook ids, per shard.

Every image is decoded once per pass; its `vqgan.image_size` crop (256 for MAGE's VQGAN) is encoded to a
16×16 grid of codes and its 224 crop goes through DINOv2 to 16×16 patch features, whose nearest centroids
(`pipeline.assign`, the k-means metric) are the discriminative tokens. Features stay on the device.
Both grids are position-aligned because both crops cover the same central square of the image.

One pass computes the fields it is asked for: both (the fused pass: one decode feeds VQGAN and DINOv2),
`vq` alone (the generative codes, which do not depend on the codebook), or `disc` alone with the `vq`
field read from an earlier pass's shards (a new codebook: DINOv2 + assignment only, no VQGAN).

Output, one folder per split: `<out>/<split>/shard-000123.npz` with `keys` (str [n]), the fields of that
output among `vq` (uint16 [n, 256]) and `disc` (uint16 [n, 256]), and `labels` (int64 [n]); shard j holds
rows [j·images_per_shard, (j+1)·images_per_shard) of the split's usable manifest rows, in manifest order.
Each shard is written atomically with fixed zip timestamps, so a shard's bytes depend only on its
inputs: an interrupted run resumes by skipping the shards that exist and ends identical to an
uninterrupted one, and the same fields give the same bytes whichever pass computed them.

`sample_features` is the pass before k-means: DINOv2 patch features of a seeded random sample of
train images (a seeded random subset of patches per image) written to one `.npy` for the k-means stage.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lease.cli_help import first_paragraph, show_defaults
from lease.codebook import load_codebook
from lease.io import atomic_path, json_digest
from lease.tokenizers import codes_to_uint16, load_vqgan
from lease.tokenizers.dinov2 import DEFAULT_IMAGE_SIZE, DEFAULT_LAYER, load_dinov2
from pipeline.assign import Assigner, resolve_device
from lease.images import make_loader
from pipeline.manifest import SPLIT_ORDER, read_manifest

log = logging.getLogger(__name__)

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
COMPILE_CHOICES = ("auto", "on", "off")
FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # the .npy dtype is the same name
TOKEN_FIELDS = ("vq", "disc")  # the token grids a shard can hold, in their order in the file
WAIT_HINT_SHARE = 0.1  # the loop waiting longer than this share of its time for decoding is worth a hint
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: identical inputs → identical shard bytes


@dataclass
class TokenizeSummary:
    out_dir: Path  # the first output's folder
    num_images: dict[str, int]  # tokenized images per split (all shards, including skipped ones)
    num_shards: dict[str, int]
    shards_written: int
    shards_skipped: int  # already complete from an earlier run
    seconds: float
    images_per_second: float  # over the images processed by this run
    vq_codes: int | None  # VQGAN codebook size (None: this pass ran no VQGAN)
    disc_codes: int | None  # centroids (None: this pass ran no assignment)
    first_batch_seconds: float = 0.0  # per split, summed: loader start and compilation, not per image
    fields: tuple[str, ...] = TOKEN_FIELDS  # the token grids this pass computed


@dataclass
class FeatureSampleSummary:
    path: Path
    num_images: int
    patches_per_image: int
    dim: int
    dtype: str
    seconds: float
    images_per_second: float
    layer: int = DEFAULT_LAYER


# ------------------------------------------------------------------------------------------- shards


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.npz"


def save_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an `.npz` (readable by np.load) atomically, with no timestamps that vary between runs."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), "w") as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)


def shard_ranges(num_rows: int, images_per_shard: int) -> list[range]:
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    return [range(s, min(s + images_per_shard, num_rows)) for s in range(0, num_rows, images_per_shard)]


# ----------------------------------------------------------------------------------------- one pass


class FusedTokenizer:
    """The networks of one pass on one device: the VQGAN (field `vq`) and/or DINOv2 + nearest centroid
    (field `disc`); uint8 crops in (one per field, in `fields` order), int64 [B, N] token grids out."""

    def __init__(self, vqgan=None, dinov2=None, assigner: Assigner | None = None,
                 device: torch.device = torch.device("cpu"), pad_to: int = 0):
        if (dinov2 is None) != (assigner is None):
            raise ValueError("the discriminative tokens need both DINOv2 and a codebook")
        if vqgan is None and dinov2 is None:
            raise ValueError("a tokenize pass needs the VQGAN, DINOv2 + a codebook, or both")
        self.vqgan, self.dinov2, self.assigner, self.device = vqgan, dinov2, assigner, device
        # Compiled networks are specialised to one batch size: a short last batch is padded to `pad_to`
        # rather than compiled again (a recompile costs tens of seconds; padding a fraction of a batch).
        self.pad_to = pad_to
        if vqgan is not None and dinov2 is not None and vqgan.grid_size != dinov2.grid_size:
            raise ValueError(f"VQGAN grid {vqgan.grid_size}x{vqgan.grid_size} at {vqgan.image_size} px and DINOv2 "
                             f"grid {dinov2.grid_size}x{dinov2.grid_size} at {dinov2.image_size} px are not "
                             "position-aligned: choose crop sizes that give both the same grid")
        if dinov2 is not None and dinov2.embed_dim != assigner.dim:
            raise ValueError(f"DINOv2 features have D={dinov2.embed_dim} but the codebook has D={assigner.dim}: "
                             "use the codebook trained on this DINOv2 model and layer")

    @property
    def fields(self) -> tuple[str, ...]:
        return ("vq",) * (self.vqgan is not None) + ("disc",) * (self.dinov2 is not None)

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        return tuple(self._network(field).image_size for field in self.fields)

    @property
    def num_codes(self) -> dict[str, int]:
        """Each computed field's vocabulary: VQGAN codes, codebook centroids."""
        return {field: self.vqgan.num_codes if field == "vq" else self.assigner.num_centroids
                for field in self.fields}

    def _network(self, field: str):
        return self.vqgan if field == "vq" else self.dinov2

    @torch.inference_mode()
    def __call__(self, *crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = crops[0].shape[0]
        grids = []
        for field, crop in zip(self.fields, crops):
            images = to_unit_float(pad_batch(crop, self.pad_to), self.device)
            if field == "vq":
                grids.append(self.vqgan.encode(images).flatten(1)[:n])
            else:  # [B, N, D] patch features, never leaving the device
                grids.append(self.assigner.assign(self.dinov2(images)[:n]))
        return tuple(grids)


def pad_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """`images` with zero images appended up to `size` rows (unchanged when it has that many or more)."""
    missing = size - images.shape[0]
    if missing <= 0:
        return images
    return torch.cat([images, images.new_zeros((missing, *images.shape[1:]))])


def to_unit_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B,3,H,W] (pinned or on device) → float32 in [0, 1] on `device` (the tokenizers' input range)."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def _settings(dtype: str, compile: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile {compile!r} is not one of {', '.join(COMPILE_CHOICES)}")
    return DTYPES[dtype], compile == "on" or (compile == "auto" and device.type == "cuda")


def load_fused_tokenizer(*, vqgan_kind: str = "maskgit", vqgan_checkpoint: str | Path | None,
                         vqgan_config: str | Path | None = None, dinov2_kind: str = "hf",
                         dinov2_path: str | Path | None, layer: int = DEFAULT_LAYER,
                         centroids: str | Path | None, dino_size: int = DEFAULT_IMAGE_SIZE, dtype: str = "auto",
                         device: torch.device, compile: str = "auto", batch_size: int = 0,
                         kept: bool = False) -> FusedTokenizer:
    """The pass's networks: the VQGAN when `vqgan_checkpoint` is given, DINOv2 + nearest centroid when
    `dinov2_path` and `centroids` are. `compile` ("auto": on CUDA) wraps the networks in torch.compile:
    the fused GroupNorm/swish of the VQGAN encoder roughly doubles its throughput
    (benchmarks/results/tokenize-vqgan-encode-*). `kept=True` keeps each network for the next call with
    the same files and settings (a worker that runs several partitions loads and compiles them once)."""
    torch_dtype, compiled = _settings(dtype, compile, device)
    vqgan = dinov2 = assigner = None
    if vqgan_checkpoint:
        load = _kept_vqgan if kept else _load_vqgan
        vqgan = load(_stamp(vqgan_checkpoint) + _stamp(vqgan_config), vqgan_kind, str(vqgan_checkpoint),
                     str(vqgan_config) if vqgan_config else None, device, torch_dtype, compiled)
    if dinov2_path or centroids:
        if not (dinov2_path and centroids):
            raise ValueError("the discriminative tokens need both DINOv2 (dinov2_path) and a codebook (centroids)")
        load = _kept_dinov2 if kept else _load_dinov2
        dinov2 = load(_stamp(dinov2_path), dinov2_kind, str(dinov2_path), layer, dino_size, device, torch_dtype,
                      compiled)
        assigner = (_kept_assigner if kept else _load_assigner)(_stamp(centroids), str(centroids), device)
    return FusedTokenizer(vqgan, dinov2, assigner, device, pad_to=batch_size if compiled else 0)


def _stamp(path: str | Path | None) -> tuple:
    """What identifies a file's contents for the kept networks: path, size, mtime (a rewrite changes them)."""
    if not path:
        return ()
    stat = Path(path).stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _load_vqgan(stamps: tuple, kind: str, checkpoint: str, config: str | None, device: torch.device,
                dtype: torch.dtype | None, compiled: bool):
    return load_vqgan(kind, checkpoint, config, device, dtype=dtype, compile=compiled)


def _load_dinov2(stamps: tuple, kind: str, path: str, layer: int, size: int, device: torch.device,
                 dtype: torch.dtype | None, compiled: bool):
    return load_dinov2(kind, path, device, layer, image_size=size, dtype=dtype, compile=compiled)


def _load_assigner(stamps: tuple, centroids: str, device: torch.device) -> Assigner:
    return Assigner(load_codebook(centroids), device=device)


# One of each per process: a worker alternating fused and single passes keeps both networks.
_kept_vqgan = functools.lru_cache(maxsize=1)(_load_vqgan)
_kept_dinov2 = functools.lru_cache(maxsize=1)(_load_dinov2)
_kept_assigner = functools.lru_cache(maxsize=1)(_load_assigner)


def release_cached_tokenizer() -> None:
    """Drop the kept networks (their GPU memory) once a process has no more partitions to run."""
    for kept in (_kept_vqgan, _kept_dinov2, _kept_assigner):
        kept.cache_clear()


@dataclass
class SplitResult:
    images: int  # usable rows of the split
    shards: int
    written: int
    skipped: int  # complete before this run
    processed: int  # images run through the models by this call
    first_batch_seconds: float = 0.0  # loader start + compilation: the same for any number of images


class WaitClock:
    """Iterates `items`, adding up in `waited` the seconds spent waiting for each next item."""

    def __init__(self, items):
        self.items, self.waited = items, 0.0

    def __iter__(self):
        iterator = iter(self.items)
        while True:
            t0 = time.perf_counter()
            item = next(iterator, None)
            self.waited += time.perf_counter() - t0
            if item is None:
                return
            yield item


class ShardWriter:
    """Writes shard j of a split into every output folder that lacks it, each with its own fields: the
    computed grids, or the ones read from `given` (an earlier pass's shard j of the same rows)."""

    def __init__(self, rows: dict[str, list], shards: list[range], outputs: Mapping[Path, Sequence[str]],
                 given: Path | None, num_codes: dict[str, int]):
        self.rows, self.shards, self.outputs, self.given, self.num_codes = rows, shards, outputs, given, num_codes

    def missing(self, j: int) -> list[Path]:
        return [folder for folder in self.outputs if not (folder / shard_name(j)).exists()]

    def write(self, j: int, computed: dict[str, torch.Tensor]) -> None:
        shard = self.shards[j]
        keys = np.asarray(self.rows["key"][shard.start:shard.stop], dtype=str)
        grids = {field: codes_to_uint16(grid, self.num_codes[field]).cpu().numpy() for field, grid in computed.items()}
        grids.update(self._given(j, keys, set(self.fields) - set(grids)))
        labels = np.asarray(self.rows["label"][shard.start:shard.stop], dtype=np.int64)
        for folder in self.missing(j):
            fields = self.outputs[folder]
            save_shard(folder / shard_name(j), {"keys": keys, **{f: grids[f] for f in TOKEN_FIELDS if f in fields},
                                                "labels": labels})

    @property
    def fields(self) -> set[str]:
        return {field for fields in self.outputs.values() for field in fields}

    def _given(self, j: int, keys: np.ndarray, fields: set[str]) -> dict[str, np.ndarray]:
        if not fields:
            return {}
        path = self.given / shard_name(j)
        with np.load(path, allow_pickle=False) as shard:
            if not np.array_equal(shard["keys"], keys):
                raise ValueError(f"{path} holds other images than rows {self.shards[j].start}-"
                                 f"{self.shards[j].stop - 1} of the manifest: it belongs to another manifest")
            return {field: shard[field] for field in fields}


def tokenize_split(model: FusedTokenizer, manifest: str | Path, split: str,
                   outputs: Path | Mapping[Path, Sequence[str]], *, batch_size: int, num_workers: int,
                   images_per_shard: int, gpu_decode: bool = False, max_shards: int | None = None,
                   only: Collection[int] | None = None, given: Path | None = None) -> SplitResult:
    """Tokenize one split into each output folder's `shard-*.npz` ({folder: fields}; a plain folder gets
    both fields), skipping the shards every output already has; `only` restricts the work to those
    shard indices (a partition of the stage). Fields the model does not compute come from `given`."""
    outputs = {outputs: TOKEN_FIELDS} if isinstance(outputs, Path) else dict(outputs)
    table = read_manifest(manifest, split=split)
    rows = {"key": table["key"].to_pylist(), "label": table["label"].to_pylist(),
            "location": table["location"].to_pylist()}
    shards = shard_ranges(len(rows["key"]), images_per_shard)
    writer = ShardWriter(rows, shards, outputs, given, model.num_codes)
    if writer.fields - set(model.fields) and given is None:
        raise ValueError(f"fields {sorted(writer.fields - set(model.fields))} are neither computed nor given")
    mine = range(len(shards)) if only is None else sorted(only)
    done = {j for j in mine if not writer.missing(j)}
    pending = [j for j in mine if j not in done][:max_shards]
    for folder in outputs:  # an empty partition of a split still has its folder
        folder.mkdir(parents=True, exist_ok=True)
    if not pending:
        return SplitResult(len(rows["key"]), len(shards), 0, len(done), 0)

    # One loader over the pending shards' rows (in order); outputs are cut back into shards as they come.
    order = [i for j in pending for i in shards[j]]
    loader = make_loader([rows["location"][i] for i in order], batch_size, num_workers,
                         pin_memory=model.device.type == "cuda", sizes=model.crop_sizes, gpu_decode=gpu_decode,
                         device=model.device)
    bar = tqdm(total=len(order), desc=f"tokenize {split}", unit="img", dynamic_ncols=True, disable=None)
    queue = list(pending)
    parts: list[list[torch.Tensor]] = [[] for _ in model.fields]
    filled, started, first_batch = 0, time.perf_counter(), 0.0
    batches = WaitClock(loader)
    for _, *crops in batches:
        grids = model(*crops)
        if not first_batch:  # the first batch also compiles the networks: say what it cost
            first_batch = time.perf_counter() - started
            log.info("tokenize %s: first batch (compilation included) done after %.1f s", split, first_batch)
        for kept, grid in zip(parts, grids):
            kept.append(grid)
        filled += grids[0].shape[0]
        bar.update(grids[0].shape[0])
        while queue and filled >= len(shards[queue[0]]):
            j = queue.pop(0)
            n = len(shards[j])
            joined = [torch.cat(kept) for kept in parts]
            writer.write(j, {field: grid[:n] for field, grid in zip(model.fields, joined)})
            parts, filled = [[grid[n:]] for grid in joined], filled - n
    bar.close()
    _log_loader_wait(split, batches.waited, time.perf_counter() - started, num_workers)
    return SplitResult(len(rows["key"]), len(shards), len(pending), len(done), len(order), first_batch)


def _log_loader_wait(split: str, waited: float, total: float, num_workers: int) -> None:
    """How long the GPU loop waited for decoded batches: the hint for choosing num_workers."""
    share = waited / total if total > 0 else 0.0
    hint = f": decoding is the bottleneck, more workers than {num_workers} would help" \
        if share > WAIT_HINT_SHARE else ""
    log.info("tokenize %s: waited %.1f s of %.1f s (%.0f%%) for decoded batches%s", split, waited, total,
             100 * share, hint)


def tokenize(manifest: str | Path, centroids: str | Path, out_dir: str | Path, *, vqgan_kind: str,
             vqgan_checkpoint: str | Path, vqgan_config: str | Path | None = None, dinov2_kind: str = "hf",
             dinov2_path: str | Path, layer: int = DEFAULT_LAYER, dino_size: int = DEFAULT_IMAGE_SIZE,
             splits: Sequence[str] = SPLIT_ORDER, batch_size: int = 128, num_workers: int = 8,
             images_per_shard: int = 10_000, dtype: str = "auto", device: str | torch.device = "auto",
             gpu_decode: bool = False, max_shards: int | None = None, compile: str = "auto",
             shards: dict[str, list[int]] | None = None) -> TokenizeSummary:
    """Tokenize the usable rows of each split of `manifest` into `out_dir/<split>/shard-*.npz` with both
    fields, in one fused pass (see `encode_manifest` for the arguments)."""
    return encode_manifest(manifest, {out_dir: TOKEN_FIELDS}, vqgan_kind=vqgan_kind, vqgan_checkpoint=vqgan_checkpoint,
                           vqgan_config=vqgan_config, dinov2_kind=dinov2_kind, dinov2_path=dinov2_path,
                           centroids=centroids, layer=layer, dino_size=dino_size, splits=splits,
                           batch_size=batch_size, num_workers=num_workers, images_per_shard=images_per_shard,
                           dtype=dtype, device=device, gpu_decode=gpu_decode, max_shards=max_shards,
                           compile=compile, shards=shards)


def encode_manifest(manifest: str | Path, outputs: Mapping[str | Path, Sequence[str]], *,
                    given: str | Path | None = None, vqgan_kind: str = "maskgit",
                    vqgan_checkpoint: str | Path | None = None, vqgan_config: str | Path | None = None,
                    dinov2_kind: str = "hf", dinov2_path: str | Path | None = None,
                    centroids: str | Path | None = None, layer: int = DEFAULT_LAYER,
                    dino_size: int = DEFAULT_IMAGE_SIZE, splits: Sequence[str] = SPLIT_ORDER,
                    batch_size: int = 128, num_workers: int = 8, images_per_shard: int = 10_000,
                    dtype: str = "auto", device: str | torch.device = "auto", gpu_decode: bool = False,
                    max_shards: int | None = None, compile: str = "auto",
                    shards: dict[str, list[int]] | None = None) -> TokenizeSummary:
    """One pass over the usable rows of each split of `manifest`: every output folder `out` gets
    `out/<split>/shard-*.npz` holding its fields (`vq`, `disc` or both). The networks run are those
    of the fields not found in `given` (a folder of `<split>/shard-*.npz` of the same rows holding
    them): the VQGAN for `vq`, DINOv2 + nearest centroid of `centroids` for `disc`; both from one
    decode when both are computed.

    `max_shards` stops after that many new shards per split (a later call continues); `gpu_decode`
    decodes JPEGs with nvJPEG on `device`; `shards` names the shards of each split to write (one
    partition of the stage; default all). The networks are loaded once per process and kept for the
    next call with the same files (a worker running several partitions).
    """
    device = resolve_device(device)
    outputs = {Path(folder): tuple(fields) for folder, fields in outputs.items()}
    wanted = {field for fields in outputs.values() for field in fields}
    unknown = wanted - set(TOKEN_FIELDS)
    if unknown:
        raise ValueError(f"unknown token fields {sorted(unknown)}: choose among {', '.join(TOKEN_FIELDS)}")
    computed = wanted - ({"vq"} if given else set())  # an earlier pass's shards hold the generative codes
    model = load_fused_tokenizer(vqgan_kind=vqgan_kind, vqgan_checkpoint=vqgan_checkpoint if "vq" in computed else None,
                                 vqgan_config=vqgan_config, dinov2_kind=dinov2_kind,
                                 dinov2_path=dinov2_path if "disc" in computed else None, layer=layer,
                                 centroids=centroids if "disc" in computed else None, dino_size=dino_size,
                                 dtype=dtype, device=device, compile=compile, batch_size=batch_size, kept=True)
    log.info("tokenize on %s: %s", device, _describe(model, vqgan_kind, dinov2_kind, layer, given))
    start = time.perf_counter()
    results = {split: tokenize_split(model, manifest, split,
                                     {folder / split: fields for folder, fields in outputs.items()},
                                     batch_size=batch_size, num_workers=num_workers,
                                     images_per_shard=images_per_shard, gpu_decode=gpu_decode, max_shards=max_shards,
                                     only=None if shards is None else shards.get(split, []),
                                     given=Path(given) / split if given else None)
               for split in splits}
    seconds = time.perf_counter() - start
    processed = sum(r.processed for r in results.values())
    summary = TokenizeSummary(next(iter(outputs)), {s: r.images for s, r in results.items()},
                              {s: r.shards for s, r in results.items()}, sum(r.written for r in results.values()),
                              sum(r.skipped for r in results.values()), seconds,
                              processed / seconds if seconds > 0 else 0.0, model.num_codes.get("vq"),
                              model.num_codes.get("disc"), sum(r.first_batch_seconds for r in results.values()),
                              model.fields)
    log.info("tokenized %s images into %s shards (%d written, %d already done) in %.1f s (%.0f img/s)",
             summary.num_images, summary.num_shards, summary.shards_written, summary.shards_skipped, seconds,
             summary.images_per_second)
    return summary


def _describe(model: FusedTokenizer, vqgan_kind: str, dinov2_kind: str, layer: int, given: Path | None) -> str:
    parts = []
    if model.vqgan is not None:
        parts.append(f"VQGAN {vqgan_kind} ({model.vqgan.num_codes} codes, {model.vqgan.image_size} px)")
    elif given:
        parts.append(f"VQGAN codes read from {given}")
    if model.dinov2 is not None:
        parts.append(f"DINOv2 {dinov2_kind} layer {layer} ({model.dinov2.image_size} px), "
                     f"{model.assigner.num_centroids} centroids")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------- partitions


def partition_shards(manifest: str | Path, images_per_shard: int, count: int) -> list[dict[str, Any]]:
    """The stage's shards cut into at most `count` contiguous runs of about equal length, train then val:
    [{"shards": {split: [shard indices]}, "rows": digest of those shards' (split, key, location) rows}].

    A partition is whole shards, so the files it writes are exactly the single-process run's files.
    """
    units, rows = [], {}
    for split in SPLIT_ORDER:
        table = read_manifest(manifest, split=split)
        rows[split] = list(zip(table["key"].to_pylist(), table["location"].to_pylist()))
        units += [(split, j, shard) for j, shard in enumerate(shard_ranges(len(rows[split]), images_per_shard))]
    bounds = np.linspace(0, len(units), min(count, len(units)) + 1).round().astype(int)
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        chosen = units[start:stop]
        shards = {split: [j for s, j, _ in chosen if s == split] for split in SPLIT_ORDER}
        listed = [[split, *rows[split][i]] for split, _, shard in chosen for i in shard]
        parts.append({"shards": {k: v for k, v in shards.items() if v}, "rows": json_digest(listed)})
    return parts


def merge_partitions(part_dirs: Sequence[Path], out_dir: Path) -> dict[str, int]:
    """Link every partition's shard files into `out_dir/<split>/` (hard links: no second copy on disk,
    a copy where the file system has none); returns the shard count per split."""
    counts: dict[str, int] = {}
    for part in part_dirs:
        for shard in sorted(part.glob("*/shard-*.npz")):
            target = out_dir / shard.parent.name / shard.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                raise ValueError(f"two partitions wrote {shard.parent.name}/{shard.name}: the partition plan "
                                 "overlaps")
            try:
                os.link(shard, target)
            except OSError:
                shutil.copy2(shard, target)
            counts[shard.parent.name] = counts.get(shard.parent.name, 0) + 1
    return counts


def read_shards(folder: str | Path) -> dict[str, np.ndarray]:
    """All shards of one split folder concatenated in order (for tests, statistics and packing)."""
    paths = sorted(Path(folder).glob("shard-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no shard-*.npz in {folder}: run the tokenize stage first")
    parts = [dict(np.load(p, allow_pickle=False)) for p in paths]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


# ------------------------------------------------------------------------------------ feature sample


SKIP_ROWS = 1 << 16  # the generator is skipped ahead this many images' draws at a time


def skipped_generator(seed: int, images: int, num_patches: int) -> torch.Generator:
    """The patch-choice generator as it stands after `images` images (each draws `num_patches` uniforms)."""
    generator = torch.Generator().manual_seed(seed)
    for done in range(0, images, SKIP_ROWS):
        torch.rand(min(SKIP_ROWS, images - done), num_patches, generator=generator)
    return generator


def feature_sample_parts(manifest: str | Path, num_images: int, seed: int, count: int) -> list[dict[str, Any]]:
    """The feature sample cut into at most `count` contiguous runs of images:
    [{"images": [start, stop], "rows": digest of those images' locations}]."""
    locations = read_manifest(manifest, split="train")["location"].to_pylist()
    chosen = sample_rows(len(locations), num_images, seed)
    bounds = np.linspace(0, len(chosen), min(count, len(chosen)) + 1).round().astype(int)
    return [{"images": [int(a), int(b)], "rows": json_digest([locations[i] for i in chosen[a:b]])}
            for a, b in zip(bounds[:-1], bounds[1:])]


def concatenate_feature_parts(parts: Sequence[Path], out_path: Path) -> None:
    """One `.npy` from the parts' files, in order (what one process would have written)."""
    arrays = [np.load(path, mmap_mode="r") for path in parts]
    with atomic_path(out_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=arrays[0].dtype,
                                        shape=(sum(len(a) for a in arrays), arrays[0].shape[1]))
        done = 0
        for array in arrays:
            out[done:done + len(array)] = array
            done += len(array)
        out.flush()
        del out


def sample_rows(num_rows: int, num_images: int, seed: int) -> np.ndarray:
    """A seeded random subset of row indices, sorted (files are then read in manifest order)."""
    rng = np.random.default_rng(seed)
    take = min(num_images, num_rows)
    return np.sort(rng.choice(num_rows, size=take, replace=False))


def sample_features(manifest: str | Path, out_path: str | Path, *, dinov2_kind: str, dinov2_path: str | Path,
                    layer: int = DEFAULT_LAYER, num_images: int = 100_000, patches_per_image: int = 64,
                    seed: int = 0, batch_size: int = 256, num_workers: int | None = None,
                    dino_size: int = DEFAULT_IMAGE_SIZE,
                    dtype: str = "auto", out_dtype: str = "float16", device: str | torch.device = "auto",
                    gpu_decode: bool = False, part: tuple[int, int] | None = None) -> FeatureSampleSummary:
    """DINOv2 patch features of a seeded sample of train images → `.npy` [num_images·patches, D].

    The patch subset of each image is drawn from a CPU generator seeded with `seed`, in row order, so the
    sample is the same on any device and with any batch size. `part=(start, stop)` computes only those
    images of the sample (the generator skipped ahead to `start`), so that the parts' files concatenated
    are the whole sample's file. `num_workers` defaults to min(8, cores).
    """
    num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    if out_dtype not in FEATURE_DTYPES:
        raise ValueError(f"out_dtype {out_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    device = resolve_device(device)
    dinov2 = load_dinov2(dinov2_kind, dinov2_path, device, layer, image_size=dino_size, dtype=DTYPES[dtype])
    num_patches = dinov2.grid_size ** 2
    if not 1 <= patches_per_image <= num_patches:
        raise ValueError(f"patches_per_image must be in [1, {num_patches}], got {patches_per_image}")
    table = read_manifest(manifest, split="train")
    if table.num_rows == 0:
        raise ValueError(f"{manifest} has no usable train images to sample features from")
    chosen = sample_rows(table.num_rows, num_images, seed)
    start_at, stop_at = part or (0, len(chosen))
    chosen = chosen[start_at:stop_at]
    locations = table["location"].to_pylist()
    loader = make_loader([locations[i] for i in chosen], batch_size, num_workers,
                         pin_memory=device.type == "cuda", sizes=(dino_size,), gpu_decode=gpu_decode, device=device)
    generator = skipped_generator(seed, start_at, num_patches)
    out_path = Path(out_path)
    start, done = time.perf_counter(), 0
    bar = tqdm(total=len(chosen), desc="sample features", unit="img", dynamic_ncols=True, disable=None)
    with atomic_path(out_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(out_dtype),
                                        shape=(len(chosen) * patches_per_image, dinov2.embed_dim))
        for _, img in loader:
            n = img.shape[0]
            pick = torch.rand(n, num_patches, generator=generator).argsort(dim=1)[:, :patches_per_image]
            features = dinov2(to_unit_float(img, device))
            picked = features.gather(1, pick.to(device)[..., None].expand(-1, -1, features.shape[-1]))
            # Cast on the device: half the bytes cross to the host and no numpy cast runs in this thread.
            out[done * patches_per_image:(done + n) * patches_per_image] = \
                picked.reshape(-1, features.shape[-1]).to(FEATURE_DTYPES[out_dtype]).cpu().numpy()
            done += n
            bar.update(n)
        out.flush()
        del out
    bar.close()
    seconds = time.perf_counter() - start
    log.info("sampled %d patch features of %d images (dim %d, %s) into %s in %.1f s", len(chosen) * patches_per_image,
             len(chosen), dinov2.embed_dim, out_dtype, out_path, seconds)
    return FeatureSampleSummary(out_path, len(chosen), patches_per_image, dinov2.embed_dim, out_dtype, seconds,
                                len(chosen) / seconds if seconds > 0 else 0.0, layer)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lease tokenize", description=first_paragraph(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("manifest", type=Path, help="parquet manifest from the manifest stage")
        p.add_argument("--dinov2-kind", default="hf", choices=["hf", "timm"])
        p.add_argument("--dinov2", type=Path, required=True, help="HF model directory or timm weights file")
        p.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="DINOv2 block (default: third from last)")
        p.add_argument("--dino-size", type=int, default=DEFAULT_IMAGE_SIZE, help="DINOv2 crop size")
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--num-workers", type=int, default=8, help="decode worker processes")
        p.add_argument("--dtype", default="auto", choices=list(DTYPES))
        p.add_argument("--device", default="auto")
        p.add_argument("--gpu-decode", action="store_true", help="decode JPEGs with nvJPEG on the device")

    p = sub.add_parser("run", help="VQGAN codes + codebook ids of every usable image, sharded")
    common(p)
    p.add_argument("--centroids", type=Path, required=True, help="codebook .npy float32 [K, D]")
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per split)")
    p.add_argument("--vqgan-kind", default="maskgit", choices=["maskgit", "taming"])
    p.add_argument("--vqgan", type=Path, required=True, help="VQGAN checkpoint")
    p.add_argument("--vqgan-config", type=Path, default=None, help="taming YAML config (kind taming)")
    p.add_argument("--images-per-shard", type=int, default=10_000)
    p.add_argument("--splits", nargs="+", default=list(SPLIT_ORDER), choices=list(SPLIT_ORDER))
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many new shards per split")
    p.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                   help="torch.compile the networks (auto: on CUDA)")

    p = sub.add_parser("features", help="DINOv2 patch features of a random train sample, for k-means")
    common(p)
    p.add_argument("--out", type=Path, required=True, help=".npy file to write")
    p.add_argument("--num-images", type=int, default=100_000)
    p.add_argument("--patches-per-image", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dtype", default="float16", choices=list(FEATURE_DTYPES))

    args = show_defaults(parser).parse_args(argv)
    shared = dict(dinov2_kind=args.dinov2_kind, dinov2_path=args.dinov2, layer=args.layer, dino_size=args.dino_size,
                  batch_size=args.batch_size, num_workers=args.num_workers, dtype=args.dtype, device=args.device,
                  gpu_decode=args.gpu_decode)
    if args.command == "run":
        tokenize(args.manifest, args.centroids, args.out, vqgan_kind=args.vqgan_kind, vqgan_checkpoint=args.vqgan,
                 vqgan_config=args.vqgan_config, splits=args.splits, images_per_shard=args.images_per_shard,
                 max_shards=args.max_shards, compile=args.compile, **shared)
    else:
        sample_features(args.manifest, args.out, num_images=args.num_images, patches_per_image=args.patches_per_image,
                        seed=args.seed, out_dtype=args.out_dtype, **shared)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
