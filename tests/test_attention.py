"""Attention with the [CLS] row and column apart (lease/attention.py) against SDPA.

Without a GPU the kernels run through Triton's interpreter in a subprocess (the interpreter is chosen
when a kernel is defined), with PyTorch's CPU flash kernel for the patch keys and no dropout: in fp64
against SDPA's math, through every kind of block. On a GPU (cuDNN, bf16, the ViT-B shapes) against an
fp64 reference, and with dropout through identities that hold for any fixed masks only if the backward
uses the forward's masks. Also on a GPU: the trainer's compile options against the inductor bug they
avoid, and whole-model gradients, compiled as the trainer compiles, against eager SDPA and the math
kernel.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lease.model
from lease.attention import split_cls_pays, split_cls_rows_attention, split_cls_self_attention
from lease.configs import MaskConfig, model_config
from lease.masking import random_plan
from lease.model import Attention, LeaseModel
from lease.train import compile_for_training

triton = pytest.importorskip("triton")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

AGAINST_SDPA = r"""
import json, sys
import torch
import torch.nn.functional as F
from lease.attention import split_cls_rows_attention, split_cls_self_attention

def heads(t, parts, h):
    b, n, w = t.shape
    return t.view(b, n, parts, h, w // parts // h).permute(2, 0, 3, 1, 4).unbind(0)

rel = lambda a, r: float((a.detach().double() - r).norm() / r.norm())
results = []
for mode, b, h, n, d, m, heavy_cls in json.loads(sys.argv[1]):
    torch.manual_seed(len(results))
    c = h * d
    if mode == "self":
        inputs = [torch.randn(b, n, 3 * c, dtype=torch.float64)]
        if heavy_cls:  # s0 ~ log N: the [CLS] key takes about half of every row
            inputs[0][:, :, :c].view(b, n, h, d)[..., 0] += 4.0
            inputs[0][:, 0, c:2 * c].view(b, h, d)[..., 0] = 1.5 * d ** 0.5
        m = n
    else:
        inputs = [torch.randn(b, m, c, dtype=torch.float64), torch.randn(b, n, 2 * c, dtype=torch.float64)]
    inputs = [t.requires_grad_() for t in inputs]
    grad = torch.randn(b, m, c, dtype=torch.float64)
    if mode == "self":
        out = split_cls_self_attention(inputs[0], h, 0.0)
        views = heads(inputs[0], 3, h)
    else:
        out = split_cls_rows_attention(*inputs, h, 0.0)
        views = (*heads(inputs[0], 1, h), *heads(inputs[1], 2, h))
    got = torch.autograd.grad(out, inputs, grad)
    ref = F.scaled_dot_product_attention(*views).transpose(1, 2).reshape(b, m, c)
    want = torch.autograd.grad(ref, inputs, grad)
    row = {"out": rel(out, ref), **{f"grad{i}": rel(g, w) for i, (g, w) in enumerate(zip(got, want))}}
    if mode == "self":  # the [CLS] query's row and the [CLS] key's column on their own
        row["cls_row_out"] = rel(out[:, 0], ref[:, 0])
        row["cls_row_dq"] = rel(got[0][:, 0, :c], want[0][:, 0, :c])
        row["cls_key_dk"] = rel(got[0][:, 0, c:], want[0][:, 0, c:])
    results.append(row)
json.dump(results, sys.stdout)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machines only: the GPU tests below cover the kernels "
                    "in bf16, and torch 2.11's wrap_triton refuses interpreted kernels")
def test_split_attention_and_gradients_match_sdpa_in_fp64_through_the_interpreter():
    """Self-attention over 70 tokens (two key blocks, two query-row blocks, head dim 12 padded to 16),
    once with a [CLS] key that takes half of every row's weight, and 67 query rows without [CLS]."""
    cases = [("self", 2, 3, 70, 12, None, False), ("self", 1, 2, 17, 8, None, True), ("rows", 2, 3, 70, 12, 67, False)]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", AGAINST_SDPA, json.dumps(cases)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    for case, errors in zip(cases, json.loads(run.stdout)):
        for name, error in errors.items():
            assert error < 1e-12, (case, name, error)


@pytest.mark.parametrize("head_dim, cls_query", [(48, True), (64, False)])
def test_split_kernels_compile_for_sm90(head_dim, cls_query):
    """Every kernel compiles for an H100/H200 (Triton's own ptxas, no GPU needed) with the model's types:
    what the interpreter lets through (types that change across a loop, constexpr misuse) fails here."""
    from benchmarks.sass import compile_for, split_cls_kernels, split_cls_param_type

    for kernel, consts in split_cls_kernels(head_dim, cls_query):
        compiled = compile_for(kernel, consts, split_cls_param_type, num_warps=4)
        assert compiled.asm["cubin"], kernel.fn.__name__


def test_split_attention_refuses_dropout_on_the_cpu():
    with pytest.raises(ValueError, match="CPU.*dropout"):
        split_cls_self_attention(torch.randn(1, 9, 24), 2, 0.1)


