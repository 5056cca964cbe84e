"""Masking law and counts, and the two losses' invariants."""
import math

import pytest
import torch
import torch.nn.functional as F

from lease.codebook import neighbour_table
from lease.configs import LossConfig, MaskConfig, ModelConfig, train_config, with_model
from lease.losses import codebook_contrast_loss, reconstruction_loss
from lease.masking import MaskRatioSampler, num_dropped_tokens, num_masked_tokens, random_plan
from lease.model import LeaseModel
from lease.typed_config import ConfigError


def test_mask_ratio_law():
    sampler = MaskRatioSampler(MaskConfig(), seed=0)
    r = sampler.sample(200_000)
    assert r.min() >= 0.5 and r.max() <= 1.0
    assert abs(r.mean().item() - 0.69) < 0.01
    assert abs(r.mean().item() - sampler.mean()) < 0.003
    phi = lambda x: 0.5 * (1 + math.erf((x - 0.55) / 0.25 / math.sqrt(2)))  # noqa: E731
    for x in (0.55, 0.6, 0.7, 0.8, 0.9):  # empirical CDF = truncated-normal CDF
        expected = (phi(x) - phi(0.5)) / (phi(1.0) - phi(0.5))
        assert (r <= x).double().mean().item() == pytest.approx(expected, abs=0.005)


def test_mask_ratio_is_seeded():
    assert torch.equal(MaskRatioSampler(MaskConfig(), seed=4).sample(5), MaskRatioSampler(MaskConfig(), seed=4).sample(5))


@pytest.mark.parametrize("ratio", [0.5, 0.55, 0.7, 0.999, 1.0])
def test_plan_counts_and_nesting(ratio):
    seq = 256
    num_dropped = num_dropped_tokens(seq, MaskConfig())
    num_masked = num_masked_tokens(seq, ratio)
    plan = random_plan(8, seq, num_dropped, num_masked, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert num_dropped == 128 and num_masked == math.ceil(seq * ratio)
    assert plan.keep_idx.shape == (8, 128)
    assert (plan.keep_idx.diff(dim=1) > 0).all()  # grid order, no duplicates
    assert (plan.masked.sum(1) == num_masked).all()
    dropped = torch.ones(8, seq, dtype=torch.bool).scatter(1, plan.keep_idx, False)
    assert (plan.masked | ~dropped).all() and (dropped <= plan.masked).all()  # dropped ⊆ masked
    assert (plan.keep_masked.sum(1) == num_masked - num_dropped).all()
    assert torch.equal(plan.decode_idx.sort(dim=1).values, plan.decode_idx)
    assert torch.equal(torch.zeros(8, seq, dtype=torch.bool).scatter(1, plan.decode_idx, True), plan.masked)
    padded = random_plan(8, seq, num_dropped, num_masked, torch.device("cpu"), torch.Generator().manual_seed(0),
                         decode_rows_multiple=16)
    rows = padded.decode_idx
    assert rows.shape[1] == min(seq, 16 * math.ceil(num_masked / 16)) and (rows.diff(dim=1) > 0).all()
    assert (padded.masked.gather(1, rows).sum(1) == num_masked).all()  # every masked position is decoded
    num_unmasked = seq - num_masked
    for p, multiple in ((plan, 1), (padded, 16)):  # contrast rows: every kept unmasked token, then padding
        rows = p.contrast_idx
        assert rows.shape[1] == min(p.keep_idx.shape[1], max(1, math.ceil(num_unmasked / multiple)) * multiple)
        scored = ~p.keep_masked.gather(1, rows)
        assert (scored.sum(1) == num_unmasked).all() and scored[:, :num_unmasked].all()
        assert (rows[:, :num_unmasked].diff(dim=1) > 0).all()  # grid order, no duplicates


def test_reconstruction_loss_touches_only_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 10, requires_grad=True)
    targets = torch.randint(0, 10, (2, 16))
    masked = torch.rand(2, 16) < 0.5
    loss = reconstruction_loss(logits, targets, masked, 0.1)
    loss.backward()
    assert torch.all(logits.grad[~masked] == 0) and torch.any(logits.grad[masked] != 0)
    changed = targets.clone()
    changed[~masked] = (changed[~masked] + 1) % 10
    assert torch.equal(loss, reconstruction_loss(logits, changed, masked, 0.1))
    expected = F.cross_entropy(logits[masked], targets[masked], label_smoothing=0.1)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_neighbour_weights_sum_to_one_true_centroid_first():
    centroids = torch.randn(50, 8)
    centroids[7] = centroids[3]  # an exact duplicate must not displace the centroid itself
    table = neighbour_table(centroids, 5, chunk=16)
    assert torch.equal(table.index[:, 0], torch.arange(50))
    w = table.weights(0.1)
    assert torch.allclose(w.sum(-1), torch.ones(50))
    assert (w[:, 0] >= w[:, 1:].max(-1).values - 1e-6).all()
    unit = F.normalize(centroids, dim=-1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2.0)
    assert torch.allclose(table.similarity[:, 1:], sims.topk(5, dim=-1).values, atol=1e-5)


