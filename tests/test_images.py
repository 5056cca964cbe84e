"""Decoding: RGB conversion of every mode, both center crops from one decode, loader batches, GPU-path parity."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageCms

from lease.images import (RawBatch, both_crops, center_square, collate_encoded, decode_raw_batch, decode_rgb,
                             EncodedDataset, is_gpu_decodable_jpeg, make_loader, pil_to_tensor, read_bytes,
                             resize_squares)

SIZES = (32, 28)  # the 256/224 pair at tiny scale: same code path, sizes from arguments


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                     (x + y) * 255 // max(1, width + height - 2)], -1).astype(np.uint8)


def test_every_mode_becomes_rgb():
    rgb = Image.fromarray(_gradient(20, 10))
    palette_with_alpha = rgb.convert("P")
    palette_with_alpha.info["transparency"] = 0
    cases = {
        "L": _encode(rgb.convert("L"), "PNG"),
        "RGBA": _encode(rgb.convert("RGBA"), "PNG"),
        "P": _encode(rgb.convert("P"), "PNG"),
        "P+transparency": _encode(palette_with_alpha, "PNG"),
        "CMYK": _encode(rgb.convert("CMYK"), "JPEG"),
        "LA": _encode(rgb.convert("LA"), "PNG"),
        "1": _encode(rgb.convert("1"), "PNG"),
    }
    for name, data in cases.items():
        out = decode_rgb(data)
        assert out.mode == "RGB" and out.size == (20, 10), name
    sixteen = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = np.asarray(decode_rgb(_encode(Image.fromarray(sixteen), "PNG")))
    assert out.shape == (1, 3, 3) and out[0, :, 1].tolist() == [0, 100, 255]  # 16-bit gray scaled, not clipped
    # The GPU path sends only YCbCr/gray JPEGs to nvJPEG; CMYK JPEGs and other formats go decoded.
    assert is_gpu_decodable_jpeg(_encode(rgb, "JPEG")) and is_gpu_decodable_jpeg(_encode(rgb.convert("L"), "JPEG"))
    assert not is_gpu_decodable_jpeg(cases["CMYK"]) and not is_gpu_decodable_jpeg(cases["RGBA"])
    gray = np.asarray(decode_rgb(cases["L"]))
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_crops_cover_the_same_central_square():
    """A wide image: both crops show its central square (equal to resize-short-side + center crop)."""
    img = torch.from_numpy(_gradient(90, 40)).permute(2, 0, 1).contiguous()
    square = center_square(img)
    assert square.shape == (3, 40, 40) and torch.equal(square, img[:, :, 25:65])
    tall = center_square(img.transpose(1, 2))
    assert tall.shape == (3, 40, 40)
    big, small = both_crops(img, SIZES)
    assert big.shape == (3, 32, 32) and small.shape == (3, 28, 28) and big.dtype == torch.uint8
    # Each crop equals torchvision's resize(short side) + center crop to within a pixel shift of rounding.
    from torchvision.transforms.v2 import functional as TF
    reference = TF.center_crop(TF.resize(img.float(), 32, interpolation=TF.InterpolationMode.BICUBIC,
                                         antialias=True), 32).round().clamp(0, 255)
    assert (reference - big.float()).abs().mean() < 3.0
    # The CPU kernel is PIL's bicubic filter (within one grey level).
    pil = Image.fromarray(square.permute(1, 2, 0).numpy()).resize((32, 32), Image.BICUBIC)
    assert (pil_to_tensor(pil).int() - big.int()).abs().max() <= 1
    # Identity when the square already has the target size.
    assert torch.equal(resize_squares(square.unsqueeze(0), 40)[0], square)


def test_crops_of_a_known_pattern():
    """Left half red, right half blue, square image: the crops keep the halves in place."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32, 0] = 255
    pixels[:, 32:, 2] = 255
    big, small = both_crops(pil_to_tensor(Image.fromarray(pixels)), SIZES)
    for crop, size in ((big, 32), (small, 28)):
        assert torch.all(crop[0, :, : size // 2 - 2] == 255) and torch.all(crop[2, :, : size // 2 - 2] == 0)
        assert torch.all(crop[2, :, size // 2 + 2:] == 255) and torch.all(crop[0, :, size // 2 + 2:] == 0)


@pytest.fixture()
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    locations = []
    for i, (w, h) in enumerate([(50, 37), (37, 50), (40, 40), (64, 31), (33, 45)]):
        pixels = (_gradient(w, h).astype(int) + rng.integers(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(_encode(Image.fromarray(pixels), "JPEG", quality=95))
        locations.append(str(path))
    gray = tmp_path / "gray.png"
    gray.write_bytes(_encode(Image.fromarray(_gradient(30, 20)).convert("L"), "PNG"))
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        data = _encode(Image.fromarray(_gradient(44, 36)), "JPEG", quality=95)
        info = tarfile.TarInfo("k0.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return locations + [str(gray), f"{tmp_path / 'shard.tar'}::k0.jpg"]


def _expected(location: str) -> list[torch.Tensor]:
    return both_crops(pil_to_tensor(decode_rgb(read_bytes(location))), SIZES)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_in_row_order(image_files, num_workers):
    loader = make_loader(image_files, batch_size=3, num_workers=num_workers, pin_memory=False, sizes=SIZES)
    batches = list(loader)
    assert [b[0].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    index, big, small = (torch.cat(parts) for parts in zip(*batches))
    assert index.dtype == torch.int64 and big.dtype == torch.uint8
    assert big.shape == (7, 3, 32, 32) and small.shape == (7, 3, 28, 28)
    for i, location in enumerate(image_files):
        want_big, want_small = _expected(location)
        assert torch.equal(big[i], want_big) and torch.equal(small[i], want_small)


def test_encoded_path_matches_cpu_path(image_files):
    """The GPU decoder's batch logic, run on the CPU with torchvision's JPEG decoder: same crops."""
    dataset = EncodedDataset(image_files)
    batch = collate_encoded([dataset[i] for i in range(len(dataset))])
    assert isinstance(batch, RawBatch) and batch.jpeg_lengths.numel() == 6 and batch.pixel_shapes.tolist() == [[20, 30]]
    index, big, small = decode_raw_batch(batch, SIZES, "cpu")
    assert index.tolist() == list(range(7))  # row order restored (the PNG travelled decoded, after the JPEGs)
    for row, i in enumerate(index.tolist()):
        want_big, want_small = _expected(image_files[i])
        # libjpeg (PIL) and torchvision's decoder may round the IDCT differently by a level or two.
        assert (big[row].int() - want_big.int()).abs().max() <= 3
        assert (small[row].int() - want_small.int()).abs().max() <= 3
    if torch.cuda.is_available():
        # nvJPEG's IDCT and chroma upsampling round differently from libjpeg's: on these noisy JPEGs the
        # decoded pixels differ by about 2 grey levels on average (H100), whatever the resize does.
        _, big_gpu, _ = decode_raw_batch(batch, SIZES, "cuda")
        assert (big_gpu.cpu().float() - big.float()).abs().mean() < 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_resize_is_the_cpu_resize_within_a_grey_level(image_files):
    """The float resampling on the device against torch's uint8 kernel on the CPU, same input squares."""
    squares = [center_square(pil_to_tensor(decode_rgb(read_bytes(path))))[None].contiguous()
               for path in image_files[:5]]
    for square in squares:
        for size in SIZES:
            cpu, gpu = resize_squares(square, size).float(), resize_squares(square.cuda(), size).cpu().float()
            assert (gpu - cpu).abs().mean() < 0.5 and (gpu - cpu).abs().max() <= 2


def test_loader_rejects_bad_arguments(image_files):
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(image_files, batch_size=0, num_workers=0, pin_memory=False)
    with pytest.raises(ValueError, match="crop size"):
        make_loader(image_files, batch_size=2, num_workers=0, pin_memory=False, sizes=())


# ------------------------------------------------------------------ why a file does not decode


def _sample_file(name: str) -> bytes:
    """A real photograph / PNG that ships with matplotlib (a dependency), written by other encoders."""
    from matplotlib import cbook

    with open(cbook.get_sample_data(name, asfileobj=False), "rb") as fh:
        return fh.read()


def _exif(**tags: str) -> Image.Exif:
    exif = Image.Exif()
    for name, value in tags.items():
        exif[next(tag for tag, tag_name in ExifTags.TAGS.items() if tag_name == name)] = value
    return exif


def _valid_encodings() -> dict[str, bytes]:
    noisy = Image.fromarray((_gradient(64, 48).astype(int) + np.random.default_rng(0).integers(0, 40, (48, 64, 3)))
                            .clip(0, 255).astype(np.uint8))
    return {
        "photo.jpg": _sample_file("grace_hopper.jpg"), "logo.png": _sample_file("logo2.png"),
        "rgba.png": _sample_file("Minduka_Present_Blue_Pack.png"),
        "baseline.jpg": _encode(noisy, "JPEG"), "progressive.jpg": _encode(noisy, "JPEG", progressive=True),
        "optimized 4:4:4.jpg": _encode(noisy, "JPEG", optimize=True, subsampling=0),
        "restart markers.jpg": _encode(noisy, "JPEG", restart_marker_blocks=3),
        "gray.jpg": _encode(noisy.convert("L"), "JPEG", progressive=True),
        "cmyk.jpg": _encode(noisy.convert("CMYK"), "JPEG"), "comment.jpg": _encode(noisy, "JPEG", comment=b"x"),
        "exif + ICC.jpg": _encode(noisy, "JPEG", exif=_exif(Make="camera"),
                                  icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()),
        "palette.png": _encode(noisy.convert("P"), "PNG"),
        "16-bit.png": _encode(Image.fromarray(_gradient(64, 48)[..., 0].astype(np.uint16) * 257), "PNG"),
    }


def test_intact_files_show_no_damage_and_their_cut_copies_are_truncated():
    """The structure walk accepts every valid encoding; any cut of one (in the headers, in the first
    chunk or segment, in the compressed data) is named truncated, never corrupt or "not an image"."""
    from lease.images import find_damage
    from pipeline.manifest import check_image_bytes

    encodings = _valid_encodings()
    assert {name: (find_damage(data), check_image_bytes(data).status) for name, data in encodings.items()} == {
        name: (None, "ok") for name in encodings}
    cut_reasons = {(name, cut): check_image_bytes(data[:cut]).status for name, data in encodings.items()
                   for cut in (5, 12, 30, 90, len(data) // 10, len(data) // 2, len(data) - 30)}
    assert {case: status.split(":")[0] for case, status in cut_reasons.items()} == {
        case: "truncated" for case in cut_reasons}


def test_damaged_files_are_corrupt_and_other_files_are_not_images():
    from pipeline.manifest import check_image_bytes

    photo, png = _sample_file("grace_hopper.jpg"), _sample_file("logo2.png")
    scan, huffman = photo.index(b"\xff\xda"), photo.index(b"\xff\xc4") + 4
    scan_data = scan + 2 + int.from_bytes(photo[scan + 2:scan + 4], "big")
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0x40
    # More garbage than any JPEG segment can claim (64 KiB): no valid-looking segment reaches the end, so
    # the walk must meet the garbage (a short tail may be a valid prefix of a JPEG, hence truncated).
    garbage = {f"header + garbage {seed}": b"\xff\xd8\xff" + np.random.default_rng(seed).bytes(70_000)
               for seed in range(20)}
    # a JFIF or Exif marker and then garbage, whose first two bytes read as a segment length past the end
    garbage |= {f"APP{app} + garbage {seed}": b"\xff\xd8\xff" + bytes([0xE0 + app]) +
                np.random.default_rng(seed).bytes(4000) for app in (0, 1) for seed in range(20)}
    corrupt = {
        **garbage,
        "real headers + garbage scan": photo[:scan_data] + np.random.default_rng(0).bytes(4000),
        "a PNG with a flipped bit": bytes(flipped),
        "a PNG signature + garbage": png[:8] + np.random.default_rng(1).bytes(3000),
        "a zeroed Huffman table": photo[:huffman] + bytes(30) + photo[huffman + 30:],
        "a scan before any frame header": photo[:2] + photo[scan:],
    }
    assert {name: check_image_bytes(data).status.split(":")[0] for name, data in corrupt.items()} == {
        name: "corrupt" for name in corrupt}
    assert check_image_bytes(b"").status == "empty file"
    others = {"text renamed .jpg": b"holiday notes\n" * 20, "random": np.random.default_rng(2).bytes(900),
              "html": b"<!DOCTYPE html><html></html>"}
    assert {name: check_image_bytes(data).status for name, data in others.items()} == {
        name: "not an image (format not recognised)" for name in others}
