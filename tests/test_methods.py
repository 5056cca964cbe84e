"""The baselines in the one trainer: method presets and their checks, MAGE = LEASE at λ = 0, the echo
InfoNCE and uniformity over 2 gloo ranks = one process on the concatenated batch, and every method
training on planted tokens (Sorcen resuming exactly, teacher included)."""
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lease.checkpoints import load_checkpoint
from lease.configs import train_config
from lease.losses import info_nce_loss, uniformity_loss
from lease.masking import random_plan
from lease.train import build_model, train
from lease.typed_config import ConfigError
from lease.checkpoints import model_from_checkpoint
from lease.data import read_token_set
from test_train import CLASSES, _knn_accuracy, assert_same_state, planted, tiny_cfg  # noqa: F401 (planted: the shards fixture)


def test_method_presets_set_the_layout():
    sorcen = train_config({"preset": "tiny", "method": "sorcen"}).model
    assert (sorcen.vocab_size, sorcen.cls_token_id, sorcen.mask_token_id) == (2025, 1100, 2024)
    assert sorcen.echo_contrast and not sorcen.pos_embed_2d and sorcen.decoder_canvas == "latent"
    mage = train_config({"preset": "tiny", "method": "mage"}).model
    assert not mage.echo_contrast and mage.contrast_on == "none" and mage.decoder_canvas == "latent"
    lease = train_config({"preset": "tiny"}).model
    assert lease.pos_embed_2d and lease.decoder_canvas == "cls_plus_latent" and lease.vocab_size == 1026
    assert train_config({"preset": "tiny", "method": "sorcen", "model": {"projector_dim": 64}}).model.projector_dim == 64


@pytest.mark.parametrize("method", ["sorcen", "mage", "mage_online"])
def test_the_authors_vocabulary_follows_the_code_count(method):
    """Their layout from the tokenizer's codes V: V + 1000 + 1 rows, [CLS] V + 76, [MASK] last (the demo's 64
    codes: 1065, 140, 1064); explicit ids still win."""
    cfg = train_config({"preset": "tiny", "method": method, "model": {"vocab_gen": 64}}).model
    assert (cfg.vocab_size, cfg.cls_token_id, cfg.mask_token_id) == (1065, 140, 1064)
    cfg = train_config({"preset": "tiny", "method": method, "model": {"vocab_gen": 64, "cls_token_id": 64}}).model
    assert (cfg.vocab_size, cfg.cls_token_id, cfg.mask_token_id) == (1065, 64, 1064)
    assert train_config({"preset": "tiny", "model": {"vocab_gen": 64}}).model.vocab_size == 66


@pytest.mark.parametrize("data, key", [
    ({"method": "simclr"}, "method"),
    ({"method": "mage_online", "online": {"crop_scale": [0.5, 0.2]}}, "online.crop_scale"),
    ({"method": "mage_online", "online": {"crop_ratio": [1.2, 1.5]}}, "online.crop_ratio"),
    ({"model": {"vocab_layout": "bert"}}, "model.vocab_layout"),
    ({"method": "sorcen", "model": {"echo_contrast": False}}, "model.echo_contrast"),
    ({"method": "lease", "model": {"echo_contrast": True}}, "model.echo_contrast"),
    ({"method": "mage", "model": {"contrast_on": "encoder"}}, "model.contrast_on"),
    ({"method": "sorcen", "loss": {"echo_crop_max": 17}}, "loss.echo_crop_max"),
    ({"loss": {"echo_crop_min": 9, "echo_crop_max": 8}}, "loss.echo_crop_min"),
    ({"loss": {"echo_top_k": 0}}, "loss.echo_top_k"),
    ({"loss": {"echo_tau": 0}}, "loss.echo_tau"),
    ({"ema": {"horizon": "forever"}}, "ema.horizon"),
    ({"ema": {"base": 1.5}}, "ema.base"),
    ({"model": {"projector_hidden": 0}}, "model.projector_hidden"),
    ({"model": {"decoder_canvas": "mask_token"}}, "model.decoder_canvas"),
])
def test_bad_method_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train_config({"preset": "tiny", **data})