def test_contrast_loss_matches_explicit_formula():
    torch.manual_seed(1)
    codebook = F.normalize(torch.randn(20, 6), dim=-1)
    table = neighbour_table(codebook, 3)
    ids = torch.randint(0, 20, (2, 5))
    feats = torch.randn(2, 5, 6)
    weight = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    w = table.weights(0.1)
    loss = codebook_contrast_loss(feats, codebook, table.index[ids], w[ids], 0.1, weight)
    logp = torch.log_softmax(F.normalize(feats, dim=-1) @ codebook.T / 0.1, dim=-1)
    per = -(w[ids] * logp.gather(-1, table.index[ids])).sum(-1)
    assert torch.allclose(loss, per[weight].mean(), atol=1e-5)


def test_contrast_only_on_kept_unmasked_tokens():
    """Changing the codebook id of a masked (or dropped) token leaves the contrast loss unchanged."""
    torch.manual_seed(2)
    cfg = ModelConfig(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2, vocab_gen=32, grid_size=4, codebook_dim=8, dropout=0.0, attn_dropout=0.0)
    model = LeaseModel(cfg, LossConfig(num_neighbours=2)).eval()
    model.set_codebook(torch.randn(10, 8))
    tokens, disc = torch.randint(0, 32, (3, 16)), torch.randint(0, 10, (3, 16))
    plan = random_plan(3, 16, 8, 11, torch.device("cpu"), torch.Generator().manual_seed(0))
    base = model(tokens, disc, plan).contrast_loss
    altered = torch.where(plan.masked, (disc + 1) % 10, disc)
    assert torch.allclose(base, model(tokens, altered, plan).contrast_loss)
    visible = ~plan.masked
    altered = torch.where(visible, (disc + 1) % 10, disc)
    assert not torch.allclose(base, model(tokens, altered, plan).contrast_loss)


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="model.embed_dimm"):
        train_config({"preset": "tiny", "model": {"embed_dimm": 3}})
    with pytest.raises(ConfigError, match="batch_size"):
        train_config({"preset": "tiny", "batch_size": "many"})
    with pytest.raises(ConfigError, match="preset"):
        train_config({"preset": "vit_huge"})
    with pytest.raises(ConfigError, match="contrast_on"):
        train_config({"model": {"contrast_on": "everywhere"}})


@pytest.mark.parametrize("placement", ["none", "encoder", "decoder", "both"])
def test_ablation_switches(placement):
    cfg = ModelConfig(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2, vocab_gen=32, grid_size=4, codebook_dim=8, contrast_on=placement)
    model = LeaseModel(cfg)
    model.set_codebook(torch.randn(10, 8))
    tokens, disc = torch.randint(0, 32, (2, 16)), torch.randint(0, 10, (2, 16))
    plan = random_plan(2, 16, 8, 12, torch.device("cpu"))
    out = model(tokens, disc, plan)
    assert (out.contrast_loss == 0) == (placement == "none")
    assert (model.proj_to_dino is not None) == (placement in ("encoder", "both"))
    assert (model.dec_to_dino is not None) == (placement in ("decoder", "both"))
    out.loss.backward()


