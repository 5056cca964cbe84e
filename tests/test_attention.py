"""Attention with the [CLS] row and column apart (lease/attention.py) against SDPA.

On the CPU the fused kernel is PyTorch's CPU flash kernel (no dropout there): fp64 gradcheck of the
log-sum-exp merge and its backward (the kernel's backward given the whole row's log-sum-exp and output),
and agreement with SDPA. On a GPU (cuDNN, bf16,
the ViT-B shapes) against an fp64 reference, and with dropout through identities that hold for any
fixed masks only if the backward uses the forward's masks. Also on a GPU: the trainer's compile
options against the inductor bug they avoid, and whole-model gradients, compiled as the trainer
compiles, against eager SDPA and the math kernel.
"""
import pytest
import torch
import torch.nn.functional as F

from lease.attention import split_cls_attention
from lease.configs import MaskConfig, model_config
from lease.masking import random_plan
from lease.model import LeaseModel
from lease.train import compile_for_training

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qkv_views(b: int, n: int, h: int, d: int, dtype=torch.float64, device="cpu", seed: int = 0,
              heavy_cls: bool = False):
    """q, k, v as [B, H, N, D] views of one packed [B, N, 3, H, D] leaf, as the model's projection gives.

    `heavy_cls`: every query shares a component that the [CLS] key matches, s₀ ≈ 6 ≈ log N, so that
    key takes about half of each row's weight."""
    gen = torch.Generator(device=device).manual_seed(seed)
    packed = torch.randn(b, n, 3, h, d, dtype=dtype, device=device, generator=gen)
    if heavy_cls:
        packed[:, :, 0, :, 0] += 4.0
        packed[:, 0, 1, :, 0] = 1.5 * d ** 0.5
    packed.requires_grad_()
    return packed, unpack_qkv(packed)


