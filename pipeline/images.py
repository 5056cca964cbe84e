"""Image decoding for the tokenize pass: each image decoded once, both center crops made from it.

DESIGN.md "The data path", step 2: the VQGAN sees the 256×256 center crop of the image resized so that
its short side is 256; DINOv2 sees the 224×224 center crop at short side 224. Both crops cover the same
central square of the original image, which is what makes token i of both 16×16 grids the same patch.
We therefore cut that central square (side = short side) once and resize it to each size with bicubic,
antialiased resampling. This equals "resize short side, then center crop" up to a sub-pixel shift of
the crop window, and costs less because only the square is resampled.

Two decoders with the same semantics:
- CPU (default): loader workers decode with PIL, convert to RGB and resize with torch's uint8 kernel
  (PIL's bicubic filter); batches arrive as uint8 tensors, collated in the workers and pinned.
- GPU (`gpu_decode=True` in `make_loader`): workers only read the bytes; the main process decodes whole
  batches of JPEGs with nvJPEG (`torchvision.io.decode_jpeg(device=...)`) and resizes on the device.
  Images nvJPEG should not take (non-JPEG files, CMYK JPEGs) are decoded to RGB by the workers and
  resized on the device with the same function.
"""
from __future__ import annotations

import functools
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

TAR_SEPARATOR = "::"
_TAR_CACHE_SIZE = 64  # open tar files (with their member index) kept per worker process
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # 16/32-bit grayscale: scaled to 8 bits


# ----------------------------------------------------------------------------------------- reading


