"""k-NN, linear probe, few-shot sampling and feature extraction on synthetic data."""
import json

import numpy as np
import pytest
import torch

from lease.configs import model_config
from lease.evaluate import features as feat_mod
from lease.evaluate.fewshot import FewShotConfig, few_shot, few_shot_table, sample_few_shot
from lease.evaluate.knn import KnnConfig, knn_classify
from lease.evaluate.lars import LARS
from lease.evaluate.linear_probe import ProbeConfig, cosine_lr, linear_probe
from lease.model import LeaseModel

CLASSES, DIM = 10, 32
# lr 1.6 per step as the paper's probe (0.1 × 4096 / 256), at a batch that suits 1000 samples
PROBE = ProbeConfig(base_lr=3.2, batch_size=128, epochs=30)


def separable(n_per_class: int, seed: int, spread: float = 0.3):
    """Gaussian clusters around well-separated class means: linearly separable in practice."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(CLASSES).repeat_interleave(n_per_class)
    feats = means[labels] + spread * torch.randn(labels.numel(), DIM, generator=gen) + 5.0  # off-centre on purpose
    return feats, labels


@pytest.fixture(scope="module")
def data():
    train_x, train_y = separable(100, seed=0)
    val_x, val_y = separable(30, seed=1)
    return train_x, train_y, val_x, val_y


def test_knn_recovers_separable_labels(data):
    train_x, train_y, val_x, val_y = data
    result = knn_classify(train_x, train_y, val_x, val_y, KnnConfig(query_chunk=64), device="cpu")
    assert result["top1"] > 99.0 and result["top5"] == 100.0
    assert result["num_query"] == val_x.shape[0] and result["k"] == 20


def test_knn_near_chance_on_shuffled_labels(data):
    train_x, train_y, val_x, val_y = data
    shuffled = train_y[torch.randperm(train_y.numel(), generator=torch.Generator().manual_seed(0))]
    result = knn_classify(train_x, shuffled, val_x, val_y, KnnConfig(), device="cpu")
    assert result["top1"] < 25.0  # chance is 10 %
    assert 30.0 < result["top5"] < 75.0  # chance is 50 %


def test_knn_weighted_vote_matches_hand_computation():
    # two train points of class 0 at cos 0.8, one of class 1 at cos 1.0: with T=0.07 the single exact match wins,
    # with T=10 (nearly uniform weights) the two class-0 votes win
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([1, 0, 0])
    query, qlabel = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    sharp = knn_classify(train, labels, query, qlabel, KnnConfig(k=3, temperature=0.07), device="cpu")
    flat = knn_classify(train, labels, query, qlabel, KnnConfig(k=3, temperature=10.0), device="cpu")
    assert sharp["top1"] == 100.0 and flat["top1"] == 0.0 and flat["top5"] == 100.0


def test_knn_rejects_unknown_labels(data):
    train_x, train_y, val_x, val_y = data
    with pytest.raises(ValueError, match="unknown label"):
        knn_classify(train_x, torch.full_like(train_y, -1), val_x, val_y, device="cpu")


def test_linear_probe_recovers_separable_labels(data):
    train_x, train_y, val_x, val_y = data
    result = linear_probe(train_x, train_y, val_x, val_y, PROBE, device="cpu")
    assert result["top1"] > 98.0 and result["top5"] == 100.0
    assert result["lr"] == pytest.approx(3.2 * 128 / 256)


def test_linear_probe_near_chance_on_shuffled_labels(data):
    train_x, train_y, val_x, val_y = data
    shuffled = train_y[torch.randperm(train_y.numel(), generator=torch.Generator().manual_seed(1))]
    result = linear_probe(train_x, shuffled, val_x, val_y, PROBE, device="cpu")
    assert result["top1"] < 25.0


def test_cosine_schedule_endpoints():
    assert cosine_lr(0, 100, 1.0, 0, 0.0) == pytest.approx(1.0)
    assert cosine_lr(50, 100, 1.0, 0, 0.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 1.0, 0, 0.1) == pytest.approx(0.1)
    assert cosine_lr(4, 100, 1.0, 10, 0.0) == pytest.approx(0.5)


def test_lars_trust_ratio_and_excluded_biases():
    w = torch.nn.Parameter(torch.full((2, 2), 3.0))  # ||w|| = 6
    b = torch.nn.Parameter(torch.zeros(2))
    opt = LARS([w, b], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 0.5)  # ||g|| = 1 → update = 0.001 * 6 / 1 * g = 0.003 per entry
    b.grad = torch.full((2,), 0.5)  # biases: plain SGD step
    opt.step()
    assert torch.allclose(w, torch.full((2, 2), 3.0 - 0.003))
    assert torch.allclose(b, torch.full((2,), -0.5))


def test_few_shot_sampling_takes_exactly_n_per_class():
    labels = torch.arange(7).repeat_interleave(torch.tensor([30, 25, 40, 26, 50, 31, 27]))
    for shots in (5, 13, 25):
        idx = sample_few_shot(labels, shots, seed=4)
        assert idx.unique().numel() == idx.numel()
        assert torch.equal(torch.bincount(labels[idx], minlength=7), torch.full((7,), shots))
    first, again, other = (sample_few_shot(labels, 5, seed=s) for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_few_shot_short_classes_error_or_all():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(ValueError, match="class 1 has 3"):
        sample_few_shot(labels, 5, seed=0)
    idx = sample_few_shot(labels, 5, seed=0, on_short_class="all")
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 5]


def test_few_shot_skips_the_shot_counts_a_small_train_split_cannot_fill(data, caplog):
    train_x, train_y, val_x, val_y = data
    keep = torch.cat([(train_y != 3).nonzero().flatten(), (train_y == 3).nonzero().flatten()[:7]])  # 7 of class 3
    cfg = FewShotConfig(shots=[5, 10], seeds=[0], epochs=2)
    result = few_shot(train_x[keep], train_y[keep], val_x, val_y, cfg, device="cpu")
    assert set(result["shots"]) == {"5"} and result["average"] == result["shots"]["5"]["top1"]
    assert result["skipped_shots"] == {"10": f"1 of {CLASSES} classes have fewer than 10 training samples "
                                              "(class 3 has 7)"}
    assert "10-shot skipped" in caplog.text
    none = few_shot(train_x[keep], train_y[keep], val_x, val_y, FewShotConfig(shots=[10], seeds=[0]), device="cpu")
    assert none["shots"] == {} and none["average"] is None
    with pytest.raises(ValueError, match="class 3 has 7"):
        few_shot(train_x[keep], train_y[keep], val_x, val_y, FewShotConfig(shots=[10], on_short_class="error"),
                 device="cpu")


def test_few_shot_protocol_and_table(data):
    train_x, train_y, val_x, val_y = data
    # 100 samples make 6 steps per epoch: more epochs stand in for the ~300 steps per epoch of 5-shot IN-1K
    cfg = FewShotConfig(shots=[5, 10], seeds=[0, 1], epochs=80, batch_size=16)
    result = few_shot(train_x, train_y, val_x, val_y, cfg, device="cpu")
    assert set(result["shots"]) == {"5", "10"}
    assert result["shots"]["5"]["num_train"] == 5 * CLASSES
    assert result["shots"]["10"]["top1"] > 95.0
    table = few_shot_table(result, reference={"LEASE (paper)": {"5": 51.0, "10": 59.39, "avg": 59.65}})
    assert "| LEASE (paper) | 51.00 | 59.39 | 59.65 |" in table and "| ours |" in table


def tiny_model():
    torch.manual_seed(0)
    return LeaseModel(model_config("tiny", grid_size=4, vocab_gen=32, embed_dim=32, num_heads=2,
                                   decoder_embed_dim=32, decoder_num_heads=2, contrast_on="none"))


def test_extract_features_matches_model_and_round_trips(tmp_path):
    model = tiny_model()
    tokens = torch.randint(0, 32, (10, 16), generator=torch.Generator().manual_seed(0)).to(torch.uint16)
    labels = torch.arange(10)
    feats = feat_mod.extract_features(model, tokens, batch_size=4, device="cpu")
    assert model.training  # restored after extraction in eval mode
    model.eval()
    with torch.no_grad():
        expected = model.features(tokens.long(), pool="mean")
        cls = model.features(tokens.long(), pool="cls")
    assert feats.dtype == torch.float32 and torch.allclose(feats, expected, atol=1e-5)
    assert torch.allclose(feat_mod.extract_features(model, tokens, 3, pool="cls", device="cpu"), cls, atol=1e-5)
    feat_mod.save_features(tmp_path / "val", feats, labels, {"pool": "mean"})
    loaded_x, loaded_y = feat_mod.load_features(tmp_path / "val")
    assert torch.equal(loaded_x, feats) and torch.equal(loaded_y, labels)
    assert json.loads((tmp_path / "val" / "features.json").read_text())["dim"] == 32
    assert np.load(tmp_path / "val" / "features.npy").shape == (10, 32)
    with pytest.raises(FileNotFoundError, match="lease eval features"):
        feat_mod.load_features(tmp_path / "missing")


def test_knn_cli_on_feature_artifacts(tmp_path, data):
    from lease.evaluate import knn

    train_x, train_y, val_x, val_y = data
    feat_mod.save_features(tmp_path / "train", train_x, train_y)
    feat_mod.save_features(tmp_path / "val", val_x, val_y)
    assert knn.main(["--train-features", str(tmp_path / "train"), "--val-features", str(tmp_path / "val"),
                     "--out", str(tmp_path / "knn.json"), "--device", "cpu", "k=5"]) == 0
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["k"] == 5 and result["top1"] > 99.0
