"""Online tokenization for evaluation: image → augmented view → VQGAN codes → encoder, batched.

The authors' linear-probe, few-shot and fine-tuning scripts (MAE's, run on MAGE's tokenizer) tokenize a
fresh augmented view of every image at every step, where the `fast` protocol reads the cached centre-crop
tokens. Views (DESIGN.md "Evaluation"):

- train: RandomResizedCrop(256, scale 0.2–1, bicubic) + horizontal flip (torchvision v2), the probe's;
- val: Resize(292) → CenterCrop(256) (256 / 0.875, MAE's ratio), bicubic;
- randaug: timm's `create_transform` (RandAugment m9 mstd0.5, RRC 0.2–1, flip), fine-tuning's. As in the
  authors' (MAGE's) fine-tuning script: their RRC range, and RandAugment fills with the ImageNet mean colour
  (they normalize by the ImageNet mean / std, mix, and denormalize before the VQGAN: the same [0, 1] pixels).

Data side (`AugmentedImages`, `epoch_loader`): loader workers decode each image with the `decode` function
given (the pipeline's image loader; `lease` does not import `pipeline`) and transform it. Every random draw
of a view comes from generators seeded by (seed, epoch, index), so a view is reproducible for a seed,
differs between epochs and does not depend on the worker count. Batches arrive as uint8 [B, 3, S, S].

Model side (`OnlineTokenizer`): the batch goes to the device once, becomes [0, 1] float and is encoded by the
VQGAN (compiled on CUDA, `lease.tokenizers`) in chunks, a short one padded to the compiled chunk size.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from lease.typed_config import require

View = Literal["train", "val", "randaug"]


@dataclass
class AugmentConfig:
    image_size: int = 256  # the VQGAN's input side
    min_scale: float = 0.2  # RandomResizedCrop scale range (train view)
    max_scale: float = 1.0
    hflip: float = 0.5
    val_resize: int = 292  # short side before the centre crop (val view)
    randaug: str = "rand-m9-mstd0.5-inc1"  # timm auto_augment spec of the randaug view (table A.3: RandAug(9, 0.5))
    randaug_min_scale: float = 0.2  # the authors' fine-tuning RRC range (timm's default is 0.08)
    batch_size: int = 256
    num_workers: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.image_size > 0, "image_size", "must be > 0")
        require(0 < self.min_scale <= self.max_scale <= 1, "min_scale", "need 0 < min_scale <= max_scale <= 1")
        require(0 <= self.hflip <= 1, "hflip", "is a probability")
        require(self.val_resize >= self.image_size, "val_resize", "must be >= image_size (then centre-cropped)")
        require(0 < self.randaug_min_scale <= 1, "randaug_min_scale", "must be in (0, 1]")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")


def view_transform(cfg: AugmentConfig, view: View) -> Callable:
    """The transform of a decoded RGB PIL image for `view` (see the module docstring)."""
    bicubic = InterpolationMode.BICUBIC
    if view == "train":
        return v2.Compose([v2.PILToTensor(),
                           v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_scale, cfg.max_scale),
                                                interpolation=bicubic, antialias=True),
                           v2.RandomHorizontalFlip(cfg.hflip)])
    if view == "val":
        return v2.Compose([v2.PILToTensor(), v2.Resize(cfg.val_resize, interpolation=bicubic, antialias=True),
                           v2.CenterCrop(cfg.image_size)])
    if view == "randaug":
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

        # timm's crop/flip and RandAugment stages, then uint8 instead of its final ToTensor + Normalize: a
        # quarter of the bytes through the loader's shared memory and pinning; `to_unit` divides by 255 on
        # the device. The mean given sets only RandAugment's fill colour (the Normalize is not used).
        crop_flip, randaug, _ = create_transform(cfg.image_size, is_training=True, separate=True,
                                                 scale=(cfg.randaug_min_scale, 1.0), hflip=cfg.hflip,
                                                 auto_augment=cfg.randaug, interpolation="bicubic", re_prob=0.0,
                                                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        return v2.Compose([*crop_flip.transforms, *randaug.transforms, v2.PILToTensor()])
    raise ValueError(f"view must be train, val or randaug; got {view!r}")


@contextlib.contextmanager
def seeded_draws(*entropy: int) -> Iterator[None]:
    """Seed torch's, Python's and numpy's global generators (torchvision v2 draws from torch, timm's
    RandAugment from `random` and numpy) from `entropy`, restoring their states afterwards."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class AugmentedImages(Dataset):
    """(view, label) of image `i`: `transform(decode(locations[i]))`, drawn from (seed, epoch, i)."""

    def __init__(self, locations: Sequence[str], labels: Sequence[int], transform: Callable,
                 decode: Callable[[str], object], seed: int = 0):
        if len(locations) != len(labels):
            raise ValueError(f"{len(locations)} images but {len(labels)} labels")
        self.locations, self.labels = list(locations), torch.as_tensor(list(labels), dtype=torch.long)
        self.transform, self.decode, self.seed, self.epoch = transform, decode, seed, 0

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.decode(self.locations[index])
        with seeded_draws(self.seed, self.epoch, index):
            return self.transform(image), self.labels[index]


def epoch_loader(data: AugmentedImages, epoch: int, batch_size: int, num_workers: int, shuffle: bool,
                 pin_memory: bool = False) -> DataLoader:
    """One epoch's batches: views of `epoch`, a seeded order (when `shuffle`), full batches only when
    shuffling (the training steps), every image otherwise. Workers are started per epoch, so they see it."""
    data.epoch = epoch
    order = (torch.randperm(len(data), generator=torch.Generator().manual_seed(data.seed * 100_003 + epoch))
             if shuffle else torch.arange(len(data)))
    return DataLoader(data, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=shuffle, persistent_workers=False,
                      prefetch_factor=4 if num_workers > 0 else None)


def to_unit(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A view batch on `device` as float in [0, 1]: uint8 views are divided by 255, float ones kept."""
    images = images.to(device, non_blocking=True)
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


class OnlineTokenizer:
    """View batches → VQGAN code ids int64 [B, L] on the tokenizer's device, encoded `chunk` images at a time
    (the VQGAN's activations bound the memory, not the probe's batch)."""

    def __init__(self, vqgan, chunk: int):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.vqgan, self.device, self.chunk = vqgan, vqgan.device, chunk
        self.compiled = getattr(vqgan, "compiled", False)

    def resized(self, chunk: int) -> "OnlineTokenizer":
        """The same VQGAN encoding at most `chunk` images at a time (a compiled one then holds both sizes)."""
        return OnlineTokenizer(self.vqgan, min(chunk, self.chunk))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit(images, self.device)
        return torch.cat([self._encode(part) for part in x.split(self.chunk)])

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.compiled and n < self.chunk:  # compiled encoders are specialised to one batch size: pad
            x = torch.cat([x, x.new_zeros((self.chunk - n, *x.shape[1:]))])
        return self.vqgan.encode(x).flatten(1)[:n]
