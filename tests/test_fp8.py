"""model.matmul_dtype=fp8 (lease/kernels_fp8.py): torchao's Float8Linear in the blocks only, trained
losses and gradients near bf16's. Needs torchao and a GPU with FP8 matrix units (skipped otherwise)."""
import pytest
import torch

from lease.configs import model_config
from lease.masking import random_plan
from lease.model import LeaseModel

pytest.importorskip("torchao")
fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs a GPU with FP8 matrix units (sm89+)")


def test_fp8_swaps_only_the_blocks_linears_and_keeps_the_state_dict_keys():
    cfg = model_config("tiny", codebook_dim=32)
    fp8 = LeaseModel(model_config("tiny", codebook_dim=32, matmul_dtype="fp8"))
    swapped = {n for n, m in fp8.named_modules() if type(m).__name__ == "Float8Linear"}
    linears = {n for n, m in LeaseModel(cfg).named_modules() if isinstance(m, torch.nn.Linear)}
    assert swapped == {n for n in linears if "blocks." in n}
    assert fp8.state_dict().keys() == LeaseModel(cfg).state_dict().keys()


@fp8_gpu
def test_cuda_fp8_step_stays_near_bf16():
    """One compiled step at ViT-B widths (two blocks each side), dropout off: fp8's loss within 1 % of
    bf16's from the same weights, every gradient finite and within 15 % (e4m3 keeps 3 mantissa bits)."""
    torch.manual_seed(0)
    codebook = torch.randn(256, 32)
    models = {}
    for dtype in ("bf16", "fp8"):
        cfg = model_config("vit_base", dropout=0.0, attn_dropout=0.0, codebook_dim=32, depth=2, decoder_depth=2,
                           matmul_dtype=dtype)
        models[dtype] = LeaseModel(cfg).cuda()
        models[dtype].set_codebook(codebook)
    models["fp8"].load_state_dict(models["bf16"].state_dict())
    gen = torch.Generator(device="cuda").manual_seed(1)
    cfg = models["bf16"].cfg
    tokens = torch.randint(0, cfg.vocab_gen, (16, cfg.seq_len), device="cuda", generator=gen)
    disc = torch.randint(0, 256, (16, cfg.seq_len), device="cuda", generator=gen)
    plan = random_plan(16, cfg.seq_len, cfg.seq_len // 2, cfg.seq_len * 3 // 4, torch.device("cuda"), gen, 16)
    losses, grads = {}, {}
    for dtype, model in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = torch.compile(model)(tokens, disc, plan)
        out.loss.backward()
        losses[dtype] = float(out.loss)
        grads[dtype] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert losses["fp8"] == pytest.approx(losses["bf16"], rel=1e-2)
    for name, g in grads["bf16"].items():
        assert torch.isfinite(grads["fp8"][name]).all(), name
        assert float((grads["fp8"][name] - g).norm() / g.norm().clamp_min(1e-12)) < 0.15, name