def test_mage_is_lease_at_lambda_zero():
    """Same layout, same weights, same masks: `mage` (no contrast at all) and `lease` with λ = 0 give
    the same loss and the same gradients."""
    layout = {"vocab_gen": 64, "grid_size": 4, "dropout": 0.0, "attn_dropout": 0.0, "pos_embed_2d": True,
              "decoder_canvas": "cls_plus_latent", "vocab_size": 66, "cls_token_id": 64, "mask_token_id": 65}
    lease_cfg = train_config({"preset": "tiny", "model": layout, "loss": {"contrast_weight": 0.0}})
    mage_cfg = train_config({"preset": "tiny", "method": "mage", "model": {**layout, "classifier_hidden": 0}})
    lease = build_model(lease_cfg, torch.randn(10, 8))
    mage = build_model(mage_cfg, None)
    mage.load_state_dict({k: v for k, v in lease.state_dict().items() if k in mage.state_dict()})
    tokens, disc = torch.randint(0, 64, (3, 16)), torch.randint(0, 10, (3, 16))
    plan = random_plan(3, 16, 8, 11, torch.device("cpu"), torch.Generator().manual_seed(0))
    outs = [model(tokens, disc, plan) for model in (lease, mage)]
    for out in outs:
        out.loss.backward()
    assert outs[0].contrast_loss > 0 and outs[1].contrast_loss == 0
    assert torch.equal(outs[0].loss, outs[1].loss)
    grads = dict(mage.named_parameters())
    for name, param in lease.named_parameters():
        if name in grads:
            assert torch.equal(param.grad, grads[name].grad), name


def _echo_terms(queries, keys, pooled):
    keys, pooled = keys.clone().requires_grad_(), pooled.clone().requires_grad_()
    nce, uniform = info_nce_loss(queries, keys, 0.3), uniformity_loss(pooled)
    (nce + uniform).backward()
    return torch.stack([nce, uniform]).detach(), keys.grad, pooled.grad


def _rank(rank, world, rendezvous, queries, keys, pooled, out):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    n = len(queries) // world
    part = slice(rank * n, (rank + 1) * n)
    torch.save(_echo_terms(queries[part], keys[part], pooled[part]), f"{out}.{rank}")
    dist.destroy_process_group()


