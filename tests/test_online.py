"""mage_online's image path (`lease.online`): the same codes as the tokenize stage for the centre crop,
RandomResizedCrop's law for the boxes drawn on the device, and `lease train` with method mage_online on
a manifest's images."""
import math

import numpy as np
import pytest
import torch

from lease.configs import train_config
from lease.online import ManifestImages, OnlineTokenizer, crop_boxes
from lease.tokenizers import load_vqgan
from lease.train import train
from pipeline import tokenize as tok
from test_tokenize import assets, full_run  # noqa: F401 (fixtures: demo manifest, tiny VQGAN, tokenize output)

SIDE = 64  # the test VQGAN's input side (f4: 16 × 16 codes)


def _tokenizer(assets, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True):  # noqa: F811
    return OnlineTokenizer(load_vqgan("maskgit", assets / "vqgan.ckpt", None, "cpu"), scale, ratio, flip)


def test_centre_crops_give_the_tokenize_stages_codes(assets, full_run):  # noqa: F811
    """The manifest's images through the pipeline loader (`ManifestImages`), the whole centre square
    encoded: every image's codes are the shard's. So is a crop drawn to be the whole square, unflipped."""
    out, _ = full_run
    shards = tok.read_shards(out / "train")
    images = ManifestImages(str(assets / "manifest.parquet"), "train", 4, SIDE, torch.device("cpu"), seed=0,
                            num_workers=0)
    centre, whole = _tokenizer(assets), _tokenizer(assets, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    order, batches = images.epoch_order(0), images.iterate(0)
    for step in range(images.steps_per_epoch):
        batch, rows = next(batches), order[4 * step: 4 * (step + 1)].numpy()
        assert np.array_equal(centre.encode_centre(batch.images).numpy(), shards["vq"][rows])
        assert np.array_equal(whole.tokenize(batch).vq.numpy(), shards["vq"][rows])
        assert np.array_equal(batch.labels.numpy(), shards["labels"][rows])
    assert sorted(order.tolist()) == list(range(len(shards["vq"])))  # 12 images, 3 batches: all of them


def test_crop_boxes_follow_random_resized_crop():
    """Inside the square, area scale in [0.2, 1] and aspect in [3/4, 4/3] up to the rounding of the sides;
    every image its own box; the flips about half."""
    side, n = 256, 4096
    gen = torch.Generator().manual_seed(0)
    boxes = crop_boxes(n, side, (0.2, 1.0), (3 / 4, 4 / 3), torch.device("cpu"), gen)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= side).all() and (w >= 1).all() and (h >= 1).all()
    assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision's
    area = w * h / side**2
    assert area.min() > 0.2 - 2 / side and area.max() <= 1.0
    assert (w / h).min() > 3 / 4 - 2 / math.sqrt(0.2 * side**2) and (w / h).max() < 4 / 3 + 2 / math.sqrt(0.2 * side**2)
    assert len(torch.unique(boxes, dim=0)) > 0.9 * n
    assert 0.5 < area.mean() < 0.7  # E[scale] = 0.6, less the large boxes that did not fit and were drawn again
    # a left-to-right ramp: a flipped crop runs right-to-left
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8).expand(256, 3, side, side)
    crops = OnlineTokenizer(_FakeVQGAN(side), (0.2, 1.0), (3 / 4, 4 / 3), True).augment(ramp, gen)
    assert crops.shape == (256, 3, side, side) and 0.0 <= crops.min() and crops.max() <= 1.0
    flipped = (crops[:, 0, 0, 0] > crops[:, 0, 0, -1]).float().mean()
    assert 0.4 < flipped < 0.6


class _FakeVQGAN:
    """Only the input side, for the augmentation alone."""

    def __init__(self, side: int):
        self.image_size = side


def test_mage_online_trains_from_the_manifests_images(assets, tmp_path):  # noqa: F811
    """`lease train` with method mage_online: images read through the loader, augmented and tokenized in
    the step; the loss is finite and the encoder exported."""
    cfg = train_config({"preset": "tiny", "method": "mage_online", "batch_size": 4, "max_steps": 3, "log_every": 1,
                        "ckpt_every": 3, "model": {"vocab_gen": 32, "embed_dim": 32, "num_heads": 2,
                                                   "decoder_embed_dim": 32, "decoder_num_heads": 2},
                        "online": {"manifest": str(assets / "manifest.parquet"),
                                   "vqgan_checkpoint": str(assets / "vqgan.ckpt"), "source_size": 80,
                                   "num_workers": 0}})
    result = train(cfg, tmp_path / "run")
    assert result["completed"] and math.isfinite(result["final"]["loss"]) and (tmp_path / "run" / "export").is_dir()


@pytest.mark.parametrize("key, value, message", [("online.manifest", "", "online.manifest"),
                                                 ("model.vocab_gen", 64, "has 32 codes")])
def test_mage_online_names_what_is_missing_or_mismatched(assets, tmp_path, key, value, message):  # noqa: F811
    data = {"preset": "tiny", "method": "mage_online", "batch_size": 4, "max_steps": 1,
            "model": {"vocab_gen": 32}, "online": {"manifest": str(assets / "manifest.parquet"),
                                                    "vqgan_checkpoint": str(assets / "vqgan.ckpt")}}
    section, field = key.split(".")
    data[section][field] = value
    with pytest.raises(Exception, match=message):
        train(train_config(data), tmp_path / "run")
