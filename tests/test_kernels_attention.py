"""The Triton attention kernels (lease/kernels_attention.py) against fp64, their dropout masks, resume.

Without a GPU the kernels run through Triton's interpreter in a subprocess (the interpreter is chosen
when a kernel is defined) on small shapes in fp32; on a GPU the same script runs in bf16, and the
tests below check the ViT-B shapes, the masks' statistics, bit-identical streams after restoring the
generator, the compiled path, and the whole model against SDPA.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

AGAINST_FP64 = r"""
import json, sys
import torch
from lease import kernels_attention as ka
from lease.dropout import drop_threshold, keep_scale

device, cases = sys.argv[1], json.loads(sys.argv[2])
dtype = torch.bfloat16 if device == "cuda" else torch.float32
blocks = {name: (16, 16, 4, 2) for name in ("fwd", "dkdv", "dq")}
results = []
for mode, b, h, p_keys, d, m, p in cases:
    torch.manual_seed(len(results))
    n, c = p_keys + 1, h * d
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    thr = drop_threshold(p)
    if mode == "self":
        q_t = kv_t = torch.randn(b, n, 3 * c).to(device, dtype)
        m, cols = n, (0, c, 2 * c)
    else:
        q_t, kv_t = torch.randn(b, m, c).to(device, dtype), torch.randn(b, n, 2 * c).to(device, dtype)
        cols = (0, 0, c)
    heads = lambda t, col: t[:, :, col:col + c].reshape(t.shape[0], t.shape[1], h, d).transpose(1, 2).double()
    qd, kd, vd = (heads(q_t, cols[0]).requires_grad_(), heads(kv_t, cols[1]).requires_grad_(),
                  heads(kv_t, cols[2]).requires_grad_())
    att = (qd @ kd.transpose(-1, -2) / d ** 0.5).softmax(-1)
    if p > 0:
        att = att * ka.keep_mask(seed, b * h, m, n, p).view(att.shape).double() * keep_scale(p)
    ref = att @ vd
    grad = torch.randn(b, m, c).to(device, dtype)
    refs = torch.autograd.grad(ref, (qd, kd, vd), grad.view(b, m, h, d).transpose(1, 2).double())
    out, lse = ka._launch_fwd(q_t, kv_t, seed, h, c, *cols, mode == "self", thr, blocks)
    if mode == "self":
        dqkv = torch.full_like(q_t, float("nan"))
        ka._launch_bwd(grad, q_t, kv_t, out, lse, seed, dqkv, dqkv, h, *cols, *cols, True, thr, blocks)
        got = heads(dqkv, 0), heads(dqkv, c), heads(dqkv, 2 * c)
    else:
        dq, dkv = torch.full_like(q_t, float("nan")), torch.full_like(kv_t, float("nan"))
        ka._launch_bwd(grad, q_t, kv_t, out, lse, seed, dq, dkv, h, *cols, 0, 0, c, False, thr, blocks)
        got = heads(dq, 0), heads(dkv, 0), heads(dkv, c)
    rel = lambda a, r: float((a.double() - r).norm() / r.norm())
    results.append({"out": rel(out.view(b, m, h, d).transpose(1, 2), ref),
                    **{name: rel(a, r) for name, a, r in zip(("dq", "dk", "dv"), got, refs)}})
json.dump(results, sys.stdout)
"""


def run_against_fp64(cases: list) -> list[dict]:
    device, env = ("cuda", dict(os.environ)) if torch.cuda.is_available() else \
        ("cpu", {**os.environ, "TRITON_INTERPRET": "1"})
    out = subprocess.run([sys.executable, "-c", AGAINST_FP64, device, json.dumps(cases)], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise AssertionError(f"script failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def test_triton_attention_and_gradients_match_fp64_with_the_kernels_own_masks():
    """Self-attention with a [CLS] query (head dim 12: padded to 16 in the kernel) and query rows
    without one, both with dropout 0.3 and through every tile kind ([CLS] tiles, two key tiles, a
    ragged last query tile); the reference applies `keep_mask`'s masks in fp64."""
    cases = [("self", 2, 2, 32, 12, None, 0.3), ("rows", 1, 2, 32, 16, 20, 0.3)]
    tolerance = 2e-2 if torch.cuda.is_available() else 1e-5  # bf16 on the GPU, fp32 in the interpreter
    for case, errors in zip(cases, run_against_fp64(cases)):
        for name, error in errors.items():
            assert error < tolerance, (case, name, error)


