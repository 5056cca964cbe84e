"""MaskGIT VQGAN (MAGE layout): fixture golden outputs, size inference, nearest-code search, loading errors."""
import json

import pytest
import torch

from conftest import fixture_dir
from lease.tokenizers import codes_to_uint16, load_vqgan
from benchmarks.tokenizers import time_vqgan_encode
from lease.tokenizers.tiny import save_tiny_maskgit_vqgan, save_tiny_taming_vqgan
from lease.tokenizers.vqgan_maskgit import (MaskGITTokenizer, VQGANCheckpointError, infer_config, load_maskgit_vqgan,
                                            nearest_code, read_vqgan_state_dict)


@pytest.fixture(scope="module")
def vqgan_fixture():
    path = fixture_dir("LEASE_VQGAN_FIXTURE", "vqgan_maskgit_tiny")
    golden = torch.load(path / "golden.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    ckpt = next(path.glob("*.ckpt"))
    return ckpt, golden, meta


@pytest.fixture(scope="module")
def fixture_tokenizer(vqgan_fixture):
    return load_vqgan("maskgit", vqgan_fixture[0], device="cpu")


def test_vqgan_fixture_golden_indices(vqgan_fixture, fixture_tokenizer):
    _, golden, _ = vqgan_fixture
    codes = fixture_tokenizer.encode(golden["images"])
    assert codes.dtype == torch.int64 and codes.shape == golden["indices"].shape
    assert (codes == golden["indices"]).float().mean().item() >= 0.99


def test_vqgan_fixture_golden_decode(vqgan_fixture, fixture_tokenizer):
    _, golden, _ = vqgan_fixture
    raw = fixture_tokenizer.decode_unclamped(golden["indices"])
    assert raw.shape == golden["decoded"].shape
    assert (raw - golden["decoded"]).abs().max().item() <= 1e-4
    images = fixture_tokenizer.decode(golden["indices"])
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, golden["decoded"].clamp(0, 1), atol=1e-4, rtol=0)


def test_vqgan_infer_config_reads_sizes_from_weights(vqgan_fixture, fixture_tokenizer):
    _, _, meta = vqgan_fixture
    cfg = infer_config(read_vqgan_state_dict(vqgan_fixture[0]))
    dd = meta["ddconfig"]
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks) == (dd["ch"], dd["ch_mult"], dd["num_res_blocks"])
    assert (cfg.n_embed, cfg.embed_dim, cfg.z_channels) == (meta["n_embed"], meta["embed_dim"], dd["z_channels"])
    assert fixture_tokenizer.num_codes == meta["n_embed"] and fixture_tokenizer.grid_size == 16
    assert fixture_tokenizer.image_size == 256