@pytest.mark.parametrize("n_keys, pays", [(257, True), (513, True), (129, False), (258, False),
                                           (256, False), (65, False)])
def test_split_cls_pays_only_at_cls_plus_whole_tiles_from_the_decoders_length(n_keys, pays):
    assert split_cls_pays(n_keys) is pays


@pytest.mark.parametrize("backend, kernel, training, n_keys, takes", [
    ("auto", "default", True, 257, True),
    ("auto", "default", False, 257, False),  # evaluation: the split was measured in training only
    ("auto", "default", True, 129, False),  # the encoder's length: no faster than cuDNN
    ("auto", "cudnn", True, 257, False),  # a pinned SDPA kernel is the user's choice
    ("sdpa", "default", True, 257, False),
    ("split_cls", "default", False, 129, True),  # chosen by name: everywhere it can run
])
def test_attention_takes_split_cls_under_auto_only_in_training_where_it_pays(monkeypatch, backend, kernel,
                                                                              training, n_keys, takes):
    monkeypatch.setattr(lease.model, "split_cls_supported", lambda x: True)  # as on a CUDA sm80+ device
    attention = Attention(64, 4, 0.1, torch.nn.Identity(), backend, kernel).train(training)
    assert attention._takes_split_cls(torch.zeros(1), n_keys) is takes


def test_auto_attention_on_the_cpu_runs_sdpa():
    """Where split_cls cannot run (the CPU), "auto" is plain SDPA, dropout included."""
    torch.manual_seed(0)
    auto = Attention(32, 4, 0.0, torch.nn.Identity(), "auto")
    sdpa = Attention(32, 4, 0.0, torch.nn.Identity(), "sdpa")
    sdpa.load_state_dict(auto.state_dict())
    x = torch.randn(2, 257, 32)
    assert torch.equal(auto(x), sdpa(x))


# ----------------------------------------------------------------------------------------- GPU only

def packed(b: int, n: int, h: int, d: int, m: int | None = None, seed: int = 0, heavy_cls: bool = False):
    """bf16 leaves on the GPU: the packed projection [B, N, 3·C], or queries [B, M, C] and kv [B, N, 2·C].
    `heavy_cls`: every query shares a component that the [CLS] key matches, s₀ ≈ 6 ≈ log N."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    c = h * d
    if m is not None:
        return [torch.randn(b, m, c, device="cuda", generator=gen).bfloat16().requires_grad_(),
                torch.randn(b, n, 2 * c, device="cuda", generator=gen).bfloat16().requires_grad_()]
    x = torch.randn(b, n, 3 * c, device="cuda", generator=gen)
    if heavy_cls:
        x[:, :, :c].view(b, n, h, d)[..., 0] += 4.0
        x[:, 0, c:2 * c].view(b, h, d)[..., 0] = 1.5 * d ** 0.5
    return [x.bfloat16().requires_grad_()]


def attend(inputs, h: int, p: float, fn=None):
    fn = fn or (split_cls_self_attention if len(inputs) == 1 else split_cls_rows_attention)
    return fn(*inputs, h, p)


def sdpa_reference(inputs, h: int) -> torch.Tensor:
    """SDPA's math in fp64 on the same leaves (their gradients land in the leaves' .grad)."""
    def heads(t, parts):
        b, n, w = t.shape
        return t.view(b, n, parts, h, w // parts // h).permute(2, 0, 3, 1, 4).unbind(0)
    views = heads(inputs[0], 3) if len(inputs) == 1 else (*heads(inputs[0], 1), *heads(inputs[1], 2))
    out = F.scaled_dot_product_attention(*views)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


@cuda
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("h, n, d, m", [(12, 129, 64, None), (16, 257, 48, None), (16, 257, 48, 112)])
def test_cuda_split_attention_matches_fp64_reference_in_bf16(h, n, d, m, compiled):
    """The ViT-B encoder's and decoder's self-attention and the decoder's query rows, compiled as the trainer
    compiles the model."""
    inputs = packed(4, n, h, d, m)
    fn = None
    if compiled:
        fn = compile_for_training(split_cls_self_attention if m is None else split_cls_rows_attention, "default",
                                  dynamic=False)
    out = attend(inputs, h, 0.0, fn)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = sdpa_reference(ref_inputs, h)
    want = torch.autograd.grad(ref, ref_inputs, grad.double())
    for a, r in ((out, ref), *zip(got, want)):
        assert float((a.detach().double() - r).abs().max() / r.abs().max()) < 0.02


def summed_cls_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The [CLS] query's row as q times k summed over the head dimension (an earlier form of split_cls)."""
    scores = (q[:, :, 0, None].float() * k.float()).sum(-1) * q.shape[-1] ** -0.5
    return (scores.softmax(-1)[..., None] * v.float()).sum(2).to(v.dtype)


def qkv_views(b: int, n: int, h: int, d: int):
    """q, k, v as [B, H, N, D] views of one packed bf16 [B, N, 3, H, D] leaf on the GPU."""
    leaf = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    return leaf, leaf.permute(2, 0, 3, 1, 4).unbind(0)