# ----------------------------------------------------------------------------------------- GPU only

def packed_inputs(b: int, h: int, n: int, d: int, m: int | None = None, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    c = h * d
    if m is None:
        return (torch.randn(b, n, 3 * c, device="cuda", generator=gen).bfloat16().requires_grad_(),)
    return (torch.randn(b, m, c, device="cuda", generator=gen).bfloat16().requires_grad_(),
            torch.randn(b, n, 2 * c, device="cuda", generator=gen).bfloat16().requires_grad_())


@cuda
@pytest.mark.parametrize("h, n, d, m", [(12, 129, 64, None), (16, 257, 48, None), (16, 257, 48, 112)])
def test_cuda_triton_attention_matches_fp64_at_the_vit_b_shapes(h, n, d, m):
    """Encoder and decoder self-attention and the last decoder block's query rows, bf16, dropout 0.1,
    the default tiles, through the autograd ops: outputs and gradients within bf16 rounding of fp64."""
    from lease import kernels_attention as ka
    from lease.dropout import keep_scale

    b, p, c = 4, 0.1, h * d
    inputs = packed_inputs(b, h, n, d, m)
    seed = ka.philox_seed(torch.device("cuda"))
    if m is None:
        out = ka.self_attention(inputs[0], h, p, seed)
        cols, rows = (0, c, 2 * c), n
    else:
        out = ka.rows_attention(*inputs, h, p, seed)
        cols, rows = (0, 0, c), m
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    q_leaf, kv_leaf = (leaves[0], leaves[0]) if m is None else leaves
    heads = lambda t, col: t[:, :, col:col + c].unflatten(-1, (h, d)).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q_leaf, cols[0]), heads(kv_leaf, cols[1]), heads(kv_leaf, cols[2])
    att = (q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1)
    att = att * ka.keep_mask(seed, b * h, rows, n, p).view(att.shape).double() * keep_scale(p)
    ref = (att @ v).transpose(1, 2).flatten(2)
    refs = torch.autograd.grad(ref, leaves, grad.double())
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
    for a, r in zip(got, refs):
        assert torch.isfinite(a).all()
        assert float((a.double() - r).norm() / r.norm()) < 2e-2


@cuda
def test_cuda_triton_attention_masks_drop_at_rate_p_independently():
    """keep_mask over 4·12·129·129 slots: the drop rate is p' = round(p·2¹⁶)/2¹⁶ within 5σ, every slot
    position within its column (the [CLS] key, the eight lanes of one Philox call) drops at p', lanes of
    one call and neighbouring rows are uncorrelated, and another key gives other masks."""
    from lease import kernels_attention as ka
    from lease.dropout import drop_threshold

    p = 0.1
    p_real = drop_threshold(p) / 2**16
    seed = torch.tensor([987654321], device="cuda")
    keep = ka.keep_mask(seed, 48, 129, 129, p).float()
    count = keep.numel()
    assert abs(float(1 - keep.mean()) - p_real) < 5 * (p_real * (1 - p_real) / count) ** 0.5
    per_column = 1 - keep.mean(dim=(0, 1))  # 6,192 rows each: σ ≈ 0.004
    assert float((per_column - p_real).abs().max()) < 0.02
    lanes = keep[:, :, 1:].reshape(-1, 8)  # the eight slots of one Philox counter
    centred = lanes - lanes.mean(0)
    corr = (centred.T @ centred) / len(lanes) / centred.var(0).outer(centred.var(0)).sqrt()
    assert float((corr - torch.eye(8, device="cuda")).abs().max()) < 0.02  # σ ≈ 0.003
    rows = keep - keep.mean()
    assert abs(float((rows[:, 1:] * rows[:, :-1]).mean() / rows.var())) < 0.01
    other = ka.keep_mask(torch.tensor([987654322], device="cuda"), 48, 129, 129, p)
    assert abs(float((keep.bool() ^ other).float().mean()) - 2 * p_real * (1 - p_real)) < 0.005


