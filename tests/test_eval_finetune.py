"""Fine-tuning (table A.3): layer-wise lr decay, mixup/cutmix targets, a tiny CPU run that resumes exactly."""
from __future__ import annotations

import pytest
import torch

from lease.configs import model_config
from lease.evaluate.finetune import FinetuneClassifier, FinetuneConfig, finetune, mixup_for, optimizer_for
from lease.evaluate.online import AugmentConfig, AugmentedImages, OnlineTokenizer, view_transform
from lease.model import LeaseModel
from lease.tokenizers import load_vqgan
from lease.images import decode_location
from pipeline.manifest import read_manifest
from test_eval_online import SIZE, assets  # noqa: F401  (the module fixture)

DEPTH = 3


def tiny_encoder(seed: int = 0) -> LeaseModel:
    torch.manual_seed(seed)
    return LeaseModel(model_config("tiny", grid_size=16, vocab_gen=32, embed_dim=32, depth=DEPTH, num_heads=2,
                                   decoder_embed_dim=32, decoder_num_heads=2, contrast_on="none"))


def test_layer_wise_lr_decay_gives_each_layer_its_power_of_the_decay():
    model = FinetuneClassifier(tiny_encoder(), num_classes=5, drop_path=0.1)
    optimizer = optimizer_for(model, FinetuneConfig(layer_decay=0.65))
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            assert scale[id(param)] == pytest.approx(0.65 ** (DEPTH - i)), name
        elif name.startswith("token_emb."):
            assert scale[id(param)] == pytest.approx(0.65 ** (DEPTH + 1)), name
        else:
            assert name.split(".")[0] in ("fc_norm", "head") and scale[id(param)] == 1.0, name
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.head.weight) in decayed and id(model.head.bias) not in decayed  # no decay on 1-D params


def test_train_mode_drops_only_in_the_embedding_and_the_drop_paths():
    """The authors' fine-tuning ViT has no block dropout: with the embedding's dropout and drop path off,
    a train-mode forward is the eval-mode one, although the pretraining config's block dropouts are 0.1."""
    encoder = tiny_encoder()
    assert encoder.cfg.dropout > 0 and encoder.cfg.attn_dropout > 0
    model = FinetuneClassifier(encoder, num_classes=5, drop_path=0.0)
    ids = torch.randint(0, 32, (4, 256), generator=torch.Generator().manual_seed(0))
    expected = model.eval()(ids)
    model.train()
    assert model.token_emb.training and model.head.training and not any(b.training for b in model.blocks)
    model.token_emb.eval()
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
    model.token_emb.train()
    assert not torch.equal(model(ids), expected)  # the embedding's dropout is on in train mode


@pytest.mark.parametrize("seed", range(4))  # mixup or cutmix, drawn per batch
def test_mixup_and_cutmix_targets_sum_to_one(seed):
    import numpy as np

    np.random.seed(seed)
    images = torch.rand(8, 3, 16, 16)
    mixed, targets = mixup_for(FinetuneConfig(), num_classes=5)(images.clone(), torch.arange(8) % 5)
    assert targets.shape == (8, 5) and torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets > 0).sum(1).min() >= 2  # smoothed and mixed: more than one class per row
    assert not torch.equal(mixed, images)


@pytest.fixture(scope="module")
def data(assets):  # noqa: F811
    aug = AugmentConfig(image_size=SIZE, val_resize=72, batch_size=4, num_workers=0)
    views = {}
    for split, view in (("train", "randaug"), ("val", "val")):
        rows = read_manifest(assets / "manifest.parquet", split=split)
        views[split] = AugmentedImages(rows["location"].to_pylist(), rows["label"].to_pylist(),
                                       view_transform(aug, view), decode_location)
    tokenizer = OnlineTokenizer(load_vqgan("maskgit", assets / "vqgan.ckpt", device="cpu"), aug.batch_size)
    return views, tokenizer, aug


def test_tiny_finetune_runs_and_resumes_exactly(data, tmp_path):
    views, tokenizer, aug = data
    cfg = FinetuneConfig(batch_size=2, epochs=2, warmup_epochs=1, base_lr=1e-2, dtype="fp32")
    straight = finetune(tiny_encoder(), tokenizer, views["train"], views["val"], 2, cfg, aug, tmp_path / "a")
    assert straight["completed"] and len(straight["history"]) == 2 and 0 <= straight["top5"] <= 100
    first = finetune(tiny_encoder(), tokenizer, views["train"], views["val"], 2, cfg, aug, tmp_path / "b",
                     stop_after=1)
    assert not first["completed"] and first["epochs_done"] == 1
    resumed = finetune(tiny_encoder(), tokenizer, views["train"], views["val"], 2, cfg, aug, tmp_path / "b")
    def numbers(result):  # the measured rates differ run to run
        return [{k: v for k, v in row.items() if k != "train_images_per_s"} for row in result["history"]]

    assert numbers(resumed) == numbers(straight)
    a = torch.load(tmp_path / "a" / "finetune.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "finetune.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
