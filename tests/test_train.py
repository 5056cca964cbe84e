"""Trainer behaviour: exact resume, NaN stop, bad inputs, and learning on planted structure."""
import json
from typing import get_args, get_type_hints

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lease.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint
from lease.configs import MaskConfig, TrainConfig, model_config, train_config
from lease.data import read_token_set
from lease.io import file_digest
from lease.masking import random_plan
from lease.model import LeaseModel
from lease.train import NonFiniteLoss, compile_for_training, mark_row_counts_dynamic, train
from lease.synthetic import planted_codebook, planted_tokens
from planted import write_shards

# Flat class preferences and many synonyms: the bag of generative codes alone separates classes
# only partly, so what training adds shows in the k-NN accuracy.
CLASSES, CONCEPTS, SYNONYMS, GRID, CONCENTRATION = 8, 24, 16, 8, 1.0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    vq, disc, labels = planted_tokens(1024, CLASSES, GRID * GRID, CONCEPTS, SYNONYMS, seed=0,
                                       concentration=CONCENTRATION)
    write_shards(root / "train", vq[:768], disc[:768], labels[:768], per_shard=256)
    write_shards(root / "val", vq[768:], disc[768:], labels[768:], per_shard=256, prefix="val")
    np.save(root / "codebook.npy", planted_codebook(CONCEPTS, 16, seed=1))
    return root


def tiny_cfg(root, **overrides):
    data = {"preset": "tiny", "batch_size": 64, "max_steps": 8, "log_every": 2, "ckpt_every": 4, "seed": 3,
            "model": {"vocab_gen": CONCEPTS * SYNONYMS, "grid_size": GRID, "embed_dim": 32, "num_heads": 2,
                      "decoder_embed_dim": 32, "decoder_num_heads": 2},
            "optim": {"warmup_epochs": 1.0, "base_lr": 1e-3},
            "data": {"shards": str(root / "train"), "codebook": str(root / "codebook.npy")}}
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return train_config(data)


def test_resume_is_exact(planted, tmp_path):
    straight = train(tiny_cfg(planted), tmp_path / "straight")
    first = train(tiny_cfg(planted), tmp_path / "split", stop_after=3)
    assert first["steps"] == 3 and not first["completed"]
    resumed = train(tiny_cfg(planted), tmp_path / "split", resume=True)
    assert resumed["steps"] == straight["steps"] == 8
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_metrics_and_export_written(planted, tmp_path):
    result = train(tiny_cfg(planted), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert (tmp_path / "run" / "export" / "encoder.safetensors").is_file()
    model = model_from_checkpoint(result["checkpoint"])
    assert model.cfg.vocab_gen == CONCEPTS * SYNONYMS and model.codebook_size == CONCEPTS


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(planted, tmp_path):
    train(tiny_cfg(planted, max_steps=4), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    digest = file_digest(ckpt)
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        train(tiny_cfg(planted, **{"max_steps": 8, "optim.base_lr": 1e35, "optim.warmup_epochs": 0.0}),
              tmp_path / "run", resume=True)
    assert file_digest(ckpt) == digest


def test_token_ids_out_of_range_are_named(planted, tmp_path):
    with pytest.raises(ValueError, match="vocab_gen"):
        train(tiny_cfg(planted, **{"model.vocab_gen": 16}), tmp_path / "run")


def test_codebook_smaller_than_ids_is_named(planted, tmp_path):
    np.save(tmp_path / "small.npy", planted_codebook(CONCEPTS - 4, 16, seed=1))
    with pytest.raises(ValueError, match="codebook has K"):
        train(tiny_cfg(planted, **{"data.codebook": str(tmp_path / "small.npy")}), tmp_path / "run")


def test_resume_without_checkpoint_is_clear(planted, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_cfg(planted), tmp_path / "nothing", resume=True)


def test_compiled_model_keeps_one_graph_across_masking_ratios():
    """Under `torch.compile` the decoded and contrast row counts change from step to step, and the
    trainer marks them dynamic so that one graph serves every ratio. The ratios here cover contrast
    rows at full width (ratio near its minimum), where a slice of the kept rows would be contiguous and
    any other width's would not: that flip alone recompiled the whole step."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = model_config("tiny", codebook_dim=16)
    model = LeaseModel(cfg).train()
    model.set_codebook(torch.randn(32, 16))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")  # graphs as inductor gets them, without codegen
    length = cfg.seq_len
    contrast_widths = set()
    for num_masked in (length * 3 // 4, length // 2 + 1, length - 1, length * 5 // 8):
        plan = random_plan(4, length, length // 2, num_masked, torch.device("cpu"), None,
                           MaskConfig().decode_rows_multiple)
        mark_row_counts_dynamic(plan)
        contrast_widths.add(plan.contrast_idx.shape[1])
        compiled(torch.randint(0, cfg.vocab_gen, (4, length)), torch.randint(0, 32, (4, length)), plan).loss.backward()
    assert length // 2 in contrast_widths and len(contrast_widths) == 4
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("mode", get_args(get_type_hints(TrainConfig)["compile_mode"]))
def test_training_compile_options_are_known_to_inductor(mode):
    """`torch.compile` checks option names when it wraps, before any step: a torch that renamed one of
    `TRAINING_INDUCTOR_OPTIONS` (or a mode) fails here on the CPU, not at the first step of a GPU job."""
    compile_for_training(torch.nn.Linear(2, 2), mode)


def _knn_accuracy(model, train_set, val_set, k=10):
    with torch.no_grad():
        f_train = F.normalize(model.eval().features(train_set.vq.long()), dim=-1)
        f_val = F.normalize(model.features(val_set.vq.long()), dim=-1)
    sims, idx = (f_val @ f_train.T).topk(k, dim=-1)
    votes = torch.zeros(len(f_val), CLASSES).scatter_add_(1, train_set.labels[idx], (sims / 0.07).exp())
    return (votes.argmax(-1) == val_set.labels).float().mean().item()


@pytest.mark.slow
def test_planted_structure_knn_rises_and_contrast_helps(planted, tmp_path):
    train_set, val_set = read_token_set(planted / "train"), read_token_set(planted / "val")
    torch.manual_seed(0)
    untrained = LeaseModel(tiny_cfg(planted, **{"model.contrast_on": "none"}).model)
    accuracy = {"untrained": _knn_accuracy(untrained, train_set, val_set)}
    for placement in ("none", "encoder"):
        cfg = tiny_cfg(planted, **{"max_steps": 150, "log_every": 50, "ckpt_every": 150,
                                   "model.contrast_on": placement, "loss.contrast_weight": 1.0})
        result = train(cfg, tmp_path / placement)
        accuracy[placement] = _knn_accuracy(model_from_checkpoint(result["checkpoint"]), train_set, val_set)
    chance = 1.0 / CLASSES
    assert accuracy["encoder"] > 5 * chance, accuracy
    assert accuracy["none"] > accuracy["untrained"] + 0.05, accuracy
    assert accuracy["encoder"] > accuracy["none"] + 0.1, accuracy
