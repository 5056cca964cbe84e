"""FID / IS through the real torch-fidelity code path with a tiny random-weight extractor.

The extractor is registered through torch-fidelity's own registry and loads its weights the way
`inception-v3-compat` does: a plain state dict read with torch.load from `feature_extractor_weights_path`.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from lease.evaluate.fid import INCEPTION_WEIGHTS_FILE, FidConfig, TokenImages, center_square_resize, fid_is
from lease.evaluate.grids import save_png

NAME = "lease-test-tiny-extractor"


class TinyExtractor(FeatureExtractorBase):
    """uint8 images → 12-d pooled conv features ('pool', for FID) and 10 logits ('logits_unbiased', for IS)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.conv = nn.Conv2d(3, 12, kernel_size=4, stride=4)
        self.fc = nn.Linear(12, 10)
        self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))

    def forward(self, x):
        h = F.relu(self.conv(x.float() / 255.0)).mean(dim=(2, 3))
        out = {"pool": h, "logits_unbiased": self.fc(h)}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "pool", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "pool", "isc": "logits_unbiased", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, TinyExtractor)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("weights") / "tiny-extractor.pth"
    module = nn.Module()
    module.conv, module.fc = nn.Conv2d(3, 12, kernel_size=4, stride=4), nn.Linear(12, 10)
    torch.save(module.state_dict(), weights)
    return FidConfig(weights=str(weights), feature_extractor=NAME, image_size=32, batch_size=16, isc_splits=2,
                     loader_workers=False)


def images(seed: int, n: int = 40, brightness: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=gen)
    img = F.interpolate(base, size=32, mode="bilinear", align_corners=False) + brightness
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def test_fid_of_a_set_against_itself_is_zero_and_against_another_positive(cfg):
    real = images(0)
    same = fid_is(real, real, cfg, device="cpu")
    other = fid_is(images(1, brightness=0.3), real, cfg, device="cpu")
    assert abs(same["fid"]) < 1e-3
    assert other["fid"] > 0.05 and other["fid"] > 100 * abs(same["fid"])
    assert same["isc_mean"] >= 1.0 and same["num_generated"] == same["num_reference"] == 40


def test_reference_folder_is_preprocessed_like_the_tokenizer_input(cfg, tmp_path):
    real = images(2, n=20)
    for i, img in enumerate(real):
        save_png(img.float() / 255.0, tmp_path / f"class{i % 2}" / f"{i:03d}.png")
    result = fid_is(real, tmp_path, cfg, device="cpu", isc=False)
    assert result["num_reference"] == 20 and abs(result["fid"]) < 1e-3
    wide = torch.randint(0, 255, (3, 40, 64), dtype=torch.uint8)
    assert center_square_resize(wide, 32).shape == (3, 32, 32)
    assert torch.equal(center_square_resize(wide[:, :, 12:52], 40), wide[:, :, 12:52])  # square at size: unchanged


def test_streamed_generated_images_match_the_same_images_in_memory(cfg):
    real = images(3, n=24)
    tokens = torch.arange(24).view(24, 1)  # each "token grid" names one image
    source = TokenImages(tokens, lambda t: real[t[:, 0]].float() / 255.0)
    result = fid_is(source, real, cfg, device="cpu")
    assert result["num_generated"] == 24 and abs(result["fid"]) < 1e-3 and source.cursor == 24


def test_missing_weights_name_the_file_to_provide(tmp_path):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        fid_is(images(0), images(1), FidConfig(weights=str(tmp_path / "nope.pth")), device="cpu")
    with pytest.raises(FileNotFoundError, match="fid.weights"):
        fid_is(images(0), images(1), FidConfig(), device="cpu")
    assert INCEPTION_WEIGHTS_FILE == "weights-inception-2015-12-05-6726825d.pth"
