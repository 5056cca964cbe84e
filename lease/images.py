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

For the manifest's reasons, `find_damage` reads a PNG's or JPEG's own structure to say whether bytes
that do not decode were cut short (truncated) or are damaged (corrupt).
"""
from __future__ import annotations

import functools
import io
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

TAR_SEPARATOR = "::"
_TAR_CACHE_SIZE = 64  # open tar files (with their member index) kept per worker process
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # 16/32-bit grayscale: scaled to 8 bits
Uint8Mode = Literal["round", "truncate"]


def to_uint8(images: torch.Tensor, mode: Uint8Mode = "round") -> torch.Tensor:
    """[0, 1] float images → uint8 (what torch-fidelity and PNG writers take): rounded, or truncated as
    numpy's `astype(np.uint8)` in MAGE's sample writer (the `mage` preset, so FID sees their pixels)."""
    scaled = images.mul(255.0).clamp_(0, 255)
    return (scaled.round_() if mode == "round" else scaled).to(torch.uint8)


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


# ---------------------------------------------------------------------- why an image does not decode
#
# PIL's errors do not say whether a file was cut short or is damaged: a PNG cut before its first IDAT
# chunk is "not recognised", and garbage behind a JPEG header ends, like a cut file, without its end
# marker ("truncated"). For the two formats of nearly every dataset we read the file's own structure
# instead: "truncated" means every byte present is a valid PNG/JPEG prefix and the file ends early,
# "corrupt" means some byte present breaks the format.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_MAX_CHUNK = 2 ** 31 - 1  # the PNG spec's limit on a chunk's length
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_JPEG_RST = frozenset(range(0xD0, 0xD8))
_TEM, _EOI, _SOS, _DHT, _DAC, _DQT, _DNL, _DRI, _COM = 0x01, 0xD9, 0xDA, 0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xFE
# Segments libjpeg reads between SOI and EOI; it stops on any other marker (reserved codes, JPGn, DHP, EXP,
# a second SOI, a restart outside a scan), so such a marker is damage for this pipeline.
_JPEG_SEGMENTS = _JPEG_SOF | {_DHT, _DAC, _SOS, _DQT, _DNL, _DRI, _COM} | set(range(0xE0, 0xF0))


@dataclass(frozen=True)
class Damage:
    """What is wrong with an image file's structure: `kind` is `truncated` or `corrupt`."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def signature_format(data: bytes) -> str | None:
    """`PNG` or `JPEG` when `data` starts like one (a cut PNG signature included), else None."""
    if data.startswith(JPEG_SOI):
        return "JPEG"
    if len(data) >= 4 and PNG_SIGNATURE.startswith(data[:4]):
        return "PNG"
    return None


def find_damage(data: bytes) -> Damage | None:
    """The first structural fault of a PNG or JPEG; None when its structure is intact or it is neither
    (a file that still does not decode is then damaged inside its compressed data)."""
    fmt = signature_format(data)
    if fmt == "PNG":
        return _png_damage(data)
    if fmt == "JPEG":
        return _jpeg_damage(data)
    return None


def undecodable_reason(data: bytes, err: Exception) -> str:
    """The manifest's reason for bytes that PIL failed to decode with `err`."""
    damage = find_damage(data)
    if damage is not None:
        return str(damage)
    fmt = signature_format(data)
    if fmt is not None:
        return f"corrupt: the {fmt}'s structure is intact but its compressed data does not decode ({err})"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image (format not recognised)"
    return f"{'truncated' if 'truncated' in str(err).lower() else 'corrupt'}: {err}"


def _png_damage(data: bytes) -> Damage | None:
    """Walk the chunks (length, type, data, CRC) from the signature to IEND."""
    if not data.startswith(PNG_SIGNATURE):
        if PNG_SIGNATURE.startswith(data):
            return Damage("truncated", f"the PNG ends inside its signature ({len(data)} bytes)")
        return Damage("corrupt", "the PNG signature is damaged")
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        damage = _png_chunk_damage(data, pos)
        if damage is not None or data[pos + 4:pos + 8] == b"IEND":
            return damage
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return Damage("truncated", f"the PNG ends after {len(data)} bytes, before its IEND chunk")


