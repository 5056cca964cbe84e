"""The built-in demo image set: a small ImageFolder tree of generated JPEGs whose class is visible.

Each class has its own foreground hue, shape family and stripe orientation; every image varies the
shape's position, scale and colour, the background gradient, the noise and the image's size and aspect
ratio (so the manifest and the resize + crop path see non-square images). Features that tell these
classes apart exist at the patch level (colour, edges, texture), so the pipeline's k-NN and linear probe
numbers on the demo are meaningful smoke tests, not chance.

Deterministic: image (split, class, i) is drawn from its own generator seeded by (seed, split, class, i),
so any subset can be regenerated and two runs with one seed write identical files.

Two evaluation sets are drawn the same way (`evaluate.datasets` with `root: demo`): a robustness set of the
pretraining classes under corruptions at several severities, in ImageNet-C's
<corruption>/<severity>/<class>/ layout (`make_demo_corruptions`), and a transfer set of new classes
(further hues and stripe angles of the same family) with train and val splits (`make_demo_transfer`).
"""
from __future__ import annotations

import argparse
import colorsys
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from lease.cli_help import first_paragraph, show_defaults
from lease.io import atomic_path

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SHAPES = ("disc", "square", "ring", "diamond", "cross")
ASPECT_RANGE = (0.7, 1.45)  # width / height
SIZE_JITTER = (0.85, 1.5)  # long side relative to image_size
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ClassStyle:
    """What makes a class recognisable."""

    hue: float  # foreground hue in [0, 1)
    shape: str
    stripe_angle: float  # radians; texture inside the shape

    @property
    def name(self) -> str:
        return f"{self.shape}_{int(round(self.hue * 360)):03d}"


def class_styles(num_classes: int) -> list[ClassStyle]:
    """Distinct (hue, shape, stripe angle) per class; hues are spread around the colour wheel."""
    golden = 0.618033988749895  # successive hues as far apart as possible for any class count
    return [ClassStyle(hue=(c * golden) % 1.0, shape=SHAPES[c % len(SHAPES)],
                       stripe_angle=np.pi * ((c * 3) % 8) / 8) for c in range(num_classes)]


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in shape-centred coordinates u, v (unit radius)."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.1
    if shape == "cross":
        return ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.maximum(np.abs(u), np.abs(v)) <= 1.0)
    raise ValueError(f"unknown shape {shape!r}")


