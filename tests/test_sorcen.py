"""The authors' Sorcen checkpoint, imported into our model, reproduces every golden tensor and loss of
the fixture (`$LEASE_SORCEN_FIXTURE`, default ../shared/fixtures/sorcen_reference_tiny) with its random
choices injected; and the echo's own invariants."""
import json

import pytest
import torch

from conftest import fixture_dir
from lease.checkpoints import CheckpointError, authors_key, import_reference, read_state_dict
from lease.configs import AUTHORS_EMA_EPOCHS, LossConfig
from lease.losses import info_nce_logits, reconstruction_loss
from lease.masking import EchoPlan, plan_from_permutation, random_echo_plan
from lease.sorcen import echo_support, ema_beta, square_mask

ATOL, RTOL_LOSS = 1e-4, 1e-5


@pytest.fixture(scope="module")
def sorcen():
    root = fixture_dir("LEASE_SORCEN_FIXTURE", "sorcen_reference_tiny")
    meta = json.loads((root / "meta.json").read_text())
    return root, meta, torch.load(root / "golden.pt", map_location="cpu", weights_only=True)


def _import(root, meta, checkpoint=None, method="sorcen"):
    loss = LossConfig(label_smoothing=meta["label_smoothing"], echo_tau=meta["nnclr_temperature"],
                      echo_weight=meta["nnclr_weight"], uniformity_weight=meta["uniformity_weight"],
                      echo_top_k=meta["echo_top_k"])
    model, report = import_reference(checkpoint or root / "reference_state_dict.pt", method=method,
                                     vocab_gen=meta["vq_codes"], num_heads=meta["num_heads"],
                                     decoder_num_heads=meta["decoder_num_heads"],
                                     cls_token_id=meta["cls_token_id"], mask_token_id=meta["mask_token_id"],
                                     loss_cfg=loss)
    return model.eval(), report


@pytest.fixture(scope="module")
def model(sorcen):
    root, meta, _ = sorcen
    return _import(root, meta)[0]


def _plan(golden):
    return plan_from_permutation(golden["perm"], golden["num_dropped"], golden["num_masked"])


def _noise_for(values, ids, sampled):
    """Uniforms that make the inverse-CDF draw over (values, ids) return `sampled`: each one the middle
    of its category's CDF interval (how the golden draw is injected into the real sampler)."""
    cdf = values.softmax(dim=-1).cumsum(dim=-1)
    slot = (ids == sampled.unsqueeze(-1)).float().argmax(dim=-1, keepdim=True)
    upper = cdf.gather(-1, slot)
    lower = torch.where(slot > 0, cdf.gather(-1, (slot - 1).clamp_min(0)), torch.zeros_like(upper))
    return ((lower + upper) / 2).squeeze(-1)


@pytest.fixture(scope="module")
def replay(model, sorcen):
    """One training forward, step by step through the model's own methods, golden choices injected."""
    _, meta, golden = sorcen
    with torch.no_grad():
        plan = _plan(golden)
        latent = model.forward_encoder(golden["vq_tokens"], plan)
        logits = model.mlm_logits(model.forward_decoder(latent, plan.keep_idx, ~plan.keep_masked))
        values, ids = echo_support(logits[:, 1:], model.loss_cfg.echo_top_k)
        plan.echo = EchoPlan(side=torch.tensor(golden["echo_crop"]), top=golden["echo_top"],
                             left=golden["echo_left"], noise=_noise_for(values, ids, golden["echo_sampled"]),
                             from_truth=False)
        echo = model.echo_tokens(logits[:, 1:], golden["vq_tokens"], plan.echo)
        out = model(golden["vq_tokens"], None, plan, golden["labels"])
    return dict(plan=plan, latent=latent, logits=logits, ids=ids, echo=echo, out=out)


def _close(ours, theirs, name):
    assert ours.shape == theirs.shape, name
    assert (ours - theirs).abs().max() <= ATOL, name


def _loss_close(ours, theirs, name):
    assert abs(float(ours) - float(theirs)) <= RTOL_LOSS * abs(float(theirs)), name


def test_sorcen_config_read_from_shapes(model, sorcen):
    _, meta, _ = sorcen
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.vocab_size) == (
        meta["embed_dim"], meta["depth"], meta["decoder_embed_dim"], meta["decoder_depth"], meta["vocab_size"])
    assert [cfg.embed_dim, cfg.projector_hidden, cfg.projector_dim] == meta["projector"]
    assert [cfg.projector_dim, cfg.predictor_hidden, cfg.projector_dim] == meta["predictor"]
    assert cfg.echo_contrast and not cfg.pos_embed_2d and cfg.decoder_canvas == "latent"