def _png_chunk_damage(data: bytes, pos: int) -> Damage | None:
    """The fault of the chunk at `pos` (as far as the file holds it), or None when it is whole and valid."""
    header = data[pos:pos + 8]
    length, ctype = int.from_bytes(header[:4], "big"), header[4:]
    name = ctype.decode("ascii") if len(ctype) == 4 and ctype.isalpha() else "next"
    if len(header) < 8:
        # Cut inside the chunk header: the bytes present are judged, the length only when complete.
        if (ctype and not ctype.isalpha()) or (len(header) >= 4 and length > _PNG_MAX_CHUNK):
            return Damage("corrupt", f"no PNG chunk at byte {pos}")
        return Damage("truncated", f"the PNG ends inside a chunk header at byte {pos}")
    if length > _PNG_MAX_CHUNK or not ctype.isalpha():
        return Damage("corrupt", f"no PNG chunk at byte {pos} (length {length}, type {ctype!r})")
    if pos == len(PNG_SIGNATURE) and (ctype != b"IHDR" or length != 13):
        return Damage("corrupt", f"the first PNG chunk is {ctype!r} of {length} bytes, not IHDR of 13")
    end = pos + 12 + length
    if end > len(data):
        return Damage("truncated", f"the PNG ends inside its {name} chunk at byte {pos} ({len(data)} of {end} bytes)")
    if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
        return Damage("corrupt", f"the PNG's {name} chunk at byte {pos} fails its CRC")
    return None


def _jpeg_damage(data: bytes) -> Damage | None:
    """Walk the markers from SOI to EOI: segments by their lengths, entropy-coded data by its byte stuffing."""
    pos, frame_seen = len(JPEG_SOI), False
    while True:
        if pos >= len(data):
            return Damage("truncated", f"the JPEG ends after {len(data)} bytes, before its end-of-image marker")
        if data[pos] != 0xFF:
            return Damage("corrupt", f"byte {pos} of the JPEG is 0x{data[pos]:02X} where a marker must start")
        while pos < len(data) and data[pos] == 0xFF:  # a marker may be preceded by fill bytes
            pos += 1
        if pos >= len(data):
            return Damage("truncated", f"the JPEG ends inside a marker at byte {pos}")
        code, pos = data[pos], pos + 1
        if code == _EOI:
            return None
        if code == _TEM:
            continue
        if code not in _JPEG_SEGMENTS:
            return Damage("corrupt", f"marker 0xFF{code:02X} at byte {pos - 2} has no place in a JPEG's headers")
        if code == _SOS and not frame_seen:
            return Damage("corrupt", f"the JPEG's scan at byte {pos - 2} comes before any frame header")
        frame_seen = frame_seen or code in _JPEG_SOF
        damage, pos = _jpeg_segment(data, code, pos)
        if damage is not None:
            return damage
        if code == _SOS:
            damage, pos = _jpeg_entropy_data(data, pos)
            if damage is not None:
                return damage


def _jpeg_segment(data: bytes, code: int, pos: int) -> tuple[Damage | None, int]:
    """Check the segment whose length field starts at `pos`; returns (damage, position after it)."""
    if pos + 2 > len(data):
        return Damage("truncated", f"the JPEG ends inside the length of its 0xFF{code:02X} segment"), pos
    length = int.from_bytes(data[pos:pos + 2], "big")
    body = data[pos + 2:pos + length]
    fault = "length below 2" if length < 2 else _JPEG_SEGMENT_CHECKS.get(code, _any_body)(body, length - 2)
    if fault is not None:
        return Damage("corrupt", f"the JPEG's 0xFF{code:02X} segment at byte {pos - 2}: {fault}"), pos
    if pos + length > len(data):
        return Damage("truncated", f"the JPEG ends inside its 0xFF{code:02X} segment at byte {pos - 2} "
                                   f"({len(data)} of {pos + length} bytes)"), pos
    return None, pos + length


