"""Online tokenization for evaluation: the tokenize stage's tokens for its centre crop; seeded views."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lease.evaluate.online import AugmentConfig, AugmentedImages, OnlineTokenizer, epoch_loader, view_transform
from lease.tokenizers import load_vqgan
from lease.tokenizers.vqgan_maskgit import MaskGITVQGAN, MaskGITVQGANConfig
from pipeline import tokenize as tok
from pipeline.demo_data import make_demo_dataset
from lease.images import both_crops, decode_location, pil_to_tensor
from pipeline.manifest import build_manifest, read_manifest

SIZE = 64  # the f4 tiny VQGAN's input: a 16x16 grid, as DINOv2 at 32 px with patch 2


class StageCrop:
    """The tokenize stage's VQGAN crop of a decoded image (centre square, bicubic antialiased resize)."""

    def __call__(self, image):
        return both_crops(pil_to_tensor(image), (SIZE,))[0]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("online")
    make_demo_dataset(root / "images", num_classes=2, train_per_class=3, val_per_class=3, image_size=40, seed=1)
    build_manifest(root / "images", root / "manifest.parquet", num_workers=0)
    torch.manual_seed(0)
    vq = MaskGITVQGAN(MaskGITVQGANConfig(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=8, embed_dim=8,
                                         n_embed=32, resolution=SIZE))
    torch.save({"state_dict": vq.state_dict()}, root / "vqgan.ckpt")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=2, image_size=32)).save_pretrained(root / "dinov2")
    np.save(root / "centroids.npy", np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32))
    return root


def test_online_path_gives_the_tokenize_stage_tokens_for_its_centre_crop(assets, tmp_path):
    tok.tokenize(assets / "manifest.parquet", assets / "centroids.npy", tmp_path, vqgan_kind="maskgit",
                 vqgan_checkpoint=assets / "vqgan.ckpt", dinov2_kind="hf", dinov2_path=assets / "dinov2", layer=-1,
                 dino_size=32, splits=("val",), batch_size=4, num_workers=0, images_per_shard=8, device="cpu")
    stage = tok.read_shards(tmp_path / "val")
    rows = read_manifest(assets / "manifest.parquet", split="val")
    data = AugmentedImages(rows["location"].to_pylist(), rows["label"].to_pylist(), StageCrop(), decode_location)
    tokenizer = OnlineTokenizer(load_vqgan("maskgit", assets / "vqgan.ckpt", device="cpu"), chunk=3)
    batches = list(epoch_loader(data, 0, batch_size=4, num_workers=0, shuffle=False))
    ids = torch.cat([tokenizer(images) for images, _ in batches])
    assert ids.shape == (6, 256)
    assert np.array_equal(ids.numpy(), stage["vq"].astype(np.int64))
    assert np.array_equal(torch.cat([y for _, y in batches]).numpy(), stage["labels"])


def _views(data, epoch, workers=0):
    return torch.cat([x.float() for x, _ in epoch_loader(data, epoch, 3, workers, shuffle=False)])


@pytest.mark.parametrize("view", ["train", "randaug"])
def test_augmented_views_differ_per_epoch_and_repeat_for_a_seed(assets, view):
    rows = read_manifest(assets / "manifest.parquet", split="train")
    cfg = AugmentConfig(image_size=SIZE, val_resize=SIZE)

    def data(seed):
        return AugmentedImages(rows["location"].to_pylist(), rows["label"].to_pylist(), view_transform(cfg, view),
                               decode_location, seed=seed)

    first = _views(data(0), 0)
    assert first.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(first, _views(data(0), 0))  # reproducible for a seed
    assert not torch.equal(first, _views(data(0), 1))  # a new view every epoch (step)
    assert not torch.equal(first, _views(data(1), 0))
    if view == "train":
        assert torch.equal(first, _views(data(0), 0, workers=2))  # the same views in worker processes


def test_training_order_is_seeded_and_drops_the_short_batch(assets):
    rows = read_manifest(assets / "manifest.parquet", split="train")
    data = AugmentedImages(rows["location"].to_pylist(), rows["label"].to_pylist(),
                           view_transform(AugmentConfig(image_size=SIZE, val_resize=SIZE), "val"), decode_location)
    labels = [torch.cat([y for _, y in epoch_loader(data, e, 4, 0, shuffle=True)]).tolist() for e in (0, 0, 1)]
    assert len(labels[0]) == 4 and labels[0] == labels[1]


def test_seeded_draws_seed_every_generator_the_transforms_use_and_restore_them():
    from lease.evaluate.online import seeded_draws
    import random

    def draws(*entropy):
        with seeded_draws(*entropy):
            return random.random(), float(np.random.rand()), float(torch.rand(()))

    assert draws(0, 1, 2) == draws(0, 1, 2)
    other = draws(0, 2, 2)
    assert all(a != b for a, b in zip(draws(0, 1, 2), other))  # each generator moves with the entropy
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = random.random(), float(np.random.rand()), float(torch.rand(()))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    draws(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected  # states restored


def test_the_randaug_view_is_the_authors_finetuning_transform_in_uint8():
    """The authors' fine-tuning views: timm's transform at RRC 0.2–1 normalized by the ImageNet mean / std,
    denormalized before the VQGAN. Ours stops before timm's ToTensor; `to_unit` gives those pixels, draw for
    draw (RandAugment's rotations and shears fill with the mean colour)."""
    from PIL import Image
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    from lease.evaluate.online import seeded_draws, to_unit

    cfg = AugmentConfig(image_size=32)
    assert cfg.randaug_min_scale == 0.2
    authors = create_transform(32, is_training=True, scale=(0.2, 1.0), auto_augment="rand-m9-mstd0.5-inc1",
                               interpolation="bicubic", re_prob=0.0, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    for index in range(24):  # rotate, shear or translate (their fill shows) in most of them
        with seeded_draws(0, 0, index):
            ours = view_transform(cfg, "randaug")(image)
        with seeded_draws(0, 0, index):
            theirs = authors(image) * std + mean
        assert ours.dtype == torch.uint8
        torch.testing.assert_close(to_unit(ours, torch.device("cpu")), theirs, rtol=0, atol=1e-6)


def test_randaug_at_full_magnitude_posterizes_to_zero_bits_as_timm_draws_it():
    """Magnitude 10 (m9 plus its 0.5 noise reaches it) makes timm's increasing posterize keep 0 bits, which
    Pillow 13 refuses: every view of a full-magnitude policy must still come out."""
    from PIL import Image

    from lease.evaluate.online import seeded_draws

    transform = view_transform(AugmentConfig(image_size=32, randaug="rand-m10-n2-inc1"), "randaug")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for index in range(60):  # posterize is one of 15 ops, two drawn per view: ~13 % of views use it
        with seeded_draws(0, 0, index):
            view = transform(image)
        assert view.shape == (3, 32, 32) and torch.isfinite(view).all()
