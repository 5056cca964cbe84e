"""FID and Inception Score through torch-fidelity 0.4.0, with the Inception weights from a local file.

torch-fidelity downloads its `inception-v3-compat` weights when no path is given; this module always
passes `feature_extractor_weights_path` and refuses to start when that file is missing, naming the file
to provide. Any extractor registered with `torch_fidelity.register_feature_extractor` can be chosen by
name (the tests register a tiny random-weight one saved in the same state-dict format).

Reference images (the validation set) get the tokenizer's preprocessing (DESIGN.md "The data path",
step 2): the central square of the image (side = short side), resized with antialiased bicubic to
`image_size` — "resize short side, then centre crop" — so real and generated images share one geometry.
Generated images stream into torch-fidelity batch by batch (`StreamedImages`), so 50K samples never
need to sit in memory or on disk.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.generative_model_base import GenerativeModelBase

from lease.evaluate.features import resolve_device
from lease.io import atomic_write_json, file_digest, json_digest, load_torch_file, save_torch_file
from lease.images import to_uint8
from lease.typed_config import require

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
HE_FROM_DEFAULT_INIT = 6 ** 0.5  # sqrt(2 / fan_in) over torch's default conv std 1 / sqrt(3 fan_in)
LOGIT_SCALE = 0.2  # the random extractor's fc weight std: logits of std ~3 on its pooled features
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


@dataclass
class FidConfig:
    weights: str = ""  # local weights file of the feature extractor (never downloaded)
    feature_extractor: str = "inception-v3-compat"
    image_size: int = 256  # reference images are centre-cropped and resized to this (the tokenizer input)
    batch_size: int = 64
    isc_splits: int = 10
    cache_dir: str = ""  # torch-fidelity cache for the reference features/statistics ("" = none)
    loader_workers: bool = True  # let torch-fidelity decode reference images in worker processes
    # the extractor's layer the FID compares ("" = its default, Inception's 2048-d pool, as every paper);
    # a smaller one ("64") only where the 2048² eigendecomposition would dominate (the CPU demo)
    feature_layer: str = ""

    def __post_init__(self) -> None:
        require(self.image_size > 0, "image_size", "must be > 0")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.isc_splits > 0, "isc_splits", "must be > 0")


def weights_needed(feature_extractor: str = "inception-v3-compat") -> str:
    """Which file FID / IS need, in words."""
    if feature_extractor == "inception-v3-compat":
        return (f"torch-fidelity's Inception weights '{INCEPTION_WEIGHTS_FILE}' (from {URL_INCEPTION_V3}, "
                "copied onto this machine)")
    return f"the weights of feature extractor '{feature_extractor}'"


def check_weights(cfg: FidConfig, key: str = "fid.weights") -> Path:
    """The extractor's weights file, or a clear error saying which file to provide (`key`: the setting
    that names it). The file must hold only tensors: it is read weights-only first, because torch-fidelity
    itself unpickles it in full."""
    what = weights_needed(cfg.feature_extractor)
    if not cfg.weights:
        raise FileNotFoundError(f"FID/IS need {what}: set {key} to its local path (nothing is downloaded)")
    path = Path(cfg.weights)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist: provide {what} at that path")
    load_torch_file(path)  # refuses a file that pickles code before torch-fidelity reads it its own way
    return path


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's `FeatureExtractorInceptionV3` with random weights, saved as the plain state dict
    its `feature_extractor_weights_path` loads (the demo's stand-in for the real file: its FID and IS say
    nothing about images, but every step of the real path runs). Convolutions get He's scale and the logits
    layer a larger one, so activations neither vanish through the 94 layers nor give uniform class
    probabilities (an Inception Score of exactly 1)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the fresh initialisation
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)  # a path must be given, or torch-fidelity would download its weights
        torch.manual_seed(seed)
        model = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):  # torch's default draw has std 1/sqrt(3 fan_in): make it He's
                module.weight.mul_(HE_FROM_DEFAULT_INIT)
        model.fc.weight.mul_(LOGIT_SCALE / model.fc.weight.std())
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return save_torch_file(state, path)


def center_square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] → uint8 [3, size, size]: central square, antialiased bicubic resize."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top : top + side, left : left + side].unsqueeze(0).float()
    out = F.interpolate(square, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


class ReferenceImages(Dataset):
    """Image files under a directory (recursively, e.g. an ImageFolder tree) as uint8 [3, S, S]."""

    def __init__(self, root: str | Path, image_size: int):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"reference image directory {root} does not exist")
        self.files = sorted(p for p in root.rglob("*") if p.suffix in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(set(s.lower() for s in IMAGE_SUFFIXES)))}) "
                                    f"under {root}")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return center_square_resize(torch.from_numpy(array.copy()).permute(2, 0, 1), self.image_size)


class DecodedImages(Dataset):
    """Images at `locations`, decoded by `decode(location) -> RGB PIL image` (e.g. the pipeline's image
    loader), as uint8 [3, S, S] reference images for torch-fidelity (tokenizer geometry)."""

    def __init__(self, locations: list[str], decode: Callable[[str], Image.Image], image_size: int):
        if not locations:
            raise ValueError("no reference images: the FID needs at least one")
        self.locations, self.decode, self.image_size = list(locations), decode, image_size

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int) -> torch.Tensor:
        array = np.asarray(self.decode(self.locations[i]).convert("RGB"), dtype=np.uint8)
        return center_square_resize(torch.from_numpy(array.copy()).permute(2, 0, 1), self.image_size)


class ImageTensors(Dataset):
    """An in-memory uint8 [N, 3, H, W] tensor as a torch-fidelity input."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class StreamedImages(GenerativeModelBase):
    """Images produced on demand: torch-fidelity asks for batches, `next_batch(n)` returns uint8 [n, 3, H, W].

    torch-fidelity passes noise vectors; they only set the batch size (our generator has its own seed).
    """

    def __init__(self, next_batch: Callable[[int], torch.Tensor], num_images: int):
        super().__init__()
        self.next_batch, self.num_images = next_batch, num_images

    @property
    def z_size(self) -> int:
        return 1

    @property
    def z_type(self) -> str:
        return "normal"

    @property
    def num_classes(self) -> int:
        return 0

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.next_batch(noise.shape[0])


