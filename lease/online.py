"""Images to VQGAN codes on the device, for `pretrain.method: mage_online` (MAGE as published: its
pretraining loader's RandomResizedCrop(256, scale 0.2–1) + horizontal flip, then the VQGAN in the step).

    uint8 squares [B, 3, S, S] on the device
        ──one crop box per image (RandomResizedCrop's law) and one coin per image for the flip──►
    float [B, 3, R, R] in [0, 1]  ──VQGAN encode (compiled on CUDA)──►  codes [B, (R / f)²]

`OnlineTokenizer` is that step and nothing else: usable wherever images must become codes on the GPU
(training, and evaluation on images). `ManifestImages` feeds it a manifest's images through the
pipeline's own loader (`lease.images.make_loader`: decoded and centre-cropped to S exactly as the
tokenize stage does), so any source the manifest stage reads works. With the whole square as the crop
and no flip (`OnlineTokenizer.encode_centre`) the codes are the tokenize stage's.

torchvision's v2.RandomResizedCrop on a batched tensor applies one box to the whole batch, and per image
it would be a Python loop per sample in the step; here the boxes are drawn for the whole batch at once by
the same law (10 tries of area ~ U(scale)·S², log aspect ~ U(log ratio), the whole square when none
fits) and resampled in one `torchvision.ops.roi_align` call: bilinear, averaging ceil(box / R)² samples
per output pixel when the box is larger than R (antialiasing), and exactly the input pixels for the
whole square at R = S.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torchvision.ops import roi_align

from lease.configs import TrainConfig
from lease.data import Batch
from lease.tokenizers import GenerativeTokenizer
from lease.typed_config import ConfigError

CROP_TRIES = 10  # torchvision's RandomResizedCrop draws at most this many boxes before its fallback


@dataclass
class ImageBatch:
    images: torch.Tensor  # uint8 [B, 3, S, S] on the training device
    labels: torch.Tensor  # int64 [B]


def crop_boxes(batch: int, side: int, scale: tuple[float, float], ratio: tuple[float, float],
               device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop's boxes for `batch` squares of `side` px, drawn together on the device:
    float [B, 4] (x1, y1, x2, y2) in pixels. Per image the first of `CROP_TRIES` draws that fits
    (area ~ U(scale)·side², aspect w/h ~ exp U(log ratio), w = round(√(area·aspect)), h = round(√(area/aspect)),
    corner uniform over the places it fits); the whole square when none fits (its aspect 1 lies in `ratio`)."""
    u = torch.rand(4, batch, CROP_TRIES, device=device, generator=generator)
    area = side * side * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w >= 1) & (w <= side) & (h >= 1) & (h <= side)
    top, left = (u[2] * (side - h + 1)).floor(), (u[3] * (side - w + 1)).floor()
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(dim=1)
    pick = lambda t, whole: torch.where(found, t.gather(1, first).squeeze(1), whole)  # noqa: E731
    x1, y1 = pick(left, 0.0), pick(top, 0.0)
    return torch.stack([x1, y1, x1 + pick(w, float(side)), y1 + pick(h, float(side))], dim=1)


