"""The authors' probe feature (MAE's global pool) on the LEASE reference fixture, computed by hand."""
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from conftest import fixture_dir
from lease.checkpoints import import_reference, read_state_dict
from lease.evaluate.features import encoder_features, extract_features


@pytest.fixture(scope="module")
def reference():
    root = fixture_dir("LEASE_REFERENCE_FIXTURE", "lease_reference_tiny")
    meta = json.loads((root / "meta.json").read_text())
    golden = torch.load(root / "golden.pt", map_location="cpu", weights_only=True)
    model, _ = import_reference(root / "reference_state_dict.pt", root / "codebook.npy", vocab_gen=meta["vq_codes"],
                                num_heads=meta["num_heads"], decoder_num_heads=meta["decoder_num_heads"],
                                cls_token_id=meta["cls_token_id"], mask_token_id=meta["mask_token_id"])
    return read_state_dict(root / "reference_state_dict.pt"), meta, golden, model.eval()


def prenorm_by_hand(sd: dict, meta: dict, ids: torch.Tensor) -> torch.Tensor:
    """The authors' encoder from their state dict: BERT embedding (+ 2-D sin-cos on patches), timm blocks."""
    dim, eps = meta["embed_dim"], meta["ln_eps"]
    ids = torch.cat([torch.full_like(ids[:, :1], meta["cls_token_id"]), ids], dim=1)
    x = sd["token_emb.word_embeddings.weight"][ids] + sd["token_emb.position_embeddings.weight"][:ids.shape[1]]
    x = F.layer_norm(x, (dim,), sd["token_emb.LayerNorm.weight"], sd["token_emb.LayerNorm.bias"], eps)
    x[:, 1:] += sd["pos2d"][0]
    for i in range(meta["depth"]):
        block = Block(dim, meta["num_heads"], mlp_ratio=meta["mlp_ratio"], qkv_bias=True,
                      norm_layer=functools.partial(torch.nn.LayerNorm, eps=eps))
        prefix = f"blocks.{i}."
        block.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        x = block.eval()(x)
    return x


@torch.no_grad()
def test_probe_feature_is_a_unit_layernorm_of_the_prenorm_patch_mean(reference):
    sd, meta, golden, model = reference
    ids = golden["vq_tokens"]
    x = prenorm_by_hand(sd, meta, ids)
    # the hand-built encoder is the authors': its final norm reproduces their golden output
    post = F.layer_norm(x, (meta["embed_dim"],), sd["norm.weight"], sd["norm.bias"], meta["ln_eps"])
    assert (post - golden["enc_full"]).abs().max() <= 1e-4
    want = F.layer_norm(x[:, 1:].mean(dim=1), (meta["embed_dim"],), eps=meta["ln_eps"])
    got = encoder_features(model, ids, "mean_ln")
    assert (got - want).abs().max() <= 1e-4
    # not the post-norm mean the fast protocol uses
    assert (encoder_features(model, ids, "mean") - want).abs().max() > 1e-2
    batched = extract_features(model, ids, batch_size=3, pool="mean_ln", device="cpu", dtype="fp32")
    assert torch.allclose(batched, got, atol=1e-5)