def test_vqgan_other_sizes_round_trip(tmp_path):
    """Nothing assumes the fixture's sizes: another width, depth, code count and block count load."""
    path = save_tiny_maskgit_vqgan(tmp_path / "v.ckpt", seed=3, n_embed=100, ch=64, ch_mult=(1, 2, 2),
                                   num_res_blocks=3, z_channels=8, resolution=64)
    model = load_maskgit_vqgan(path)
    assert (model.cfg.ch, model.cfg.ch_mult, model.cfg.num_res_blocks, model.cfg.n_embed) == (64, [1, 2, 2], 3, 100)
    tok = MaskGITTokenizer(model)
    codes = tok.encode(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert codes.shape == (2, 16, 16) and 0 <= codes.min() and codes.max() < 100
    assert codes.unique().numel() > 5, "random codebook should spread codes"
    assert tok.decode(codes).shape == (2, 3, 64, 64)


def test_vqgan_tiny_checkpoint_is_deterministic(tmp_path):
    a = read_vqgan_state_dict(save_tiny_maskgit_vqgan(tmp_path / "a.ckpt", seed=1))
    b = read_vqgan_state_dict(save_tiny_maskgit_vqgan(tmp_path / "b.ckpt", seed=1))
    c = read_vqgan_state_dict(save_tiny_maskgit_vqgan(tmp_path / "c.ckpt", seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv_in.weight"], c["encoder.conv_in.weight"])
    assert infer_config(a).grid_size == 16 and infer_config(a).resolution == 256


def test_vqgan_nearest_code_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    z, book = torch.randn(3, 8, 5, 4, generator=gen), torch.randn(50, 8, generator=gen)
    brute = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8), book).argmin(1).view(3, 5, 4)
    assert torch.equal(nearest_code(z, book), brute)
    assert torch.equal(nearest_code(z.bfloat16(), book), nearest_code(z.bfloat16().float(), book))


def test_vqgan_bf16_encode_mostly_agrees(vqgan_fixture, fixture_tokenizer):
    _, golden, _ = vqgan_fixture
    bf16 = MaskGITTokenizer(load_maskgit_vqgan(vqgan_fixture[0]), dtype=torch.bfloat16)
    codes = bf16.encode(golden["images"][:1])
    assert codes.dtype == torch.int64
    assert (codes == golden["indices"][:1]).float().mean().item() >= 0.8
    assert bf16.decode(golden["indices"][:1]).dtype == torch.float32


def test_vqgan_loading_errors(tmp_path, vqgan_fixture):
    with pytest.raises(VQGANCheckpointError, match="does not exist"):
        load_maskgit_vqgan(tmp_path / "nope.ckpt")
    ckpt, _ = save_tiny_taming_vqgan(tmp_path / "taming", seed=0)
    with pytest.raises(VQGANCheckpointError, match="taming"):
        load_maskgit_vqgan(ckpt)
    lease_ref = fixture_dir("LEASE_REFERENCE_FIXTURE", "lease_reference_tiny") / "reference_state_dict.pt"
    with pytest.raises(VQGANCheckpointError, match="LEASE"):
        load_maskgit_vqgan(lease_ref)
    sd = read_vqgan_state_dict(vqgan_fixture[0])
    del sd["decoder.up.1.upsample.conv.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "broken.ckpt")
    with pytest.raises(VQGANCheckpointError, match=r"1 missing .*upsample.*1 unexpected .*extra"):
        load_maskgit_vqgan(tmp_path / "broken.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(VQGANCheckpointError, match="not a readable torch checkpoint"):
        load_maskgit_vqgan(tmp_path / "text.ckpt")
    with pytest.raises(ValueError, match="unknown VQGAN kind"):
        load_vqgan("vqvae", vqgan_fixture[0])


def test_vqgan_input_checks(fixture_tokenizer):
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        fixture_tokenizer.encode(torch.rand(3, 256, 256))
    with pytest.raises(ValueError, match="divide uint8"):
        fixture_tokenizer.encode(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples"):
        fixture_tokenizer.encode(torch.rand(1, 3, 250, 256))
    with pytest.raises(ValueError, match="integer codes"):
        fixture_tokenizer.decode(torch.zeros(1, 16, 16))


def test_codes_to_uint16_checks_range():
    codes = torch.tensor([[[0, 1023]]])
    out = codes_to_uint16(codes, 1024)
    assert out.dtype == torch.uint16 and out.to(torch.int64).tolist() == [[[0, 1023]]]
    with pytest.raises(ValueError, match="outside"):
        codes_to_uint16(torch.tensor([[[1024]]]), 1024)
    with pytest.raises(ValueError, match="outside"):
        codes_to_uint16(torch.tensor([[[-1]]]), 1024)
    with pytest.raises(ValueError, match="uint16"):
        codes_to_uint16(codes, 70000)


def test_vqgan_bench_helper_reports_throughput(fixture_tokenizer):
    result = time_vqgan_encode(fixture_tokenizer, batch_size=2, warmup=1, steps=2)
    assert result["images_per_s"] > 0 and result["median_ms_per_step"] > 0
    assert result["num_codes"] == fixture_tokenizer.num_codes and result["dtype"] == "float32"


def test_vqgan_channels_last_group_norm_matches_torch():
    """The compiled path's channels-last statistics give F.group_norm's numbers (fp32 and bf16 inputs)."""
    from lease.tokenizers.vqgan_maskgit import channels_last_group_norm

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(128, generator=gen), torch.randn(128, generator=gen)
    x = torch.randn(2, 128, 12, 12, generator=gen) * 3 + 5
    expected = torch.nn.functional.group_norm(x, 32, weight, bias, 1e-6)
    got = channels_last_group_norm(x.contiguous(memory_format=torch.channels_last), 32, weight, bias, 1e-6)
    assert torch.allclose(got, expected, atol=1e-5)
    half = channels_last_group_norm(x.bfloat16().contiguous(memory_format=torch.channels_last), 32, weight, bias,
                                    1e-6)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), expected, atol=0.1)
