"""The protocol commands end to end on packed shards, a lease checkpoint and a tiny MaskGIT VQGAN."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lease.checkpoints import save_checkpoint
from lease.configs import model_config
from lease.evaluate import features, fewshot, generate, knn, linear_probe, report
from lease.model import LeaseModel
from lease.typed_config import to_dict
from lease.synthetic import planted_tokens
from planted import write_shards

GRID, CODES, CLASSES = 16, 64, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    vq, disc, labels = planted_tokens(96, CLASSES, GRID * GRID, concepts=8, synonyms=8, seed=0)
    write_shards(root / "train", vq[:64], disc[:64], labels[:64], per_shard=32)
    write_shards(root / "val", vq[64:], disc[64:], labels[64:], per_shard=32, prefix="val")
    torch.manual_seed(0)
    model = LeaseModel(model_config("tiny", grid_size=GRID, vocab_gen=CODES, embed_dim=32, num_heads=2,
                                    decoder_embed_dim=32, decoder_num_heads=2, depth=1, decoder_depth=1,
                                    contrast_on="none"))
    save_checkpoint(root / "model.pt", {"model": model.state_dict(), "model_config": to_dict(model.cfg),
                                        "loss_config": to_dict(model.loss_cfg), "step": 0})
    return root


def test_feature_and_discriminative_commands(run):
    for split in ("train", "val"):
        assert features.main(["--checkpoint", str(run / "model.pt"), "--shards", str(run / split),
                              "--out", str(run / "feats" / split), "--batch-size", "16", "--device", "cpu"]) == 0
    assert np.load(run / "feats" / "train" / "features.npy").shape == (64, 32)
    common = ["--train-features", str(run / "feats" / "train"), "--val-features", str(run / "feats" / "val"),
              "--device", "cpu"]
    assert knn.main(common + ["--out", str(run / "eval" / "knn.json")]) == 0
    assert linear_probe.main(common + ["--out", str(run / "eval" / "linear_probe.json"), "--epochs", "2",
                                       "--batch-size", "16"]) == 0
    assert fewshot.main(common + ["--out", str(run / "eval" / "fewshot.json"), "shots=[2, 4]",
                                  "seeds=[0]", "epochs=1"]) == 0
    assert json.loads((run / "eval" / "fewshot.json").read_text())["shots"]["4"]["num_train"] == 4 * CLASSES
    for name in ("knn", "linear_probe"):
        assert 0.0 <= json.loads((run / "eval" / f"{name}.json").read_text())["top1"] <= 100.0


def test_generate_command_writes_samples_and_task_grids(run):
    from lease.tokenizers.tiny import save_tiny_maskgit_vqgan

    vqgan = save_tiny_maskgit_vqgan(run / "vqgan.ckpt", n_embed=CODES, ch=32, num_res_blocks=1, z_channels=32,
                                    resolution=64, ch_mult=(1, 1, 2))
    assert generate.main(["--checkpoint", str(run / "model.pt"), "--vqgan-checkpoint", str(vqgan),
                          "--out", str(run / "eval"), "--num-images", "3", "--val-shards", str(run / "val"),
                          "--grid-images", "2", "--device", "cpu", "num_steps=3",
                          "batch_size=2"]) == 0
    tokens = np.load(run / "eval" / "samples_tokens.npy")
    assert tokens.shape == (3, GRID * GRID) and tokens.max() < CODES
    for name in ("samples", "reconstruction", "inpainting", "outpainting"):
        with Image.open(run / "eval" / f"{name}.png") as img:
            assert img.size[0] > 64
    assert report.main(["--eval-dir", str(run / "eval"), "--out", str(run / "report")]) == 0
    assert (run / "report" / "report.md").read_text().count("![") == 4