@torch.no_grad()
def test_sorcen_encoder_masks_and_decoder(model, sorcen, replay):
    _, _, golden = sorcen
    _close(model.forward_encoder_full(golden["vq_tokens"]), golden["enc_full"], "enc_full")
    plan = replay["plan"]
    assert torch.equal(plan.masked, golden["masked"])
    assert torch.equal(torch.ones_like(plan.masked).scatter(1, plan.keep_idx, False), golden["dropped"])
    _close(replay["latent"], golden["latent"], "latent")
    _close(replay["logits"], golden["logits_codes"], "logits_codes")
    rec = reconstruction_loss(replay["logits"][:, 1:], golden["vq_tokens"], plan.masked, 0.1)
    _loss_close(rec, golden["rec_ce_loss"], "rec_ce_loss")


def test_sorcen_echo_support_sample_and_square(model, sorcen, replay):
    _, _, golden = sorcen
    allowed = torch.zeros_like(golden["echo_allowed"]).scatter(-1, replay["ids"], True)
    logits = replay["logits"][:, 1:]
    differ = allowed != golden["echo_allowed"]
    if differ.any():  # only where the k-th largest logit ties with the next one
        kth = logits.masked_fill(~golden["echo_allowed"], float("inf")).amin(-1, keepdim=True)
        assert (logits == kth)[differ].all()
    assert torch.equal(replay["echo"], golden["echo_tokens"])


@torch.no_grad()
def test_sorcen_teacher_projector_predictor(model, sorcen, replay):
    _, _, golden = sorcen
    teacher = model.forward_encoder_full(golden["echo_tokens"], blocks=model.teacher_blocks)
    _close(teacher, golden["teacher_latent"], "teacher_latent")
    _close(model.forward_teacher(golden["echo_tokens"]), golden["teacher_proj"], "teacher_proj")
    student = model.predictor(model.projector(replay["latent"][:, 1:].mean(dim=1)))
    _close(student, golden["student_pred"], "student_pred")
    logits, targets = info_nce_logits(golden["teacher_proj"], golden["student_pred"], model.loss_cfg.echo_tau)
    _close(logits, golden["nnclr_logits"], "nnclr_logits")
    assert torch.equal(targets, torch.arange(len(targets)))


def test_sorcen_losses(sorcen, replay):
    _, _, golden = sorcen
    out = replay["out"]
    _loss_close(out.rec_loss, golden["rec_ce_loss"], "rec_ce_loss")
    _loss_close(out.uniformity_loss, golden["uniformity_loss"], "uniformity_loss")
    _loss_close(out.rec_loss + out.uniformity_loss, golden["rec_loss"], "rec_loss")
    _loss_close(out.contrast_loss, golden["nnclr_loss"], "nnclr_loss")
    _loss_close(out.classifier_loss, golden["classifier_loss"], "classifier_loss")
    _loss_close(out.backward_loss(), golden["total_loss"], "total_loss")


def test_sorcen_ema_step(sorcen):
    root, meta, golden = sorcen
    model, _ = _import(root, meta)  # its own copy: the step changes the teacher
    beta = ema_beta(golden["ema_epoch"], meta["ema_base"], AUTHORS_EMA_EPOCHS)
    assert beta == pytest.approx(golden["ema_beta"], abs=1e-12)
    model.ema_update(beta)
    ours = model.state_dict()
    for key, value in golden["teacher_after_ema"].items():
        _close(ours[authors_key(key)].float(), value.float(), key)


def test_sorcen_import_lists_unused_keys_in_one_line(sorcen, caplog):
    root, meta, _ = sorcen
    _, report = _import(root, meta)
    assert set(report.ignored) == {k for k in read_state_dict(root / "reference_state_dict.pt")
                                   if k.startswith(("patch_embed.", "decoder_pred.")) or k in (
                                       "cls_token", "mask_token", "pos_embed", "decoder_pos_embed",
                                       "token_emb.position_ids")}
    lines = [r.getMessage() for r in caplog.records if "unused keys" in r.getMessage()]
    assert len(lines) == 1 and all(k in lines[0] for k in report.ignored)