class OnlineTokenizer:
    """uint8 images on the device → augmented crops → VQGAN codes [B, L] (int64), no gradients.

    `scale`, `ratio` and `flip` are MAGE's augmentation (RandomResizedCrop(R, scale, ratio) and a
    horizontal flip with probability 1/2); R is the VQGAN's input side."""

    def __init__(self, vqgan: GenerativeTokenizer, scale: tuple[float, float], ratio: tuple[float, float],
                 flip: bool):
        self.vqgan, self.scale, self.ratio, self.flip = vqgan, tuple(scale), tuple(ratio), flip

    @property
    def num_codes(self) -> int:
        return self.vqgan.num_codes

    @torch.no_grad()
    def augment(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [B, 3, S, S] → float [B, 3, R, R] in [0, 1]: one random resized crop and flip per image."""
        b, side = images.shape[0], images.shape[-1]
        boxes = crop_boxes(b, side, self.scale, self.ratio, images.device, generator)
        crops = self._resample(images, boxes)
        if self.flip:
            heads = torch.rand(b, device=images.device, generator=generator) < 0.5
            crops = torch.where(heads[:, None, None, None], crops.flip(-1), crops)
        return crops

    def _resample(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
        return roi_align(images.float().div_(255.0), rois, self.vqgan.image_size, spatial_scale=1.0,
                         sampling_ratio=-1, aligned=True)

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """float crops [B, 3, R, R] in [0, 1] → codes [B, L]."""
        return self.vqgan.encode(crops).flatten(1)

    def encode_centre(self, images: torch.Tensor) -> torch.Tensor:
        """The codes of the whole square, unflipped (resampled to R when S differs)."""
        side = images.shape[-1]
        boxes = images.new_tensor([[0.0, 0.0, side, side]], dtype=torch.float32).expand(images.shape[0], 4)
        return self.encode(self._resample(images, boxes))

    def tokenize(self, batch: ImageBatch, generator: torch.Generator | None = None) -> Batch:
        """The training view of an image batch as a token batch (no codebook ids: MAGE has no contrast)."""
        return Batch(self.encode(self.augment(batch.images, generator)), None, batch.labels)


def load_online_tokenizer(kind: str, checkpoint: str, config: str | None, device: torch.device, scale, ratio,
                          flip: bool, compile: bool) -> OnlineTokenizer:
    """The project's VQGAN (`lease.tokenizers.load_vqgan`; compiled when `compile`) with MAGE's augmentation."""
    from lease.tokenizers import load_vqgan

    vqgan = load_vqgan(kind, checkpoint, config or None, device, compile=compile)
    return OnlineTokenizer(vqgan, scale, ratio, flip)


class ManifestImages:
    """A manifest split's usable images as uint8 centre squares of `side` px on `device`, in batches of
    a per-epoch order drawn from (seed, epoch), each rank its share, so any step resumes (as
    `lease.data.ResidentBatches`). Decoding runs in the pipeline loader's workers."""

    def __init__(self, manifest: str, split: str, batch_size: int, side: int, device: torch.device, seed: int,
                 num_workers: int, rank: int = 0, world_size: int = 1):
        from lease.manifests import read_manifest

        table = read_manifest(manifest, split=split)
        self.locations = table["location"].to_pylist()
        self.labels = torch.tensor(table["label"].to_pylist(), dtype=torch.int64)
        self.batch_size, self.side, self.device, self.seed = batch_size, side, device, seed
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.steps_per_epoch = len(self.locations) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the manifest's {split} split has {len(self.locations)} images, fewer than one global "
                             f"batch of {batch_size * world_size}: lower batch_size")

    def epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(len(self.locations), generator=gen)[self.rank :: self.world_size]
        return order[: self.steps_per_epoch * self.batch_size]

    def iterate(self, start_step: int) -> Iterator[ImageBatch]:
        """Batches from global step `start_step` on, forever (epoch after epoch)."""
        from lease.images import make_loader

        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            order = self.epoch_order(epoch)[offset * self.batch_size:]
            loader = make_loader([self.locations[i] for i in order.tolist()], self.batch_size, self.num_workers,
                                 pin_memory=self.device.type == "cuda", sizes=(self.side,))
            for index, squares in loader:
                yield ImageBatch(squares.to(self.device, non_blocking=True),
                                 self.labels[order[index]].to(self.device, non_blocking=True))
            epoch, offset = epoch + 1, 0


def online_inputs(cfg: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1
                  ) -> tuple[ManifestImages, OnlineTokenizer]:
    """mage_online's data and tokenizer from `cfg.online`: the manifest's train images and the VQGAN, whose
    code count must be the model's V_gen and whose input side the crops' size."""
    o = cfg.online
    for key in ("manifest", "vqgan_checkpoint"):
        if not getattr(o, key):
            raise ConfigError(f"online.{key}: method 'mage_online' reads images and tokenizes them in the step: "
                              f"set online.{key}")
    compiled = o.compile == "on" or (o.compile == "auto" and device.type == "cuda")
    tokenizer = load_online_tokenizer(o.vqgan_kind, o.vqgan_checkpoint, o.vqgan_config, device, o.crop_scale,
                                      o.crop_ratio, o.flip, compiled)
    if tokenizer.num_codes != cfg.model.vocab_gen:
        raise ConfigError(f"model.vocab_gen: the VQGAN {o.vqgan_checkpoint} has {tokenizer.num_codes} codes but "
                          f"model.vocab_gen={cfg.model.vocab_gen}")
    if tokenizer.vqgan.grid_size != cfg.model.grid_size:
        raise ConfigError(f"model.grid_size: the VQGAN gives {tokenizer.vqgan.grid_size}² codes at "
                          f"{tokenizer.vqgan.image_size} px but model.grid_size={cfg.model.grid_size}")
    images = ManifestImages(o.manifest, "train", cfg.batch_size // world_size, o.source_size, device, cfg.seed,
                            o.num_workers, rank, world_size)
    return images, tokenizer
