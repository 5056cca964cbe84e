"""The authors' reference checkpoint, imported into our model, reproduces every golden tensor and loss."""
import json

import numpy as np
import pytest
import torch

from conftest import fixture_dir
from lease.checkpoints import CheckpointError, import_reference, read_state_dict
from lease.configs import LossConfig
from lease.masking import plan_from_permutation


@pytest.fixture(scope="module")
def reference():
    root = fixture_dir("LEASE_REFERENCE_FIXTURE", "lease_reference_tiny")
    meta = json.loads((root / "meta.json").read_text())
    golden = torch.load(root / "golden.pt", map_location="cpu", weights_only=True)
    return root, meta, golden


def _import(root, meta, checkpoint=None, **kwargs):
    loss = LossConfig(label_smoothing=meta["label_smoothing"], contrast_weight=meta["contrast_weight"],
                      contrast_tau=meta["contrast_tau"], num_neighbours=meta["neighbors"],
                      neighbour_tau=meta["neighbor_tau"])
    model, _ = import_reference(checkpoint or root / "reference_state_dict.pt", root / "codebook.npy",
                                vocab_gen=meta["vq_codes"], num_heads=meta["num_heads"],
                                decoder_num_heads=meta["decoder_num_heads"], cls_token_id=meta["cls_token_id"],
                                mask_token_id=meta["mask_token_id"], loss_cfg=loss, **kwargs)
    return model.eval()


@pytest.fixture(scope="module")
def model(reference):
    root, meta, _ = reference
    return _import(root, meta)


def _plan(golden, meta):
    dropped = int(golden["dropped"][0].sum())
    return plan_from_permutation(golden["perm"], dropped, int(golden["num_masked"]))


def test_reference_config_read_from_shapes(model, reference):
    _, meta, _ = reference
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.decoder_embed_dim, cfg.decoder_depth) == (
        meta["embed_dim"], meta["depth"], meta["decoder_embed_dim"], meta["decoder_depth"])
    assert cfg.vocab_size == meta["vocab_size"] and model.codebook_size == meta["codebook_K"]


@torch.no_grad()
def test_reference_encoder_full_sequence(model, reference):
    _, _, golden = reference
    out = model.forward_encoder_full(golden["vq_tokens"])
    assert (out - golden["enc_full"]).abs().max() <= 1e-4


@torch.no_grad()
def test_reference_masks_from_permutation(reference):
    _, meta, golden = reference
    plan = _plan(golden, meta)
    assert torch.equal(plan.keep_idx, golden["keep_idx_sorted"])
    assert torch.equal(plan.masked, golden["masked"])
    assert plan.keep_idx.shape[1] == meta["kept"]


@torch.no_grad()
def test_reference_encoder_kept_tokens(model, reference):
    _, meta, golden = reference
    out = model.forward_encoder(golden["vq_tokens"], _plan(golden, meta))
    assert (out - golden["enc_masked"]).abs().max() <= 1e-4


@torch.no_grad()
def test_reference_decoder_code_logits(model, reference):
    _, meta, golden = reference
    plan = _plan(golden, meta)
    latent = model.forward_encoder(golden["vq_tokens"], plan)
    logits = model.mlm_logits(model.forward_decoder(latent, plan.keep_idx, ~plan.keep_masked))
    assert logits.shape == golden["logits_codes"].shape
    assert (logits - golden["logits_codes"]).abs().max() <= 1e-4


@torch.no_grad()
def test_reference_losses(model, reference):
    _, meta, golden = reference
    out = model(golden["vq_tokens"], golden["disc_tokens"], _plan(golden, meta))
    for name, ours in (("rec_loss", out.rec_loss), ("contrast_loss", out.contrast_loss), ("total_loss", out.loss)):
        assert abs(ours.item() - golden[name].item()) <= 1e-5 * abs(golden[name].item()), name


@pytest.mark.parametrize("wrap", ["model_key", "module_prefix"])
def test_reference_wrapped_checkpoints(reference, tmp_path, wrap):
    root, meta, golden = reference
    sd = read_state_dict(root / "reference_state_dict.pt")
    obj = {"model": sd} if wrap == "model_key" else {f"module.{k}": v for k, v in sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = _import(root, meta, checkpoint=path)
    with torch.no_grad():
        out = model.forward_encoder_full(golden["vq_tokens"])
    assert (out - golden["enc_full"]).abs().max() <= 1e-4


def test_reference_missing_key_is_named(reference, tmp_path):
    root, meta, _ = reference
    sd = read_state_dict(root / "reference_state_dict.pt")
    del sd["decoder_norm.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="decoder_norm.weight"):
        _import(root, meta, checkpoint=tmp_path / "broken.pt")


def test_reference_codebook_dim_mismatch(reference, tmp_path):
    root, meta, _ = reference
    wrong = np.zeros((meta["codebook_K"], meta["codebook_dim"] + 3), dtype=np.float32)
    np.save(tmp_path / "cb.npy", wrong)
    with pytest.raises(CheckpointError, match="codebook dim mismatch"):
        import_reference(root / "reference_state_dict.pt", tmp_path / "cb.npy", vocab_gen=meta["vq_codes"],
                         num_heads=meta["num_heads"], decoder_num_heads=meta["decoder_num_heads"])


def test_reference_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_state_dict(tmp_path / "x.pt")
