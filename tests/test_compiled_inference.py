"""The compiled inference paths on a GPU, at the real networks' widths: no further from fp32 than eager.

Inductor can compile wrong numbers without an error (README: its comprehensive padding once made the
[CLS] row's gradients 150 % off). The tokenizers and the MaskGIT sampler run compiled on CUDA by
default, and their outputs feed every later stage, so each is checked here with random weights at
MaskGIT's VQGAN width, DINOv2-B/14's and LEASE ViT-B's. Compiled and eager bf16 both differ from an
fp32 run (bf16 rounding, fused differently); the compiled error may be at most twice the eager one.
A miscompiled kernel gives errors of order 1, as it did for the [CLS] row.
"""
import pytest
import torch

from lease.configs import model_config
from lease.model import LeaseModel
from benchmarks.tokenizers import DINOV2_B14_SIZES, full_width_maskgit_config, random_maskgit_tokenizer
from lease.tokenizers.dinov2 import load_hf_dinov2
from lease.tokenizers.tiny import save_tiny_hf_dinov2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def assert_compiled_as_close_as_eager(compiled: float, eager: float, what: str) -> None:
    """`compiled` and `eager`: the two bf16 runs' errors against fp32."""
    assert compiled <= 2 * eager + 1e-3, f"{what}: compiled is {compiled:.4f} from fp32, eager bf16 {eager:.4f}"


def fp32_reference():
    """No TF32 in the reference's convolutions and matmuls."""
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)


def random_images(batch: int, size: int) -> torch.Tensor:
    """Smooth random images (upsampled noise), closer to photographs than per-pixel noise."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, size // 16, size // 16, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def test_cuda_compiled_vqgan_encode_and_decode_match_eager():
    cfg = full_width_maskgit_config()
    eager = random_maskgit_tokenizer(cfg, "cuda", torch.bfloat16, compile=False)
    compiled = eager.reconfigured(compile=True)
    exact = random_maskgit_tokenizer(cfg, "cuda", torch.float32, compile=False)  # the same seed: same weights
    images = random_images(8, eager.image_size)
    with fp32_reference():
        codes = exact.encode(images)
        decoded = exact.decode_unclamped(codes)
    mismatch = {name: float((tok.encode(images) != codes).float().mean()) for name, tok in
                (("compiled", compiled), ("eager", eager))}
    assert_compiled_as_close_as_eager(mismatch["compiled"], mismatch["eager"], "VQGAN codes (fraction differing)")
    assert_compiled_as_close_as_eager(relative_error(compiled.decode_unclamped(codes), decoded),
                                      relative_error(eager.decode_unclamped(codes), decoded), "VQGAN decode")


def test_cuda_compiled_dinov2_features_match_eager(tmp_path):
    path = save_tiny_hf_dinov2(tmp_path / "dinov2", **DINOV2_B14_SIZES)
    eager = load_hf_dinov2(path, device="cuda")
    exact = load_hf_dinov2(path, device="cuda", dtype=torch.float32)
    images = random_images(16, eager.image_size)
    with fp32_reference():
        want = exact(images)
    assert_compiled_as_close_as_eager(relative_error(eager.reconfigured(compile=True)(images), want),
                                      relative_error(eager(images), want), "DINOv2 features")


def test_cuda_compiled_code_logits_match_eager():
    """What `MaskGitSampler` compiles: the model's code logits with a masked canvas, under bf16 autocast."""
    torch.manual_seed(0)
    cfg = model_config("vit_base", contrast_on="none")  # the code logits need no codebook
    model = LeaseModel(cfg).cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_gen, (16, cfg.seq_len), device="cuda", generator=gen)
    masked = torch.rand(16, cfg.seq_len, device="cuda", generator=gen) < 0.6
    with torch.inference_mode():
        want = model.code_logits(tokens, masked)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = model.code_logits(tokens, masked)
            compiled = torch.compile(model.code_logits, dynamic=False)(tokens, masked)
    assert_compiled_as_close_as_eager(relative_error(compiled, want), relative_error(eager, want), "code logits")


def test_cuda_compiled_probe_features_match_eager():
    """What the online probes compile: ViT-B's `mean_ln` features (pre-norm patch mean, unit LayerNorm),
    at two batch sizes (the second compiles the dynamic-shape graph few-shot subsets use)."""
    from lease.evaluate.features import encoder_features
    from lease.evaluate.protocols import compiled_encoder_features

    torch.manual_seed(0)
    cfg = model_config("vit_base", contrast_on="none")
    model = LeaseModel(cfg).cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    for batch in (16, 12):
        tokens = torch.randint(0, cfg.vocab_gen, (batch, cfg.seq_len), device="cuda", generator=gen)
        with torch.inference_mode():
            want = encoder_features(model, tokens, "mean_ln")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                eager = encoder_features(model, tokens, "mean_ln")
                compiled = compiled_encoder_features()(model, tokens, "mean_ln")
        assert compiled.shape == (batch, cfg.embed_dim)
        assert_compiled_as_close_as_eager(relative_error(compiled, want), relative_error(eager, want),
                                          f"probe features, batch {batch}")