@functools.lru_cache(maxsize=_TAR_CACHE_SIZE)
def _open_tar(path: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """Open a tar once per process and index its members (a tar has no index of its own)."""
    tar = tarfile.open(path, "r:*")
    return tar, {m.name: m for m in tar.getmembers() if m.isfile()}


def read_bytes(location: str) -> bytes:
    """Bytes of a file path or of a tar member written as `tar_path::member`."""
    if TAR_SEPARATOR in location:
        tar_path, member = location.split(TAR_SEPARATOR, 1)
        tar, members = _open_tar(tar_path)
        if member not in members:
            raise FileNotFoundError(f"{member} is not a file in {tar_path}")
        fh = tar.extractfile(members[member])
        assert fh is not None  # regular files always have a file object
        return fh.read()
    return Path(location).read_bytes()


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (grayscale, CMYK, palette, with or without alpha)."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES:
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL asks for this route for palettes with transparency
    # Alpha is dropped, not composited, as in torchvision's ImageFolder loader.
    return img.convert("RGB")


# What PIL raises for data it cannot decode (too-large images raise Image.DecompressionBombError apart).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


class UndecodableImage(ValueError):
    """An image the manifest passed but the decoder cannot read (possible after a `quick` check)."""


def decode_location(location: str) -> Image.Image:
    """Read and fully decode one manifest location; a failure names the file and the remedy."""
    data = read_bytes(location)
    try:
        return decode_rgb(data)
    except DECODE_ERRORS as err:
        raise UndecodableImage(f"{location} cannot be decoded ({err}), although the manifest passed it: a quick "
                               "check reads only headers and end markers. Rebuild the manifest with "
                               "data.check=full to leave such files out") from err


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes to an RGB PIL image; raises on corrupt or truncated data."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------- crops


def center_square(img: torch.Tensor) -> torch.Tensor:
    """The central S×S square (S = short side) of [..., H, W]; the region both crops cover."""
    h, w = img.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[..., top:top + side, left:left + side]


def resize_squares(squares: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased resize of uint8 squares [B, 3, S, S] → uint8 [B, 3, size, size].

    On the CPU torch's uint8 kernel runs (the same fixed-point filter as PIL's BICUBIC, within one grey
    level, and 5x faster than a float pass); other devices compute the same filter in float32 and round
    (within a few grey levels of the CPU result: PIL rounds between the two separable passes).
    """
    if squares.device.type == "cpu":
        return F.interpolate(squares, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    out = F.interpolate(squares.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def both_crops(img: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """uint8 [3, H, W] → one uint8 [3, s, s] center crop per size in `sizes`."""
    square = center_square(img).unsqueeze(0)
    return [resize_squares(square, size)[0] for size in sizes]


# ------------------------------------------------------------------------------------ CPU datasets


class CropDataset(Dataset):
    """Manifest rows → (row index, one uint8 center crop per size), decoded once on the CPU."""

    def __init__(self, locations: Sequence[str], sizes: Sequence[int] = (256, 224)):
        if not sizes:
            raise ValueError("give at least one crop size")
        self.locations = list(locations)
        self.sizes = tuple(int(s) for s in sizes)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor]]:
        img = pil_to_tensor(decode_location(self.locations[index]))
        return index, both_crops(img, self.sizes)


def collate_crops(samples: list[tuple[int, list[torch.Tensor]]]) -> tuple[torch.Tensor, ...]:
    """Stack a batch in the worker: (row_index int64 [B], crops uint8 [B, 3, s, s] per size)."""
    index = torch.tensor([i for i, _ in samples], dtype=torch.int64)
    stacks = [torch.stack(crops) for crops in zip(*(c for _, c in samples))]
    return (index, *stacks)


# ------------------------------------------------------------------------------------ GPU decoding


@dataclass
class RawBatch:
    """A batch as the workers hand it to the GPU decoder (flat buffers, so it can be pinned).

    JPEGs travel encoded (`jpeg` holds the concatenated files, `jpeg_lengths` their sizes); images that
    nvJPEG should not take travel decoded (`pixels`: concatenated uint8 RGB, `pixel_shapes` [n, 2]).
    """

    index: torch.Tensor  # int64 [B]: row indices, JPEGs first, then decoded ones
    jpeg: torch.Tensor  # uint8 [sum of lengths]
    jpeg_lengths: torch.Tensor  # int64 [n_jpeg]
    pixels: torch.Tensor  # uint8 [sum of 3*H*W]
    pixel_shapes: torch.Tensor  # int64 [n_pixels, 2]

    def pin_memory(self) -> "RawBatch":
        return RawBatch(*(t.pin_memory() for t in (self.index, self.jpeg, self.jpeg_lengths, self.pixels,
                                                    self.pixel_shapes)))


def is_gpu_decodable_jpeg(data: bytes) -> bool:
    """True for baseline/progressive JPEGs in YCbCr or grayscale (header read only, no decode)."""
    if data[:2] != b"\xff\xd8":
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format == "JPEG" and img.mode in ("RGB", "L")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


class EncodedDataset(Dataset):
    """Manifest rows → (row index, encoded JPEG bytes or, for other images, decoded RGB pixels)."""

    def __init__(self, locations: Sequence[str]):
        self.locations = list(locations)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> tuple[int, bytes | None, torch.Tensor | None]:
        data = read_bytes(self.locations[index])
        if is_gpu_decodable_jpeg(data):
            return index, data, None
        return index, None, pil_to_tensor(decode_rgb(data))


def collate_encoded(samples: list[tuple[int, bytes | None, torch.Tensor | None]]) -> RawBatch:
    """Pack encoded JPEGs and worker-decoded images into flat buffers (in the worker)."""
    jpegs = [(i, d) for i, d, _ in samples if d is not None]
    decoded = [(i, p) for i, _, p in samples if p is not None]
    index = torch.tensor([i for i, _ in jpegs] + [i for i, _ in decoded], dtype=torch.int64)
    jpeg = torch.frombuffer(bytearray(b"".join(d for _, d in jpegs)), dtype=torch.uint8) if jpegs \
        else torch.empty(0, dtype=torch.uint8)
    pixels = torch.cat([p.reshape(-1) for _, p in decoded]) if decoded else torch.empty(0, dtype=torch.uint8)
    return RawBatch(index=index, jpeg=jpeg,
                    jpeg_lengths=torch.tensor([len(d) for _, d in jpegs], dtype=torch.int64),
                    pixels=pixels,
                    pixel_shapes=torch.tensor([p.shape[1:] for _, p in decoded], dtype=torch.int64).reshape(-1, 2))


def crops_from_images(images: list[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """Center crops of variable-size uint8 [3, H, W] images on their device, batched per square size.

    Images whose central squares have the same side are resized together (photo collections repeat a
    few sizes), so the number of resize calls is the number of distinct sizes, not the batch size.
    """
    squares = [center_square(img) for img in images]
    device = images[0].device
    out = [torch.empty(len(images), 3, s, s, dtype=torch.uint8, device=device) for s in sizes]
    groups: dict[int, list[int]] = {}
    for position, square in enumerate(squares):
        groups.setdefault(square.shape[-1], []).append(position)
    for positions in groups.values():
        stacked = torch.stack([squares[p] for p in positions])
        where = torch.tensor(positions, device=device)
        for dst, size in zip(out, sizes):
            dst[where] = resize_squares(stacked, size)
    return out


def decode_raw_batch(batch: RawBatch, sizes: Sequence[int], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """RawBatch → (row_index [B], crops uint8 [B, 3, s, s] per size) on `device`, in row order.

    JPEGs are decoded in one batched nvJPEG call; the worker-decoded images are uploaded as they are.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    images: list[torch.Tensor] = []
    if batch.jpeg_lengths.numel():
        encoded = list(torch.split(batch.jpeg, batch.jpeg_lengths.tolist()))
        images += decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    if batch.pixel_shapes.numel():
        sizes_flat = (3 * batch.pixel_shapes.prod(dim=1)).tolist()
        pixels = batch.pixels.to(device, non_blocking=True)
        images += [p.view(3, h, w) for p, (h, w) in zip(torch.split(pixels, sizes_flat),
                                                          batch.pixel_shapes.tolist())]
    index = batch.index.to(device, non_blocking=True)
    order = torch.argsort(index)  # back to the loader's row order (the workers put JPEGs first)
    return (index[order], *(crops[order] for crops in crops_from_images(images, sizes)))


class GpuDecodingLoader:
    """Iterates a DataLoader of RawBatches and decodes each batch on the device."""

    def __init__(self, loader: DataLoader, sizes: Sequence[int], device: torch.device | str):
        self.loader, self.sizes, self.device = loader, tuple(sizes), torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.loader:
            yield decode_raw_batch(batch, self.sizes, self.device)


# ------------------------------------------------------------------------------------------ loader


def make_loader(locations: Sequence[str], batch_size: int, num_workers: int, pin_memory: bool = True, *,
                sizes: Sequence[int] = (256, 224), gpu_decode: bool = False,
                device: torch.device | str = "cuda") -> DataLoader | GpuDecodingLoader:
    """Batches (row_index int64 [B], img256 uint8 [B,3,256,256], img224 uint8 [B,3,224,224]) in order.

    `locations` are manifest locations (row i of the batch index refers to `locations[i]`); `sizes`
    picks the crop sizes (default: VQGAN 256, DINOv2 224). Order is the row order, so outputs can be
    written deterministically. With `gpu_decode`, JPEGs are decoded and resized on `device`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    common = dict(batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)
    if gpu_decode:
        loader = DataLoader(EncodedDataset(locations), collate_fn=collate_encoded, **common)
        return GpuDecodingLoader(loader, sizes, device)
    return DataLoader(CropDataset(locations, sizes), collate_fn=collate_crops, **common)