@cuda
def test_cuda_triton_attention_streams_resume_bit_identically_and_compile_matches_eager():
    """The Philox key comes from torch's CUDA generator: two calls differ, and restoring the generator
    state (what a checkpoint saves) gives the same output and gradient bits again. Compiled with the same
    key, the ops give eager's bits."""
    from lease import kernels_attention as ka

    (qkv,) = packed_inputs(2, 12, 129, 64)
    grad = torch.randn(2, 129, 768, device="cuda").bfloat16()

    def step(fn=ka.self_attention, seed=None):
        out = fn(qkv, 12, 0.1, seed) if seed is not None else fn(qkv, 12, 0.1)
        return out, torch.autograd.grad(out, qkv, grad)[0]

    torch.cuda.manual_seed(3)
    first, _ = step()
    state = torch.cuda.get_rng_state()
    second, second_grad = step()
    assert not torch.equal(first, second)
    torch.cuda.set_rng_state(state)
    again, again_grad = step()
    assert torch.equal(second, again) and torch.equal(second_grad, again_grad)
    seed = torch.tensor([12345], device="cuda")
    eager = step(seed=seed)
    compiled = step(torch.compile(ka.self_attention, fullgraph=True), seed=seed)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


@cuda
def test_cuda_triton_attention_dropout_is_unbiased():
    """The mean output over 300 keys approaches the output without dropout (E[Z] = 1)."""
    from lease import kernels_attention as ka

    (qkv,) = packed_inputs(2, 4, 129, 64)
    with torch.no_grad():
        mean = sum(ka.self_attention(qkv, 4, 0.1).float() for _ in range(300)) / 300
        ref = ka.self_attention(qkv, 4, 0.0).float()
    assert float((mean - ref).abs().max()) < 0.05 * float(ref.abs().max())


@cuda
def test_cuda_compiled_model_with_triton_attention_gives_sdpa_losses_and_gradients():
    """ViT-B's attention shapes, two blocks each side, dropout off, bf16: the compiled model with the
    Triton kernels against eager SDPA (the decoder's last block takes the query-rows kernel)."""
    from lease.configs import model_config
    from test_attention import one_training_step

    losses, grads = {}, {}
    for backend in ("sdpa", "triton"):
        cfg = model_config("vit_base", attention_backend=backend, dropout=0.0, attn_dropout=0.0, codebook_dim=32,
                           depth=2, decoder_depth=2)
        losses[backend], grads[backend] = one_training_step(cfg, 256, compiled=backend == "triton",
                                                            autocast_dtype=torch.bfloat16)
    assert torch.allclose(losses["triton"], losses["sdpa"], rtol=2e-3)
    assert grads["triton"].keys() == grads["sdpa"].keys()
    for name, g in grads["sdpa"].items():
        assert float((grads["triton"][name] - g).norm() / g.norm().clamp_min(1e-12)) < 0.03, name


def test_flop_counter_counts_the_kernels_executed_matmuls():
    """torch's FLOP counter (what `lease bench train --profile` divides by kernel time) sees the custom
    ops: forward 4·B·M·N·C, backward 14·B·M·N·C (dQ's pass recomputes S and dP), on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    import lease.kernels_attention  # noqa: F401  (registers the ops)
    ops = torch.ops.lease
    with FakeTensorMode(), FlopCounterMode(display=False) as counter:
        qkv, seed = torch.empty(2, 129, 3 * 64, dtype=torch.bfloat16), torch.empty(1, dtype=torch.int64)
        out, lse = ops.self_attention_fwd(qkv, seed, 4, 6554)
        ops.self_attention_bwd(out, qkv, out, lse, seed, 4, 6554)
        q, kv = torch.empty(2, 48, 64, dtype=torch.bfloat16), torch.empty(2, 129, 128, dtype=torch.bfloat16)
        out, lse = ops.rows_attention_fwd(q, kv, seed, 4, 6554)
        ops.rows_attention_bwd(out, q, kv, out, lse, seed, 4, 6554)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts == {"lease.self_attention_fwd": 4 * 2 * 129 * 129 * 64, "lease.self_attention_bwd": 14 * 2 * 129 * 129 * 64,
                      "lease.rows_attention_fwd": 4 * 2 * 48 * 129 * 64, "lease.rows_attention_bwd": 14 * 2 * 48 * 129 * 64}