def render_image(style: ClassStyle, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [H, W, 3] image of a class with random size, aspect, placement and colours."""
    aspect = rng.uniform(*ASPECT_RANGE)
    long_side = image_size * rng.uniform(*SIZE_JITTER)
    width, height = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    width, height = max(16, int(round(width))), max(16, int(round(height)))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)

    # Background: a soft gradient in the complementary hue, so the object colour stands out.
    bg_a = _rgb(style.hue + 0.5 + rng.uniform(-0.08, 0.08), rng.uniform(0.1, 0.35), rng.uniform(0.55, 0.9))
    bg_b = _rgb(style.hue + 0.5 + rng.uniform(-0.08, 0.08), rng.uniform(0.1, 0.35), rng.uniform(0.3, 0.7))
    direction = rng.uniform(0, 2 * np.pi)
    t = (np.cos(direction) * x / width + np.sin(direction) * y / height + 1) / 2
    image = bg_a * (1 - t[..., None]) + bg_b * t[..., None]

    # Foreground: the class shape, placed and scaled at random, striped at the class angle.
    short = min(width, height)
    radius = short * rng.uniform(0.22, 0.42)
    cx = rng.uniform(radius, width - radius) if width > 2 * radius else width / 2
    cy = rng.uniform(radius, height - radius) if height > 2 * radius else height / 2
    u, v = (x - cx) / radius, (y - cy) / radius
    mask = _shape_mask(style.shape, u, v)
    period = rng.uniform(0.25, 0.4)
    angle = style.stripe_angle + rng.uniform(-0.1, 0.1)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * u + np.sin(angle) * v) / period)
    fg = _rgb(style.hue + rng.uniform(-0.03, 0.03), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    fg_dark = fg * rng.uniform(0.35, 0.6)
    shade = fg_dark + (fg - fg_dark) * stripes[..., None]
    image = np.where(mask[..., None], shade, image)

    image = image + rng.normal(0.0, rng.uniform(0.01, 0.05), size=image.shape).astype(np.float32)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), label, index])


def _class_name(label: int, style: ClassStyle, prefix: str = "c") -> str:
    return f"{prefix}{label:03d}_{style.name}"


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, "RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY)


def corrupt(pixels: np.ndarray, corruption: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """ImageNet-C's idea at demo scale: Gaussian noise, Gaussian blur or lowered contrast, stronger with
    `severity` (1 = mild)."""
    image = pixels.astype(np.float32) / 255.0
    if corruption == "noise":
        image = image + rng.normal(0.0, 0.04 * severity, size=image.shape).astype(np.float32)
    elif corruption == "contrast":
        image = image.mean() + (image - image.mean()) * (1.0 - 0.15 * severity)
    elif corruption == "blur":
        radius = severity * max(pixels.shape[:2]) / 128
        return np.asarray(Image.fromarray(pixels, "RGB").filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)
    else:
        raise ValueError(f"unknown corruption {corruption!r}: noise, blur or contrast")
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


EVAL_STREAM = 7  # the evaluation sets' images come from generator streams of their own


def make_demo_corruptions(root: str | Path, num_classes: int, per_class: int, corruptions: list[str],
                          severities: list[int], image_size: int = 64, seed: int = 1) -> Path:
    """`root/<corruption>/<severity>/<class>/<i>.jpg`: `per_class` new images of each pretraining demo class
    (same folder names as `make_demo_dataset`), each corrupted at every severity."""
    root = Path(root)
    for label, style in enumerate(class_styles(num_classes)):
        name = _class_name(label, style)
        for i in range(per_class):
            clean = render_image(style, image_size, np.random.default_rng([seed, EVAL_STREAM, label, i]))
            for c, corruption in enumerate(corruptions):
                for severity in severities:
                    rng = np.random.default_rng([seed, EVAL_STREAM, label, i, c, severity])
                    _save_jpeg(corrupt(clean, corruption, severity, rng),
                               root / corruption / str(severity) / name / f"{name}_{i:05d}.jpg")
    log.info("demo robustness set: %d classes x %d images x %d corruptions x %d severities in %s", num_classes,
             per_class, len(corruptions), len(severities), root)
    return root


def make_demo_transfer(root: str | Path, num_classes: int, train_per_class: int, val_per_class: int,
                       image_size: int = 64, seed: int = 1, first_class: int = 10) -> Path:
    """`root/{train,val}/<class>/<i>.jpg` of `num_classes` classes the pretraining demo does not have
    (styles `first_class`, `first_class + 1`, ... of the same family)."""
    root = Path(root)
    styles = class_styles(first_class + num_classes)[first_class:]
    counts = {"train": train_per_class, "val": val_per_class}
    for label, style in enumerate(styles):
        name = _class_name(label, style, prefix="t")
        for split in SPLITS:
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, EVAL_STREAM + 1, SPLITS.index(split), label, i])
                _save_jpeg(render_image(style, image_size, rng), root / split / name / f"{name}_{i:05d}.jpg")
    log.info("demo transfer set: %d new classes, %d train + %d val per class in %s", num_classes, train_per_class,
             val_per_class, root)
    return root


def make_demo_dataset(root: str | Path, num_classes: int = 10, train_per_class: int = 24,
                      val_per_class: int = 8, image_size: int = 64, seed: int = 0) -> Path:
    """Write `root/{train,val}/<class>/<class>_<i>.jpg`; returns `root`.

    Class folder names sort in label order (`c000_...`), so labels from the manifest match `class_styles`.
    Files already present are rewritten identically (same seed → same bytes).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("train_per_class and val_per_class must be >= 1")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    root = Path(root)
    counts = {"train": train_per_class, "val": val_per_class}
    for label, style in enumerate(class_styles(num_classes)):
        class_name = f"c{label:03d}_{style.name}"
        for split in SPLITS:
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                pixels = render_image(style, image_size, image_rng(seed, split, label, i))
                with atomic_path(folder / f"{class_name}_{i:05d}.jpg") as tmp:
                    Image.fromarray(pixels, "RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY)
    total = num_classes * (train_per_class + val_per_class)
    log.info("demo dataset: %d classes, %d images (%d train + %d val per class) in %s", num_classes, total,
             train_per_class, val_per_class, root)
    return root


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lease demo-data", description=first_paragraph(__doc__))
    parser.add_argument("root", type=Path, help="output folder (ImageFolder tree with train/ and val/)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=24)
    parser.add_argument("--val-per-class", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64, help="typical long side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = show_defaults(parser).parse_args(argv)
    make_demo_dataset(args.root, args.num_classes, args.train_per_class, args.val_per_class, args.image_size,
                      args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