def test_sorcen_missing_key_is_named(sorcen, tmp_path):
    root, meta, _ = sorcen
    sd = read_state_dict(root / "reference_state_dict.pt")
    del sd["momentum_projector.projector.3.bias"], sd["decoder_norm.bias"]
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"decoder_norm.bias.*momentum_projector.projector.3.bias"):
        _import(root, meta, checkpoint=tmp_path / "broken.pth")


def test_mage_import_is_sorcen_without_the_echo_branch(sorcen, tmp_path):
    """LTH14/mage's layout: Sorcen's keys without teacher, projectors and predictor; same encoder."""
    root, meta, golden = sorcen
    sd = {k: v for k, v in read_state_dict(root / "reference_state_dict.pt").items()
          if not k.startswith(("blocks_momentum.", "momentum_projector.", "projector.", "predictor."))}
    torch.save(sd, tmp_path / "mage.pth")
    model, report = _import(root, meta, checkpoint=tmp_path / "mage.pth", method="mage")
    assert not model.cfg.echo_contrast and not hasattr(model, "teacher_blocks")
    with torch.no_grad():
        _close(model.forward_encoder_full(golden["vq_tokens"]), golden["enc_full"], "enc_full")


def test_sorcen_echo_support_is_the_top_k_without_the_maximum():
    logits = torch.randn(3, 5, 40)
    logits[0, 0, [4, 9]] = logits[0, 0].max() + 1  # a tied maximum: both removed
    values, ids = echo_support(logits, 15)
    for row, chosen in zip(logits.reshape(-1, 40), ids.reshape(-1, 15)):
        peak = row.max()
        expected = set(torch.where(row < peak, row, -float("inf")).topk(15).indices.tolist())
        assert set(chosen.tolist()) == expected and (row[chosen] < peak).all()
    assert (values.diff(dim=-1) <= 0).all()


def test_sorcen_echo_draws_follow_the_softmax_of_the_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 30).expand(20000, 1, 30)
    values, ids = echo_support(logits, 5)
    plan = random_echo_plan(20000, 1, 1, 1, torch.device("cpu"), torch.Generator().manual_seed(1))
    from lease.sorcen import sample_support
    draws = sample_support(values, ids, plan.noise)
    freq = torch.bincount(draws.flatten(), minlength=30).float() / draws.numel()
    assert torch.allclose(freq[ids[0, 0]], values[0, 0].softmax(-1), atol=0.015)
    assert freq.sum() == pytest.approx(freq[ids[0, 0]].sum())


@pytest.mark.parametrize("side", [8, 11, 16])
def test_sorcen_square_keeps_side_squared_tokens(side):
    grid = 16
    plan = random_echo_plan(64, grid, side, side, torch.device("cpu"), torch.Generator().manual_seed(side))
    inside = square_mask(grid, plan.side, plan.top, plan.left)
    assert (inside.sum(1) == side * side).all()
    cells = inside.view(64, grid, grid)
    rows, cols = cells.any(2), cells.any(1)
    assert (rows.sum(1) == side).all() and (cols.sum(1) == side).all()  # one contiguous s×s block
    assert torch.equal(rows.float().argmax(1), plan.top) and torch.equal(cols.float().argmax(1), plan.left)
    assert (plan.top <= grid - side).all() and (plan.left <= grid - side).all()


@pytest.mark.parametrize("method", ["sorcen", "mage"])
def test_sorcen_import_reference_command(sorcen, tmp_path, method, caplog):
    """`lease import-reference --method sorcen|mage` writes one of our checkpoints; no codebook needed."""
    from lease.checkpoints import model_from_checkpoint
    from lease.cli import main

    root, meta, golden = sorcen
    assert main(["import-reference", str(root / "reference_state_dict.pt"), "--method", method,
                 "--out", str(tmp_path / "imported.pt"), "--vocab-gen", str(meta["vq_codes"]),
                 "--num-heads", str(meta["num_heads"]), "--decoder-num-heads", str(meta["decoder_num_heads"])]) == 0
    model = model_from_checkpoint(tmp_path / "imported.pt").eval()
    assert model.cfg.echo_contrast == (method == "sorcen") and model.cfg.cls_token_id == meta["cls_token_id"]
    with torch.no_grad():
        _close(model.forward_encoder_full(golden["vq_tokens"]), golden["enc_full"], "enc_full")
    assert sum("unused keys" in r.getMessage() for r in caplog.records) == 1