def unpack_qkv(packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, N, D] as views of a packed [B, N, 3, H, D] tensor."""
    return packed.permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("q_has_cls, m, heavy_cls", [(True, 17, False), (False, 6, False), (True, 17, True)])
def test_split_attention_gradients_pass_gradcheck_in_fp64(q_has_cls, m, heavy_cls):
    packed, (q, k, v) = qkv_views(2, 17, 3, 8, heavy_cls=heavy_cls)
    queries = q if q_has_cls else q[:, :, 1:1 + m]
    fn = lambda qq, kk, vv: split_cls_attention(qq, kk, vv, 0.0, q_has_cls)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (queries, k, v))


def test_split_attention_matches_sdpa_outputs_and_gradients():
    packed, (q, k, v) = qkv_views(3, 33, 4, 16, dtype=torch.float32)
    grad = torch.randn(3, 4, 33, 16)
    ours = split_cls_attention(q, k, v, 0.0)
    (g_ours,) = torch.autograd.grad(ours, packed, grad)
    ref = F.scaled_dot_product_attention(q, k, v)
    (g_ref,) = torch.autograd.grad(ref, packed, grad)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_split_attention_merges_a_dominant_cls_key_exactly():
    """A [CLS] key far above the others takes all the weight: output = v₀ for every query."""
    _, (q, k, v) = qkv_views(1, 9, 2, 4)
    q, k = q.detach().clone(), k.detach().clone()
    q[...] = 1.0
    k[:, :, 0] = 100.0
    out = split_cls_attention(q, k, v.detach(), 0.0)
    assert torch.allclose(out, v[:, :, :1].detach().expand_as(out), atol=1e-12)


def test_split_attention_refuses_dropout_on_the_cpu():
    _, (q, k, v) = qkv_views(1, 9, 2, 4)
    with pytest.raises(ValueError, match="CPU.*dropout"):
        split_cls_attention(q, k, v, 0.1)


@cuda
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("h, n, d", [(12, 129, 64), (16, 257, 48)])  # ViT-B encoder and decoder
def test_cuda_split_attention_matches_fp64_reference_in_bf16(h, n, d, compiled):
    """q, k, v as views of one packed projection, as the model has them: the layout in which torch 2.11's
    compiled gradient of the [CLS] row's earlier form went wrong (lease.attention._single_query)."""
    packed, (q, k, v) = qkv_views(4, n, h, d, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn(4, h, n, d, device="cuda", dtype=torch.bfloat16)
    fn = compile_for_training(split_cls_attention, "default", dynamic=False) if compiled else split_cls_attention
    out = fn(q, k, v, 0.0)
    (g_out,) = torch.autograd.grad(out, packed, grad)
    ref_packed = packed.detach().double().requires_grad_()
    ref = F.scaled_dot_product_attention(*unpack_qkv(ref_packed))
    (g_ref,) = torch.autograd.grad(ref, ref_packed, grad.double())
    for got, want in ((out, ref), (g_out, g_ref)):
        assert float((got.detach().double() - want).abs().max() / want.abs().max()) < 0.02


def summed_cls_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The [CLS] query's row as q times k summed over the head dimension (split_cls's earlier form)."""
    scores = (q[:, :, 0, None].float() * k.float()).sum(-1) * q.shape[-1] ** -0.5
    return (scores.softmax(-1)[..., None] * v.float()).sum(2).to(v.dtype)


@cuda
@pytest.mark.parametrize("h, n, d", [(12, 129, 64), (16, 257, 48)])
def test_cuda_training_compile_options_keep_padded_reductions_right(h, n, d):
    """Compiled by torch 2.11 with inductor's comprehensive padding on, this row's gradient here came
    out about 110 % off fp64 on an H100 (1.5 or NaN in cls_row_compiled.py's layouts): a fused
    reduction read an unpadded buffer with the padded stride. The trainer compiles with that pass off
    (lease.train.TRAINING_INDUCTOR_OPTIONS)."""
    packed, (q, k, v) = qkv_views(8, n, h, d, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn(8, h, d, device="cuda", dtype=torch.bfloat16)
    compiled = compile_for_training(summed_cls_row, "default", dynamic=False)
    (got,) = torch.autograd.grad(compiled(q, k, v), packed, grad)
    ref_packed = packed.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(summed_cls_row(*unpack_qkv(ref_packed)), ref_packed, grad.double())
    assert float((got.double() - want).norm() / want.norm()) < 0.02


@cuda
@pytest.mark.parametrize("heavy_cls", [False, True])
@pytest.mark.parametrize("h, n, d", [(12, 129, 64), (16, 257, 48)])
def test_cuda_split_attention_dropout_backward_uses_the_forward_masks(h, n, d, heavy_cls):
    """For any fixed dropout masks O = P̃V, so with the output gradient G = O, ⟨dV, V⟩ = ‖O‖², a sum
    of squares that no draw brings near 0. With another draw's masks in the backward, ⟨P̃'V, P̃V⟩
    falls short of ‖P̃V‖² by about the dropout's variance: checked here too, so the test can fail.
    Without `heavy_cls` the weight is spread over the patch keys (the kernel's masks matter); with
    it the [CLS] key takes about half of every row (its own keep factor matters)."""
    torch.manual_seed(0)
    _, (q, k, v) = qkv_views(8, n, h, d, dtype=torch.bfloat16, device="cuda", heavy_cls=heavy_cls)
    dot = lambda a, b: float((a.detach().double() * b.detach().double()).sum())  # noqa: E731
    out = split_cls_attention(q, k, v, 0.1)
    (dv,) = torch.autograd.grad(out, v, out.detach())
    assert dot(dv, v) == pytest.approx(dot(out, out), rel=0.01)
    (dv_other_masks,) = torch.autograd.grad(split_cls_attention(q, k, v, 0.1), v, out.detach())
    assert abs(dot(dv_other_masks, v) / dot(out, out) - 1) > 0.03
    # the masks do drop: the same call without dropout differs
    assert not torch.allclose(out, split_cls_attention(q, k, v, 0.0))


@cuda
@pytest.mark.parametrize("q_has_cls", [True, False])
def test_cuda_split_attention_drops_the_cls_column_at_rate_p(q_has_cls):
    """With every value but the [CLS] key's zero, each output row is that key's probability times its
    keep factor alone: 0 in a fraction p of the rows, 1/(1 − p) × the undropped output in the rest."""
    _, (q, k, v) = qkv_views(8, 129, 12, 64, dtype=torch.bfloat16, device="cuda")
    queries = q if q_has_cls else q[:, :, 1:]
    v = torch.zeros_like(v)
    v[:, :, 0] = 1.0
    with torch.no_grad():
        kept = split_cls_attention(queries, k, v, 0.0, q_has_cls)[..., 0].float()
        ratio = split_cls_attention(queries, k, v, 0.1, q_has_cls)[..., 0].float() / kept
    dropped = ratio < 0.5
    assert float(dropped.float().mean()) == pytest.approx(0.1, abs=0.015)  # ~12,300 rows: σ ≈ 0.003
    assert torch.allclose(ratio[~dropped], torch.full_like(ratio[~dropped], 1 / 0.9), rtol=0.02)
    assert float(ratio[dropped].abs().max()) == 0.0


@cuda
def test_cuda_split_attention_dropout_is_unbiased():
    """The average output over many dropout draws approaches the output without dropout."""
    _, (q, k, v) = qkv_views(2, 129, 4, 64, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        mean = sum(split_cls_attention(q, k, v, 0.1).float() for _ in range(400)) / 400
        ref = split_cls_attention(q, k, v, 0.0).float()
    assert float((mean - ref).abs().max()) < 0.05 * float(ref.abs().max())


def one_training_step(cfg, codebook_size: int, compiled: bool, autocast_dtype: torch.dtype | None,
                      batch: int = 8):
    """Loss and parameter gradients of one step of a fresh model (seed 0, a random codebook) on the GPU,
    compiled as the trainer compiles it when `compiled`, on `batch` fixed random images with half their
    tokens dropped and three quarters masked."""
    torch.manual_seed(0)
    model = LeaseModel(cfg).cuda().train()
    model.set_codebook(torch.randn(codebook_size, cfg.codebook_dim))
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_gen, (batch, cfg.seq_len), device="cuda", generator=gen)
    disc = torch.randint(0, codebook_size, (batch, cfg.seq_len), device="cuda", generator=gen)
    plan = random_plan(batch, cfg.seq_len, cfg.seq_len // 2, cfg.seq_len * 3 // 4, torch.device("cuda"), gen,
                       MaskConfig().decode_rows_multiple)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = (compile_for_training(model, "default") if compiled else model)(tokens, disc, plan)
    out.loss.backward()
    return out.loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@cuda
def test_cuda_compiled_model_with_split_attention_gives_sdpa_losses_and_gradients():
    """Whole model, dropout off, bf16 autocast: the compiled split_cls step against eager SDPA."""
    losses, grads = {}, {}
    for backend in ("sdpa", "split_cls"):
        cfg = model_config("tiny", attention_backend=backend, dropout=0.0, attn_dropout=0.0, codebook_dim=32)
        losses[backend], grads[backend] = one_training_step(cfg, 64, compiled=backend == "split_cls",
                                                            autocast_dtype=torch.bfloat16)
    assert torch.allclose(losses["split_cls"], losses["sdpa"], rtol=2e-3)
    assert grads["split_cls"].keys() == grads["sdpa"].keys()
    for name, g in grads["sdpa"].items():
        assert float((grads["split_cls"][name] - g).norm() / g.norm().clamp_min(1e-12)) < 0.03, name


@cuda
@pytest.mark.parametrize("batch", [8, 128])
def test_cuda_model_gradients_through_cudnn_attention_match_the_math_kernel_eager_then_compiled(batch):
    """The whole model's gradients with SDPA pinned to cuDNN, in bf16, eager and then compiled in the
    same process, against the math kernel in fp32. PyTorch caches cuDNN backward graphs by the q, k, v
    layouts alone, each built for the output-gradient strides of its first call; a compiled step
    handing its attention a gradient in another layout than the eager step did would reuse the eager
    graph and get wrong gradients (benchmarks/exploratory/cudnn_grad_layout.py shows that on SDPA).
    At batch 128 (33K decoder tokens) inductor's backward reductions run over as many rows as in
    training, where it may pick other kernels (its mix-order reductions, for one, apply only to large
    ones); every parameter's gradient is checked, so one left unwritten shows."""
    def gradients(kernel: str, compiled: bool, autocast_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        cfg = model_config("vit_base", dropout=0.0, attn_dropout=0.0, sdpa_kernel=kernel, codebook_dim=32,
                           depth=2, decoder_depth=2)  # ViT-B's attention shapes, two blocks each side
        return one_training_step(cfg, 256, compiled, autocast_dtype, batch)[1]

    exact = gradients("math", compiled=False, autocast_dtype=None)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    for compiled in (False, True):
        got = gradients("cudnn", compiled, torch.bfloat16)
        assert float((flat(got) - flat(exact)).norm() / flat(exact).norm()) < 0.03, f"compiled={compiled}"
        for name, g in exact.items():
            error = float((got[name] - g).norm() / g.norm().clamp_min(1e-12))
            assert error < 0.2, f"compiled={compiled}: {name} off by {error:.2f}"
