"""DINOv2 patch features: HF and timm loaders (timm + Meta layouts) agree and match direct computations."""
import json

import pytest
import torch

from benchmarks.tokenizers import time_dinov2_features
from lease.tokenizers.dinov2 import Dinov2LoadError, block_index, load_dinov2, load_hf_dinov2, load_timm_dinov2
from lease.tokenizers.tiny import save_tiny_hf_dinov2, save_tiny_timm_dinov2, tiny_hf_dinov2

DEPTH, WIDTH, REGISTERS = 4, 128, 4


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    return {"hf": save_tiny_hf_dinov2(root / "hf", seed=0),
            "meta": save_tiny_timm_dinov2(root / "meta.pth", seed=0),
            "timm": save_tiny_timm_dinov2(root / "timm.safetensors", seed=0, layout="timm"),
            "hf_noreg": save_tiny_hf_dinov2(root / "hf_noreg", seed=0, registers=0),
            "meta_noreg": save_tiny_timm_dinov2(root / "meta_noreg.pth", seed=0, registers=0)}


def test_block_index_counts_like_python_lists():
    assert block_index(-3, 12) == 9 and block_index(-1, 12) == 11 and block_index(0, 12) == 0
    with pytest.raises(ValueError, match="out of range"):
        block_index(12, 12)
    with pytest.raises(ValueError, match="out of range"):
        block_index(-13, 12)


@pytest.mark.parametrize("suffix", ["", "_noreg"])
def test_hf_and_timm_give_the_same_features(saved, images, suffix):
    hf = load_hf_dinov2(saved["hf" + suffix])
    meta = load_timm_dinov2(saved["meta" + suffix])
    expected = hf(images)
    assert expected.shape == (2, 256, WIDTH) and expected.dtype == torch.float32
    assert hf.block == DEPTH - 3 == meta.block
    torch.testing.assert_close(meta(images), expected, atol=1e-5, rtol=1e-5)
    if not suffix:
        torch.testing.assert_close(load_timm_dinov2(saved["timm"])(images), expected, atol=1e-5, rtol=1e-5)


def test_hf_features_are_pre_norm_block_outputs_without_prefix_tokens(saved, images):
    """Against HF's own API: hidden_states[b + 1] is block b's output; last_hidden_state has the final norm."""
    hf = load_hf_dinov2(saved["hf"], layer=-1)
    normalised = (images - hf.mean) / hf.std
    with torch.no_grad():
        out = hf.model(pixel_values=normalised, output_hidden_states=True)
    prefix = 1 + REGISTERS
    torch.testing.assert_close(hf(images), out.hidden_states[DEPTH][:, prefix:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hf(images), out.last_hidden_state[:, prefix:], atol=1e-2)
    for layer in (0, -3):
        feats = load_hf_dinov2(saved["hf"], layer=layer)(images)
        torch.testing.assert_close(feats, out.hidden_states[block_index(layer, DEPTH) + 1][:, prefix:],
                                   atol=1e-5, rtol=1e-5)


def test_timm_last_layer_plus_final_norm_is_forward_features(saved, images):
    """Against timm's own API: norm(features of the last block) == forward_features minus prefix tokens."""
    feats = load_timm_dinov2(saved["meta"], layer=-1)
    normalised = (images - feats.mean) / feats.std
    with torch.no_grad():
        full = feats.model.forward_features(normalised)
        expected = full[:, feats.model.num_prefix_tokens:]
        torch.testing.assert_close(feats.model.norm(feats(images)), expected, atol=1e-5, rtol=1e-5)
    assert feats.model.num_prefix_tokens == 1 + REGISTERS


@pytest.mark.parametrize("registers", [4, 0])
def test_position_grid_resampling_agrees_between_hf_and_timm(tmp_path, images, registers):
    """A 518-px checkpoint (37x37 positions) used at 224: HF resamples per call, timm at load, alike."""
    hf = load_hf_dinov2(save_tiny_hf_dinov2(tmp_path / "hf518", seed=1, image_size=518, registers=registers))
    timm_feats = load_timm_dinov2(save_tiny_timm_dinov2(tmp_path / "meta518.pth", seed=1, image_size=518,
                                                        registers=registers))
    assert timm_feats.model.pos_embed.shape[1] == 256 + (0 if registers else 1)
    torch.testing.assert_close(timm_feats(images), hf(images), atol=1e-4, rtol=1e-4)


def test_tiny_dinov2_is_deterministic_for_a_seed():
    a, b, c = (tiny_hf_dinov2(seed).state_dict() for seed in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embeddings.cls_token"], c["embeddings.cls_token"])


def test_dinov2_input_and_loading_errors(tmp_path, saved, images):
    feats = load_dinov2("hf", saved["hf"])
    with pytest.raises(ValueError, match="224x224"):
        feats(torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError, match="divide uint8"):
        feats(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out of range"):
        load_hf_dinov2(saved["hf"], layer=DEPTH)
    with pytest.raises(Dinov2LoadError, match="no config.json"):
        load_hf_dinov2(tmp_path)
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(Dinov2LoadError, match="'vit'"):
        load_hf_dinov2(tmp_path / "vit")
    with pytest.raises(Dinov2LoadError, match="do not exist"):
        load_timm_dinov2(tmp_path / "missing.pth")
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vq.pth")
    with pytest.raises(Dinov2LoadError, match="not a DINOv2 ViT"):
        load_timm_dinov2(tmp_path / "vq.pth")
    with pytest.raises(ValueError, match="unknown DINOv2 backend"):
        load_dinov2("jax", saved["hf"])


def test_dinov2_bench_helper(saved):
    result = time_dinov2_features(load_hf_dinov2(saved["hf"]), batch_size=2, warmup=1, steps=2)
    assert result["images_per_s"] > 0 and result["block"] == DEPTH - 3 and result["backend"] == "hf"