def test_monitoring_classifier_trains_apart_from_the_objective():
    """`loss` stays eq. 5 with the classifier on; the classifier learns only its own head (detached input)."""
    cfg = ModelConfig(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2, vocab_gen=32, grid_size=4, codebook_dim=8, num_classes=3)
    model = LeaseModel(cfg)
    model.set_codebook(torch.randn(10, 8))
    tokens, disc, labels = torch.randint(0, 32, (4, 16)), torch.randint(0, 10, (4, 16)), torch.tensor([0, 1, 2, 0])
    plan = random_plan(4, 16, 8, 12, torch.device("cpu"))
    out = model(tokens, disc, plan, labels)
    assert torch.allclose(out.loss, out.rec_loss + model.loss_cfg.contrast_weight * out.contrast_loss)
    out.classifier_loss.backward()
    assert model.online_classifier.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is None
    assert torch.allclose(out.backward_loss(), out.loss + out.classifier_loss)


def test_decoding_masked_positions_only_gives_the_same_losses_and_gradients():
    """`decode_masked_only` (the last decoder block at masked positions alone) is exact, not an approximation."""
    cfg = ModelConfig(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=2,
                      decoder_num_heads=2, vocab_gen=32, grid_size=4, codebook_dim=8, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(3)
    tokens, disc = torch.randint(0, 32, (3, 16)), torch.randint(0, 10, (3, 16))
    plan = random_plan(3, 16, 8, 11, torch.device("cpu"), torch.Generator().manual_seed(0), decode_rows_multiple=4)
    assert plan.decode_idx.shape[1] == 12  # one unmasked, unscored row decoded per image
    runs = []
    for masked_only in (True, False):
        torch.manual_seed(4)
        model = LeaseModel(with_model(cfg, decode_masked_only=masked_only), LossConfig(num_neighbours=2))
        model.set_codebook(torch.randn(10, 8))
        out = model(tokens, disc, plan)
        out.loss.backward()
        assert model.decodes_masked_only == masked_only
        runs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (full, full_grads) = runs
    assert torch.allclose(fast.rec_loss, full.rec_loss, atol=1e-6) and torch.equal(fast.contrast_loss, full.contrast_loss)
    assert fast_grads.keys() == full_grads.keys()
    for name in full_grads:
        assert torch.allclose(fast_grads[name], full_grads[name], atol=1e-6), name
    dc = LeaseModel(with_model(cfg, contrast_on="both"))
    assert not dc.decodes_masked_only  # the decoder contrast reads every position


def test_contrast_on_the_plans_rows_equals_the_weighted_loss_over_every_kept_token():
    """Scoring only `contrast_idx` (unmasked kept rows + padding) is eq. 4 over all kept rows with the
    masked ones weighted 0: same loss, same gradient to the encoder output."""
    cfg = ModelConfig(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2, vocab_gen=32, grid_size=4, codebook_dim=8)
    model = LeaseModel(cfg, LossConfig(num_neighbours=2))
    model.set_codebook(torch.randn(10, 8))
    disc = torch.randint(0, 10, (3, 16))
    for num_masked, multiple in ((11, 1), (11, 4), (9, 4), (16, 4)):
        plan = random_plan(3, 16, 8, num_masked, torch.device("cpu"), torch.Generator().manual_seed(1),
                           decode_rows_multiple=multiple)
        latent = torch.randn(3, 9, 16, requires_grad=True)
        fast = model.contrast_loss(latent, None, disc, plan)
        grad_fast, = torch.autograd.grad(fast, latent)
        kept_ids = disc.gather(1, plan.keep_idx)
        full = codebook_contrast_loss(model.proj_to_dino(latent[:, 1:]), model.codebook_unit,
                                      model.neighbour_index[kept_ids], model.neighbour_weight[kept_ids],
                                      model.loss_cfg.contrast_tau, ~plan.keep_masked)
        grad_full, = torch.autograd.grad(full, latent)
        assert torch.allclose(fast, full, atol=1e-6) and torch.allclose(grad_fast, grad_full, atol=1e-7)
        assert (fast != 0) == (num_masked < 16)  # everything masked: nothing scored


def _losses_and_block_dtypes(residual_dtype: str, autocast: bool):
    """Losses, gradients and the dtypes of every block's output for one seeded tiny model and batch."""
    cfg = ModelConfig(embed_dim=16, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=2,
                      decoder_num_heads=2, vocab_gen=32, grid_size=4, codebook_dim=8, dropout=0.0,
                      attn_dropout=0.0, residual_dtype=residual_dtype)
    torch.manual_seed(5)
    model = LeaseModel(cfg, LossConfig(num_neighbours=2))
    model.set_codebook(torch.randn(10, 8))
    tokens, disc = torch.randint(0, 32, (3, 16)), torch.randint(0, 10, (3, 16))
    plan = random_plan(3, 16, 8, 11, torch.device("cpu"), torch.Generator().manual_seed(0))
    dtypes = []
    for block in [*model.blocks, *model.decoder_blocks]:
        block.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(tokens, disc, plan)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out, grads, dtypes


def test_residual_dtype_autocast_rounds_only_the_residual_stream():
    """residual_dtype="autocast": under bf16 autocast every block hands on a bf16 stream (the default
    keeps fp32, as the authors' code); the losses and gradients stay those of the fp32 stream up to
    bf16 rounding; without autocast the switch changes nothing at all."""
    exact, exact_grads, exact_dtypes = _losses_and_block_dtypes("fp32", autocast=True)
    low, low_grads, low_dtypes = _losses_and_block_dtypes("autocast", autocast=True)
    assert set(exact_dtypes) == {torch.float32} and set(low_dtypes) == {torch.bfloat16}
    assert len(low_dtypes) == 4
    assert torch.allclose(low.loss, exact.loss, rtol=2e-2)
    assert F.cosine_similarity(low_grads, exact_grads, dim=0) > 0.99
    assert not torch.equal(low_grads, exact_grads)  # the rounding is real
    plain, plain_grads, _ = _losses_and_block_dtypes("fp32", autocast=False)
    same, same_grads, _ = _losses_and_block_dtypes("autocast", autocast=False)
    assert torch.equal(plain.loss, same.loss) and torch.equal(plain_grads, same_grads)


@pytest.mark.parametrize("placement", ["decoder_authors", "both_authors"])
def test_authors_decoder_contrast_is_hard_ce_on_masked_positions(placement):
    """The authors' DC: cross-entropy to each masked token's own centroid over the K centroids (τ), the
    unmasked positions not scored; "both_authors" adds it to the EC (0.1 · EC + 0.1 · DC in the total)."""
    cfg = ModelConfig(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2, vocab_gen=32, grid_size=4, codebook_dim=8, dropout=0.0,
                      attn_dropout=0.0, contrast_on=placement)
    torch.manual_seed(6)
    centroids = torch.randn(10, 8)
    model = LeaseModel(cfg, LossConfig(num_neighbours=2)).eval()
    model.set_codebook(centroids)

    def same_weights(contrast_on):
        other = LeaseModel(with_model(cfg, contrast_on=contrast_on), LossConfig(num_neighbours=2)).eval()
        other.set_codebook(centroids)
        other.load_state_dict(model.state_dict(), strict=False)
        return other

    tokens, disc = torch.randint(0, 32, (3, 16)), torch.randint(0, 10, (3, 16))
    plan = random_plan(3, 16, 8, 11, torch.device("cpu"), torch.Generator().manual_seed(0))
    latent = model.forward_encoder(tokens, plan)
    hidden = model.forward_decoder(latent, plan.keep_idx, ~plan.keep_masked)
    z = F.normalize(model.dec_to_dino(hidden[:, 1:]), dim=-1)
    logits = z @ model.codebook_unit.T / model.loss_cfg.contrast_tau
    expected = F.cross_entropy(logits[plan.masked], disc[plan.masked])
    if placement == "both_authors":
        expected = expected + same_weights("encoder").contrast_loss(latent, hidden, disc, plan)
    assert torch.allclose(model.contrast_loss(latent, hidden, disc, plan), expected, atol=1e-5)
    dc_only = same_weights("decoder_authors")
    altered = torch.where(plan.masked, disc, (disc + 1) % 10)  # unmasked ids do not count in the DC
    assert torch.equal(dc_only.contrast_loss(latent, hidden, disc, plan),
                       dc_only.contrast_loss(latent, hidden, altered, plan))
    out = model(tokens, disc, plan)
    assert torch.allclose(out.loss, out.rec_loss + 0.1 * out.contrast_loss)
