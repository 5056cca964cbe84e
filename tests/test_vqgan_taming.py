"""taming-transformers VQGAN backend: a tiny random VQModel saved as a Lightning .ckpt + YAML round-trips."""
import pytest
import torch
import yaml

from lease.tokenizers import load_vqgan
from lease.tokenizers.tiny import save_tiny_maskgit_vqgan, save_tiny_taming_vqgan
from lease.tokenizers.vqgan_maskgit import VQGANCheckpointError
from lease.tokenizers.vqgan_taming import DUMMY_LOSS, import_taming_vqmodel, load_taming_vqgan


@pytest.fixture(scope="module")
def taming_files(tmp_path_factory):
    return save_tiny_taming_vqgan(tmp_path_factory.mktemp("taming"), seed=0)


@pytest.fixture(scope="module")
def direct_model(taming_files):
    """The same checkpoint loaded the way taming itself does (VQModel + init_from_ckpt), independently."""
    ckpt, config = taming_files
    params = yaml.safe_load(config.read_text())["model"]["params"]
    params.update(lossconfig=DUMMY_LOSS)
    model = import_taming_vqmodel()(**params)
    model.init_from_ckpt(str(ckpt), ignore_keys=["loss"])
    return model.eval()


def test_vqgan_taming_codes_match_taming_model(taming_files, direct_model):
    tok = load_vqgan("taming", *taming_files)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    codes = tok.encode(images)
    with torch.no_grad():
        _, _, (_, _, expected) = direct_model.encode(images * 2 - 1)  # taming's input range is [-1, 1]
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.int64
    assert torch.equal(codes.flatten(), expected.flatten())
    assert codes.unique().numel() > 5


def test_vqgan_taming_decode_matches_and_is_in_range(taming_files, direct_model):
    tok = load_vqgan("taming", *taming_files)
    codes = torch.randint(0, tok.num_codes, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = direct_model.decode(direct_model.quantize.get_codebook_entry(codes.flatten(), (2, 16, 16, 16)))
    raw = tok.decode_unclamped(codes)
    # Same weights and ops; only the convolution kernels' summation order differs (input memory layout).
    torch.testing.assert_close(raw, (expected + 1) / 2, atol=1e-4, rtol=0)
    images = tok.decode(codes)
    assert images.shape == (2, 3, 256, 256) and images.min() >= 0 and images.max() <= 1
    assert (tok.num_codes, tok.grid_size, tok.image_size) == (64, 16, 256)


def test_vqgan_taming_checkpoint_is_deterministic(tmp_path, taming_files):
    ckpt, _ = save_tiny_taming_vqgan(tmp_path, seed=0)
    a = torch.load(ckpt, weights_only=True)["state_dict"]
    b = torch.load(taming_files[0], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("loss.") for k in a), "real Lightning checkpoints carry the loss tensors"


def test_vqgan_taming_loading_errors(tmp_path, taming_files):
    ckpt, config = taming_files
    with pytest.raises(ValueError, match="needs the model's YAML config"):
        load_vqgan("taming", ckpt)
    with pytest.raises(VQGANCheckpointError, match="does not exist"):
        load_taming_vqgan(tmp_path / "missing.ckpt", config)
    maskgit = save_tiny_maskgit_vqgan(tmp_path / "m.ckpt", seed=0)
    with pytest.raises(VQGANCheckpointError, match="kind='maskgit'"):
        load_taming_vqgan(maskgit, config)
    other = yaml.safe_load(config.read_text())
    other["model"]["target"] = "taming.models.vqgan.GumbelVQ"
    (tmp_path / "gumbel.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(VQGANCheckpointError, match="GumbelVQ"):
        load_taming_vqgan(ckpt, tmp_path / "gumbel.yaml")
    wider = yaml.safe_load(config.read_text())
    wider["model"]["params"]["n_embed"] = 128
    (tmp_path / "wider.yaml").write_text(yaml.safe_dump(wider))
    with pytest.raises(VQGANCheckpointError, match="shape mismatches.*quantize.embedding"):
        load_taming_vqgan(ckpt, tmp_path / "wider.yaml")
