"""PNG image grids: generated samples, and input | tokens decoded | masked | result rows for reconstruction,
inpainting and outpainting, with each column's name above it. Images are float [B, 3, H, W] in [0, 1] or
uint8; files are written atomically.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from lease.io import atomic_path

LABEL_CELL = 128  # labelled grids show each image at least this wide (nearest upscaling), so labels fit
LABEL_FONT = 14  # px; shrunk for a label word wider than its column
LABEL_LINE = 1.3  # line height / font size


def _as_float(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W]; got {tuple(images.shape)}")
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one float [3, H, W] image in [0, 1] as an 8-bit PNG."""
    path = Path(path)
    array = image.mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        Image.fromarray(array).save(fh, format="PNG")
    return path


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """Tile `images` into a grid with `nrow` images per row and write it as PNG."""
    if images.shape[0] == 0:
        raise ValueError(f"no images to put in {path}")
    return save_png(make_grid(_as_float(images).cpu(), nrow=nrow, padding=padding, pad_value=1.0), path)


def masked_preview(images: torch.Tensor, regenerate: torch.Tensor, grid_size: int, shade: float = 0.5) -> torch.Tensor:
    """`images` with the patches of the regenerated token positions (bool [B, L]) greyed out."""
    images = _as_float(images)
    patches = regenerate.view(-1, 1, grid_size, grid_size).float().to(images.device)
    cover = F.interpolate(patches, size=images.shape[-2:], mode="nearest")
    return images * (1.0 - cover) + shade * cover


def _wrap(label: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`label` in lines no wider than `width` (word by word; a longer word stands on a line of its own)."""
    lines: list[str] = []
    for word in label.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def header_layout(labels: list[str], cell: int, padding: int) -> tuple[int, list[tuple[int, int, str, int]]]:
    """(header height, [(x, y, text, font size)]) for column labels centred over columns `cell` px wide
    (plus `padding`): each label wrapped into its column, its font shrunk until its longest word fits."""
    placed, height = [], 0
    for column, label in enumerate(labels):
        size = LABEL_FONT
        font = ImageFont.load_default(size=size)
        while size > 6 and max(font.getlength(w) for w in label.split()) > cell - 4:
            size -= 1
            font = ImageFont.load_default(size=size)
        lines = _wrap(label, font, cell - 4)
        step = round(size * LABEL_LINE)
        left = padding + column * (cell + padding)
        for row, text in enumerate(lines):
            placed.append((left + (cell - round(font.getlength(text))) // 2, padding + row * step, text, size))
        height = max(height, padding + len(lines) * step + padding)
    return height, placed


def save_comparison_grid(columns: list[torch.Tensor], path: str | Path, padding: int = 2,
                         labels: list[str] | None = None) -> Path:
    """One row per sample with the given columns side by side (e.g. input | masked | result); `labels` names
    the columns in a header row (small images are then upscaled so that the names fit)."""
    if not columns or any(c.shape != columns[0].shape for c in columns):
        raise ValueError("comparison columns must be non-empty image batches of one shape")
    if labels is not None and len(labels) != len(columns):
        raise ValueError(f"{len(labels)} labels for {len(columns)} columns")
    images = [_as_float(c).cpu() for c in columns]
    if labels is not None:
        scale = -(-LABEL_CELL // images[0].shape[-1])  # ceil: whole pixels, no resampling blur
        if scale > 1:
            images = [F.interpolate(c, scale_factor=scale, mode="nearest") for c in images]
    rows = torch.stack(images, dim=1).flatten(0, 1)  # [B * columns, 3, H, W]
    grid = make_grid(rows, nrow=len(columns), padding=padding, pad_value=1.0)
    if labels is None:
        return save_png(grid, path)
    height, placed = header_layout(labels, images[0].shape[-1], padding)
    header = torch.ones(3, height, grid.shape[-1])
    canvas = Image.fromarray(torch.cat([header, grid], dim=1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
                             .numpy())
    draw = ImageDraw.Draw(canvas)
    for x, y, text, size in placed:
        draw.text((x, y), text, fill=(0, 0, 0), font=ImageFont.load_default(size=size))
    with atomic_path(Path(path)) as tmp, tmp.open("wb") as fh:
        canvas.save(fh, format="PNG")
    return Path(path)