class TokenImages(StreamedImages):
    """Stored token grids [N, L] decoded in order by `decode(tokens) -> float [n, 3, H, W] in [0, 1]`,
    made uint8 by `uint8` (round, or truncate as the `mage` generation preset's PNGs)."""

    def __init__(self, tokens: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], uint8: str = "round"):
        super().__init__(self._decode_next, tokens.shape[0])
        self.tokens, self.decode, self.cursor, self.uint8 = tokens, decode, 0, uint8

    def _decode_next(self, n: int) -> torch.Tensor:
        batch = self.tokens[self.cursor : self.cursor + n]
        self.cursor += batch.shape[0]
        return to_uint8(self.decode(batch), self.uint8)


def _as_input(source) -> object:
    if isinstance(source, (Dataset, GenerativeModelBase)):
        return source
    if isinstance(source, torch.Tensor):
        return ImageTensors(source)
    raise TypeError(f"cannot use {type(source).__name__} as an image set: give a Dataset of uint8 images, "
                    "a uint8 tensor, a StreamedImages source or an image directory")


def fid_is(generated, reference, cfg: FidConfig, device: str | torch.device | None = None,
           isc: bool = True) -> dict:
    """FID of `generated` against `reference` (and the Inception Score of `generated`) via torch-fidelity.

    `generated`: uint8 tensor [N, 3, H, W], a Dataset of uint8 images, or a `StreamedImages` source.
    `reference`: an image directory (preprocessed like the tokenizer input) or the same kinds as above.
    """
    weights = check_weights(cfg)
    device = resolve_device(device)
    kwargs = dict(fid=True, isc=isc, feature_extractor=cfg.feature_extractor,
                  feature_extractor_weights_path=str(weights), cuda=device.type == "cuda",
                  batch_size=cfg.batch_size, isc_splits=cfg.isc_splits, verbose=False, cache=False,
                  **({"feature_layer_fid": cfg.feature_layer} if cfg.feature_layer else {}))
    if isinstance(reference, (str, Path)):
        if cfg.cache_dir:  # the reference statistics are the same for every run: cache them by content key
            key = json_digest({"root": str(Path(reference).resolve()), "size": cfg.image_size,
                               "extractor": cfg.feature_extractor, "weights": file_digest(weights)})
            kwargs.update(cache=True, cache_root=cfg.cache_dir, input2_cache_name=f"lease-reference-{key[:16]}")
        reference = ReferenceImages(reference, cfg.image_size)
    kwargs["save_cpu_ram"] = not (cfg.loader_workers and isinstance(reference, ReferenceImages))
    generated, reference = _as_input(generated), _as_input(reference)
    if isinstance(generated, StreamedImages):
        kwargs["input1_model_num_samples"] = generated.num_images
    metrics = torch_fidelity.calculate_metrics(input1=generated, input2=reference, **kwargs)
    num_generated = generated.num_images if isinstance(generated, StreamedImages) else len(generated)
    result = {"fid": float(metrics["frechet_inception_distance"]), "num_generated": int(num_generated),
              "num_reference": len(reference), "feature_extractor": cfg.feature_extractor}
    if isc:
        result.update(isc_mean=float(metrics["inception_score_mean"]), isc_std=float(metrics["inception_score_std"]))
    log.info("FID %.3f%s over %d generated vs %d reference images", result["fid"],
             f", IS {result['isc_mean']:.2f} ± {result['isc_std']:.2f}" if isc else "", num_generated,
             result["num_reference"])
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lease.evaluate import add_config_arguments, add_device_argument

    parser.add_argument("--generated", type=Path, required=True, help="directory of generated images")
    parser.add_argument("--reference", type=Path, required=True, help="directory of validation images")
    parser.add_argument("--weights", type=Path, default=None, help=f"feature extractor weights ({INCEPTION_WEIGHTS_FILE})")
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write")
    add_device_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lease.evaluate import config_from_args

    cfg = config_from_args(FidConfig, args, weights=str(args.weights) if args.weights else None)
    # generated images are already at their size: the same crop/resize leaves them unchanged at image_size
    result = fid_is(ReferenceImages(args.generated, cfg.image_size), args.reference, cfg, args.device)
    atomic_write_json(args.out, {"protocol": "fid", **result})
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval fid", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