@cuda
@pytest.mark.parametrize("h, n, d", [(12, 129, 64), (16, 257, 48)])
def test_cuda_training_compile_options_keep_padded_reductions_right(h, n, d):
    """Compiled by torch 2.11 with inductor's comprehensive padding on, this row's gradient here came
    out about 110 % off fp64 on an H100 (1.5 or NaN in cls_row_compiled.py's layouts): a fused
    reduction read an unpadded buffer with the padded stride. The trainer compiles with that pass off
    (lease.train.TRAINING_INDUCTOR_OPTIONS)."""
    leaf, (q, k, v) = qkv_views(8, n, h, d)
    grad = torch.randn(8, h, d, device="cuda", dtype=torch.bfloat16)
    compiled = compile_for_training(summed_cls_row, "default", dynamic=False)
    (got,) = torch.autograd.grad(compiled(q, k, v), leaf, grad)
    ref_leaf = leaf.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(summed_cls_row(*ref_leaf.permute(2, 0, 3, 1, 4).unbind(0)), ref_leaf,
                                  grad.double())
    assert float((got.double() - want).norm() / want.norm()) < 0.02


def values(inputs) -> torch.Tensor:
    """The v columns (the last C) of the packed projection [B, N, 3·C] (self) or of kv [B, N, 2·C] (rows)."""
    width = inputs[0].shape[-1] // 3 if len(inputs) == 1 else inputs[0].shape[-1]
    return inputs[-1][..., -width:]


@cuda
@pytest.mark.parametrize("heavy_cls", [False, True])
@pytest.mark.parametrize("h, n, d, m", [(12, 129, 64, None), (16, 257, 48, None), (16, 257, 48, 112)])
def test_cuda_split_attention_dropout_backward_uses_the_forward_masks(h, n, d, m, heavy_cls):
    """For any fixed dropout masks O = P̃V, so with the output gradient G = O, ⟨dV, V⟩ = ‖O‖², a sum
    of squares that no draw brings near 0. With another draw's masks in the backward, ⟨P̃'V, P̃V⟩
    falls short of ‖P̃V‖² by about the dropout's variance: checked here too, so the test can fail.
    Without `heavy_cls` the weight is spread over the patch keys (cuDNN's masks matter); with it the
    [CLS] key takes about half of every row (its own keep flags matter)."""
    torch.manual_seed(0)
    inputs = packed(8, n, h, d, m, heavy_cls=heavy_cls and m is None)
    dot = lambda a, b: float((a.detach().double() * b.detach().double()).sum())  # noqa: E731
    v = values(inputs)
    out = attend(inputs, h, 0.1)
    dv = values(torch.autograd.grad(out, inputs, out.detach()))
    assert dot(dv, v) == pytest.approx(dot(out, out), rel=0.01)
    dv_other_masks = values(torch.autograd.grad(attend(inputs, h, 0.1), inputs, out.detach()))
    assert abs(dot(dv_other_masks, v) / dot(out, out) - 1) > 0.03
    assert not torch.allclose(out, attend(inputs, h, 0.0))  # the masks do drop


@cuda
@pytest.mark.parametrize("m", [None, 112])
def test_cuda_split_attention_drops_the_cls_column_and_row_at_rate_p(m):
    """With every value but the [CLS] key's zero, each output row is that key's probability times its
    keep factor alone: 0 in a fraction p of the rows, 1/(1 − p) × the undropped output in the rest
    (self-attention: the [CLS] query's row among them)."""
    inputs = packed(64, 129, 12, 64, m)
    with torch.no_grad():
        v = values(inputs)
        v.zero_()
        v[:, 0] = 1.0
        kept = attend(inputs, 12, 0.0).float()
        ratio = attend(inputs, 12, 0.1).float() / kept
    dropped = ratio < 0.5
    assert float(dropped.float().mean()) == pytest.approx(0.1, abs=0.015)  # ~99,000 (row, head) draws
    assert torch.allclose(ratio[~dropped], torch.full_like(ratio[~dropped], 1 / 0.9), rtol=0.02)
    assert float(ratio[dropped].abs().max()) == 0.0
    if m is None:  # the [CLS] query's own row is dropped too, at the same rate: 768 draws, σ ≈ 0.011
        assert float(dropped[:, 0].float().mean()) == pytest.approx(0.1, abs=0.04)


@cuda
def test_cuda_split_attention_dropout_is_unbiased_and_follows_the_generator():
    """The average output over many dropout draws approaches the output without dropout; restoring the
    CUDA generator's state draws the same masks (cuDNN's and the [CLS] flags), so the same output."""
    inputs = packed(2, 129, 4, 64)
    with torch.no_grad():
        mean = sum(attend(inputs, 4, 0.1).float() for _ in range(400)) / 400
        ref = attend(inputs, 4, 0.0).float()
        assert float((mean - ref).abs().max()) < 0.05 * float(ref.abs().max())
        state = torch.cuda.get_rng_state()
        first = attend(inputs, 4, 0.1)
        torch.cuda.set_rng_state(state)
        assert torch.equal(attend(inputs, 4, 0.1), first)


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