def test_echo_losses_over_two_gloo_ranks_equal_one_process(tmp_path):
    """Each rank's student keys (and pooled latents) are gathered with their gradient, its targets offset
    by rank · n: the mean of the ranks' losses is the one-process loss on the concatenated batch, and
    each rank's gradient (DDP then averages over the 2 ranks) is 2 × the one-process one."""
    torch.manual_seed(0)
    queries, keys, pooled = torch.randn(8, 6), torch.randn(8, 6), torch.nn.functional.normalize(torch.randn(8, 5), dim=-1)
    whole, keys_grad, pooled_grad = _echo_terms(queries, keys, pooled)
    mp.spawn(_rank, args=(2, tmp_path / "rdzv", queries, keys, pooled, tmp_path / "out"), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    assert torch.allclose((ranks[0][0] + ranks[1][0]) / 2, whole, atol=1e-6)
    assert not torch.allclose(ranks[0][0], ranks[1][0])  # each rank has its own positives
    assert torch.allclose(torch.cat([r[1] for r in ranks]) / 2, keys_grad, atol=1e-6)
    assert torch.allclose(torch.cat([r[2] for r in ranks]) / 2, pooled_grad, atol=1e-6)


SORCEN_TINY = {"method": "sorcen", "loss.echo_crop_min": 3, "loss.echo_crop_max": 6, "model.projector_hidden": 64,
               "model.projector_dim": 32, "model.predictor_hidden": 64, "ema.echo_from_truth_epochs": 0.1}


@pytest.mark.parametrize("method", ["lease", "sorcen", "mage"])
def test_every_method_trains_on_planted_tokens(planted, tmp_path, method):  # noqa: F811
    """The reconstruction loss falls, below that of a uniform guess (ln V_gen): the model learns."""
    extra = SORCEN_TINY if method == "sorcen" else {"method": method} if method == "mage" else {}
    cfg = tiny_cfg(planted, **{"batch_size": 32, "max_steps": 40, "log_every": 10, "ckpt_every": 40,
                               "optim.base_lr": 0.5, "optim.warmup_epochs": 0.1, **extra})
    result = train(cfg, tmp_path / method)
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rec_loss"] < min(rows[0]["rec_loss"], math.log(cfg.model.vocab_gen)) - 0.03, rows
    assert ("uniformity_loss" in rows[0]) == (method == "sorcen")
    assert result["completed"]


def test_lease_knn_beats_mage_on_planted_tokens(planted, tmp_path):  # noqa: F811
    """Training raises k-NN above the untrained encoder's, and the codebook contrast says which codes are
    synonyms where reconstruction alone (MAGE on the same tokens) has to find out: after the same 40 steps
    LEASE's k-NN is well above MAGE's."""
    train_set, val_set = read_token_set(planted / "train"), read_token_set(planted / "val")
    torch.manual_seed(0)
    untrained = build_model(tiny_cfg(planted, method="mage"), None)
    accuracy = {"untrained": _knn_accuracy(untrained, train_set, val_set)}
    for method, extra in (("lease", {"loss.contrast_weight": 1.0}), ("mage", {"method": "mage"})):
        cfg = tiny_cfg(planted, **{"batch_size": 32, "max_steps": 40, "log_every": 40, "ckpt_every": 40,
                                   "optim.base_lr": 4e-3, **extra})
        result = train(cfg, tmp_path / method)
        accuracy[method] = _knn_accuracy(model_from_checkpoint(result["checkpoint"]), train_set, val_set)
    assert accuracy["mage"] > accuracy["untrained"] + 0.05, accuracy
    assert accuracy["lease"] > accuracy["mage"] + 0.1 and accuracy["lease"] > 5 / CLASSES, accuracy


def test_sorcen_resume_is_exact_teacher_included(planted, tmp_path):  # noqa: F811
    cfg = tiny_cfg(planted, **{"batch_size": 32, **SORCEN_TINY})
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "split", stop_after=3)
    train(cfg, tmp_path / "split", resume=True)
    assert_same_state(tmp_path / "straight", tmp_path / "split")
    state = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    assert "teacher_blocks.0.attn.qkv.weight" in state and "teacher_projector.1.running_mean" in state


@pytest.mark.parametrize("method", ["lease", "sorcen", "mage"])
def test_the_exported_encoder_computes_the_trained_models_features(tmp_path, method):
    """Every method's export (Sorcen's without its teacher) loads back into a model whose features equal
    the trained model's: the layout (vocabulary ids, 2-D sin-cos or not) travels in the config JSON."""
    from lease.checkpoints import export_encoder, load_encoder
    from safetensors.torch import load_file

    cfg = train_config({"preset": "tiny", "method": method, "model": {"vocab_gen": 64, "grid_size": 4},
                        "loss": {"echo_crop_min": 2, "echo_crop_max": 4}})
    torch.manual_seed(0)
    model = build_model(cfg, torch.randn(10, 8) if method == "lease" else None).eval()
    export_encoder(model, tmp_path / "export")
    assert not any(key.startswith("teacher") for key in load_file(tmp_path / "export" / "encoder.safetensors"))
    torch.manual_seed(1)  # other initial weights: only the export can make the features agree
    loaded = load_encoder(tmp_path / "export").eval()
    tokens = torch.randint(0, 64, (3, 16))
    assert torch.equal(loaded.features(tokens), model.features(tokens))
    assert torch.equal(loaded.features(tokens, "cls"), model.features(tokens, "cls"))


def test_the_report_names_the_method():
    from lease.evaluate.report import render_report

    from lease.evaluate.report import RunFacts

    text = render_report([], RunFacts(method="sorcen"), {}, None, [])
    assert "Pretraining method: `sorcen` (Sorcen: reconstruction + echo contrast" in text
    assert "Pretraining method" not in render_report([], RunFacts(), {}, None, [])
