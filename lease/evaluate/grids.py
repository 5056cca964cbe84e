"""PNG image grids: generated samples, and original | masked | result rows for reconstruction,
inpainting and outpainting. Images are float [B, 3, H, W] in [0, 1] or uint8; files are written atomically.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from lease.io import atomic_path


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


def save_comparison_grid(columns: list[torch.Tensor], path: str | Path, padding: int = 2) -> Path:
    """One row per sample with the given columns side by side (e.g. original | masked | result)."""
    if not columns or any(c.shape != columns[0].shape for c in columns):
        raise ValueError("comparison columns must be non-empty image batches of one shape")
    rows = torch.stack([_as_float(c).cpu() for c in columns], dim=1).flatten(0, 1)  # [B * columns, 3, H, W]
    return save_png(make_grid(rows, nrow=len(columns), padding=padding, pad_value=1.0), path)