def _jpeg_entropy_data(data: bytes, pos: int) -> tuple[Damage | None, int]:
    """Skip a scan's entropy-coded data: there 0xFF is followed by 0x00 (a stuffed byte), a restart
    marker or fill; anything else is the next marker. Returns (damage, position of that marker)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return Damage("truncated", f"the JPEG ends inside its entropy-coded data ({len(data)} bytes)"), pos
        follower = data[pos + 1]
        if follower != 0x00 and follower != 0xFF and follower not in _JPEG_RST:
            return None, pos
        pos += 2 if follower != 0xFF else 1


# Segment bodies whose syntax the JPEG standard (ITU T.81, annex B) fixes. Each check gets the body as far
# as the file holds it and the body length the segment declares (both without the 2-byte length field),
# and returns a fault or None: a body cut short is judged as far as it goes.

def _any_body(body: bytes, length: int) -> str | None:
    return None


def _frame_header_fault(body: bytes, length: int) -> str | None:
    if len(body) >= 1 and not 2 <= body[0] <= 16:
        return f"sample precision {body[0]}"
    if len(body) >= 6 and (body[5] == 0 or length != 6 + 3 * body[5]):
        return f"{body[5]} components in {length} bytes"
    if len(body) >= 5 and int.from_bytes(body[3:5], "big") == 0:
        return "width 0"
    for i in range(6, min(len(body), length) - 2, 3):
        if not (1 <= body[i + 1] >> 4 <= 4 and 1 <= body[i + 1] & 15 <= 4 and body[i + 2] <= 3):
            return f"component {(i - 6) // 3}: sampling 0x{body[i + 1]:02X}, table {body[i + 2]}"
    return None


def _huffman_tables_fault(body: bytes, length: int) -> str | None:
    pos = 0
    while pos < min(len(body), length):
        table, counts = body[pos], body[pos + 1:pos + 17]
        if table >> 4 > 1 or table & 15 > 3:
            return f"table class/id 0x{table:02X}"
        if len(counts) < 16:
            return None  # cut inside the table: the rest cannot be judged
        if not _is_prefix_code(counts):
            return "code lengths that no Huffman code has"
        pos += 17 + sum(counts)
    return None if pos <= length else f"tables of {pos} bytes in a body of {length}"


def _is_prefix_code(counts: bytes) -> bool:
    """Kraft's inequality as libjpeg checks it: after the codes of each length, the next code must still
    fit in that length (no code is all ones)."""
    code = 0
    for bits, count in enumerate(counts, start=1):
        code += count
        if code >= 1 << bits:
            return False
        code <<= 1
    return sum(counts) <= 256


def _quantisation_tables_fault(body: bytes, length: int) -> str | None:
    pos = 0
    while pos < min(len(body), length):
        precision, table = body[pos] >> 4, body[pos] & 15
        if precision > 1 or table > 3:
            return f"table precision/id 0x{body[pos]:02X}"
        pos += 1 + 64 * (precision + 1)
    return None if pos <= length else f"tables of {pos} bytes in a body of {length}"


def _scan_header_fault(body: bytes, length: int) -> str | None:
    if len(body) >= 1 and not (1 <= body[0] <= 4 and length == 4 + 2 * body[0]):
        return f"{body[0]} components in {length} bytes"
    return None


def _two_byte_body_fault(body: bytes, length: int) -> str | None:
    """DRI (restart interval) and DNL (number of lines) hold one 16-bit number."""
    return None if length == 2 else f"length {length + 2}, not 4"


def _application_segment_fault(body: bytes, length: int) -> str | None:
    """APPn segments open with a NUL-terminated ASCII name (JFIF, Exif, ICC_PROFILE, Adobe, an XMP URI...):
    without one, garbage whose first two bytes read as a long length would pass for a cut segment."""
    name, nul, _ = body[:_APP_NAME_MAX + 1].partition(b"\0")
    if not all(0x20 <= byte < 0x7F for byte in name):
        return "no ASCII name opens it"
    if nul and not name:
        return "its name is empty"
    if not nul and len(name) > _APP_NAME_MAX:
        return f"no NUL-terminated name in its first {_APP_NAME_MAX} bytes"
    return None


_APP_NAME_MAX = 64  # the longest APPn name in use, Extended XMP's URI, has 35 bytes
_JPEG_SEGMENT_CHECKS = {**{code: _application_segment_fault for code in range(0xE0, 0xF0)},
                        **{code: _frame_header_fault for code in _JPEG_SOF}, _DHT: _huffman_tables_fault,
                        _DQT: _quantisation_tables_fault, _SOS: _scan_header_fault,
                        _DRI: _two_byte_body_fault, _DNL: _two_byte_body_fault}


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
    if not data.startswith(JPEG_SOI):
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
    # Decoders forked on Linux whatever the process's default: a Dask worker's default is spawn, whose
    # decoders would each import torch again before their first image (seconds per loader and split).
    context = "fork" if num_workers > 0 and sys.platform.startswith("linux") else None
    common = dict(batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                  multiprocessing_context=context)
    if gpu_decode:
        loader = DataLoader(EncodedDataset(locations), collate_fn=collate_encoded, **common)
        return GpuDecodingLoader(loader, sizes, device)
    return DataLoader(CropDataset(locations, sizes), collate_fn=collate_crops, **common)
