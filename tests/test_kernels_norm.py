"""Fused dropout + residual add + LayerNorm (lease/kernels_norm.py, `model.fused_kernels=on`).

Without a GPU the kernels run through Triton's interpreter in a subprocess (the interpreter is chosen
when a kernel is defined) in fp32 against fp64 autograd; on a GPU the same script runs with 16-bit
branches, and the tests below check the op at ViT-B's shapes, the mask's statistics, bit-identical
streams after restoring the generator, and the compiled model against the unfused blocks.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from lease.configs import model_config
from lease.dropout import drop_threshold
from lease.kernels_norm import dropout_add_layer_norm
from lease.masking import random_plan
from lease.model import LeaseModel

pytest.importorskip("triton")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

AGAINST_FP64 = r"""
import json, sys
import torch
import torch.nn.functional as F
from lease import kernels_norm as kn
from lease.dropout import drop_threshold, threshold_scale, unpack_bits

device, cases = sys.argv[1], json.loads(sys.argv[2])
branch_dtype = torch.bfloat16 if device == "cuda" else torch.float32
results = []
for r, c, p, has_ds, rows_per_program, programs in cases:
    torch.manual_seed(len(results))
    x = torch.randn(r, c, device=device)
    branch = torch.randn(r, c, device=device).to(branch_dtype)
    w, b = 1 + 0.1 * torch.randn(c, device=device), 0.1 * torch.randn(c, device=device)
    packed = torch.randint(0, 256, (-(-r * c // 8),), dtype=torch.uint8, device=device)
    threshold = drop_threshold(p)
    keep = unpack_bits(packed, r * c).view(r, c).double() * threshold_scale(threshold) if p else 1.0
    xd, bd, wd, bbd = (t.double().requires_grad_() for t in (x, branch, w, b))
    s_ref = xd + bd * keep
    y_ref = F.layer_norm(s_ref, (c,), wd, bbd, 1e-6)
    dy = torch.randn(r, c, device=device).to(branch_dtype)
    ds = torch.randn(r, c, device=device) if has_ds else None
    loss = (y_ref * dy.double()).sum() + ((s_ref * ds.double()).sum() if has_ds else 0)
    refs = torch.autograd.grad(loss, (xd, bd, wd, bbd))
    s, y = torch.full_like(x, float("nan")), torch.full_like(x, float("nan")).to(branch_dtype)
    mean, rstd = torch.empty(r, device=device), torch.empty(r, device=device)
    kn.launch_forward(x, branch, packed, w, b, 1e-6, threshold, s, y, mean, rstd, rows_per_program)
    dx, dbranch = torch.full_like(x, float("nan")), torch.full_like(branch, float("nan"))
    dw, db = kn.launch_backward(dy, ds, s, mean, rstd, w, packed, threshold, dx, dbranch, rows_per_program, programs)
    rel = lambda a, ref: float((a.double() - ref).norm() / ref.norm())
    results.append({"s": rel(s, s_ref), "y": rel(y, y_ref), "mean": rel(mean, s_ref.mean(-1)),
                    "rstd": rel(rstd, 1 / (s_ref.var(-1, unbiased=False) + 1e-6).sqrt()),
                    "dx": rel(dx, refs[0]), "dbranch": rel(dbranch, refs[1]), "dw": rel(dw, refs[2]),
                    "db": rel(db, refs[3])})
print(json.dumps(results))
"""


def against_fp64(cases: list) -> list[dict]:
    """Run AGAINST_FP64 on the GPU, or through the interpreter without one; a failure shows the script's error."""
    device, env = (("cuda", dict(os.environ)) if torch.cuda.is_available()
                   else ("cpu", {**os.environ, "TRITON_INTERPRET": "1"}))
    out = subprocess.run([sys.executable, "-c", AGAINST_FP64, device, json.dumps(cases)], capture_output=True,
                         text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise AssertionError(f"kernel script failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_residual_norm_and_its_gradients_match_fp64():
    """Rows not a multiple of a program's, columns not a power of two (masked tail), programs that
    visit several row blocks (the ∂γ, ∂β partial sums), with and without dropout and a residual gradient."""
    cases = [[13, 48, 0.3, True, 4, 2], [9, 40, 0.0, False, 2, 3], [6, 64, 0.5, False, 4, 1]]
    tolerance = 1e-2 if torch.cuda.is_available() else 1e-5  # 16-bit branches on the GPU
    for case, errors in zip(cases, against_fp64(cases)):
        assert max(errors.values()) < tolerance, (case, errors)


def test_fused_kernels_on_runs_the_plain_blocks_on_the_cpu():
    """Off on the CPU: the same losses and gradients, bit for bit, as fused_kernels=off."""
    losses, grads = [], []
    for switch in ("off", "on"):
        cfg = model_config("tiny", fused_kernels=switch, codebook_dim=8)
        torch.manual_seed(0)
        model = LeaseModel(cfg).train()
        model.set_codebook(torch.randn(16, 8))
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_gen, (2, cfg.seq_len), generator=gen)
        disc = torch.randint(0, 16, (2, cfg.seq_len), generator=gen)
        plan = random_plan(2, cfg.seq_len, cfg.seq_len // 2, cfg.seq_len * 3 // 4, torch.device("cpu"), gen)
        out = model(tokens, disc, plan)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])


NORM_POINTER_TYPES = {"branch_ptr": "*bf16", "y_ptr": "*bf16", "dy_ptr": "*bf16", "dbranch_ptr": "*bf16",
                      "packed_ptr": "*u8"}  # every other pointer is fp32 (the residual stream, its statistics)


def norm_param_type(name: str) -> str:
    if name.endswith("_ptr"):
        return NORM_POINTER_TYPES.get(name, "*fp32")
    return "fp32" if name in ("keep_factor", "eps") else "i32"


@pytest.mark.parametrize("has_ds", [True, False])
def test_fused_norm_kernels_compile_for_sm90_without_spilling(has_ds):
    """Both kernels compile for an H100/H200 (Triton's own ptxas, no GPU) at ViT-B's width with the
    training types and the module's rows per program, keep their rows in registers, and leave room for
    BACKWARD_PROGRAMS_PER_SM backward programs in an SM's 64K registers (its one wave of programs)."""
    from benchmarks.sass import compile_for, resources
    from lease import kernels_norm as kn

    consts = dict(BM=kn.ROWS_PER_PROGRAM, BC=1024, DROPOUT=True, HAS_DS=has_ds)
    registers = {}
    for kernel in (kn._residual_norm_fwd_kernel, kn._residual_norm_bwd_kernel):
        registers[kernel], spilled = resources(compile_for(kernel, consts, norm_param_type, num_warps=4))
        assert spilled == 0, (kernel.fn.__name__, registers[kernel], spilled)
    assert registers[kn._residual_norm_bwd_kernel] * 4 * 32 * kn.BACKWARD_PROGRAMS_PER_SM <= 65536


MODEL_STEPS = r"""
import json, sys
import torch
import lease.kernels_norm
import lease.model
from lease.configs import model_config
from lease.masking import random_plan
from lease.model import LeaseModel

lease.model.fused_norm_available = lambda x: True  # Triton's interpreter runs the kernels on the CPU
lease.kernels_norm.ROWS_PER_PROGRAM = 64  # one program per launch: the interpreter runs programs one by one


def step(switch, dropout, overrides, seed=0):
    cfg = model_config("tiny", fused_kernels=switch, codebook_dim=8, dropout=dropout, attn_dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = LeaseModel(cfg).train()
    model.set_codebook(torch.randn(16, 8))
    if cfg.cond_classes:
        model.set_condition(torch.randn(cfg.cond_classes, cfg.cond_text_dim))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_gen, (4, cfg.seq_len), generator=gen)
    disc = torch.randint(0, 16, (4, cfg.seq_len), generator=gen)
    labels = torch.randint(0, 4, (4,), generator=gen)
    plan = random_plan(4, cfg.seq_len, cfg.seq_len // 2, cfg.seq_len * 3 // 4, torch.device("cpu"), gen)
    torch.manual_seed(seed)
    out = model(tokens, disc, plan, labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


results = {"plain_vs_fused": []}
for overrides in json.loads(sys.argv[1]):
    (loss_off, grads_off), (loss_on, grads_on) = step("off", 0.0, overrides), step("on", 0.0, overrides)
    results["plain_vs_fused"].append({
        "loss": abs(float(loss_on / loss_off) - 1), "same_parameters": sorted(grads_on) == sorted(grads_off),
        "grad": max(float((grads_on[n] - grads_off[n]).norm() / grads_off[n].norm().clamp_min(1e-12))
                    for n in grads_off.keys() & grads_on.keys())})
(first, grads_first), (again, grads_again), (other, _) = (step("on", 0.1, {}), step("on", 0.1, {}),
                                                          step("on", 0.1, {}, seed=5))
results["repeats"] = bool(torch.equal(first, again) and all(torch.equal(grads_first[n], g)
                                                                for n, g in grads_again.items()))
results["seed_changes_masks"] = bool(first != other)
print(json.dumps(results))
"""


def test_fused_blocks_train_as_the_plain_blocks_through_the_interpreter():
    """The real kernels in the whole model (Triton's interpreter, fp32, dropout off): the fused blocks'
    order of work (each MLP output added in the next block's norm1, the last decoder block on the
    loss's rows, the condition rows cut before the final norm) gives the plain blocks' losses and
    gradients for LEASE, a class-conditional decoder on the whole canvas, and full decoding. With
    dropout, the masks follow torch's generator: one seed repeats bit for bit, another seed differs."""
    configs = [{}, {"contrast_on": "both", "cond_classes": 4}, {"decode_masked_only": False}]
    out = subprocess.run([sys.executable, "-c", MODEL_STEPS, json.dumps(configs)], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for config, row in zip(configs, results["plain_vs_fused"]):
        assert row["same_parameters"] and row["loss"] < 1e-6 and row["grad"] < 1e-5, (config, row)
    assert results["repeats"] and results["seed_changes_masks"]


@cuda
def test_cuda_fused_residual_norm_matches_fp64_at_vit_base_shapes():
    """The decoder's rows at batch 256 (65,792 × 768), and the encoder's (33,024), in bf16."""
    cases = [[256 * 257, 768, 0.1, True, None, None], [256 * 129, 768, 0.1, False, None, None]]
    for case, errors in zip(cases, against_fp64(cases)):
        assert max(errors.values()) < 1e-2, (case, errors)


def masked_ones(shape, p: float, seed: int | None = None):
    """(s, ∂branch) of the op on x = 0, branch = 1, ∂y = 0, ∂s = 1: both are mask / (1 − p')."""
    if seed is not None:
        torch.cuda.manual_seed(seed)
    norm = torch.nn.LayerNorm(shape[-1]).cuda()
    x = torch.zeros(shape, device="cuda", requires_grad=True)
    branch = torch.ones(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s, y = dropout_add_layer_norm(x, branch, norm, p, False)
    torch.autograd.backward([s, y], [torch.ones_like(s), torch.zeros_like(y)])
    return s.detach(), branch.grad


@cuda
def test_cuda_fused_norm_dropout_keeps_its_probability_and_resumes_bit_identically():
    p = 0.1
    s, dbranch = masked_ones((256, 257, 768), p, seed=3)
    dropped = float((s == 0).float().mean())
    p_real = drop_threshold(p) / 2**16
    assert abs(dropped - p_real) < 4 * (p_real * (1 - p_real) / s.numel()) ** 0.5
    assert torch.equal(dbranch.float(), s)  # the backward applies the forward's mask
    assert float(s.double().mean()) == pytest.approx(1.0, abs=1e-3)
    again, _ = masked_ones((256, 257, 768), p, seed=3)
    assert torch.equal(again, s)
    state = torch.cuda.get_rng_state()
    first, _ = masked_ones((64, 129, 768), p)
    torch.cuda.set_rng_state(state)
    resumed, _ = masked_ones((64, 129, 768), p)
    assert torch.equal(first, resumed) and not torch.equal(first, masked_ones((64, 129, 768), p)[0])


@cuda
@pytest.mark.parametrize("residual_dtype", ["fp32", "autocast"])
def test_cuda_compiled_fused_blocks_give_the_unfused_losses_and_gradients(residual_dtype):
    """Whole model, dropout off, bf16 autocast: the compiled fused step against the eager plain one."""
    from test_attention import one_training_step
    losses, grads = {}, {}
    for switch in ("off", "on"):
        cfg = model_config("tiny", fused_kernels=switch, residual_dtype=residual_dtype, dropout=0.0,
                           attn_dropout=0.0, codebook_dim=32)
        losses[switch], grads[switch] = one_training_step(cfg, 64, compiled=switch == "on",
                                                          autocast_dtype=torch.bfloat16)
    assert torch.allclose(losses["on"], losses["off"], rtol=2e-3)
    assert grads["on"].keys() == grads["off"].keys()
    for name, g in grads["off"].items():
        assert float((grads["on"][name] - g).norm() / g.norm().clamp_min(1e-12)) < 0.03, name


@cuda
def test_cuda_fused_training_with_dropout_repeats_bit_identically_from_a_seed():
    """With dropout on the fused step draws its masks from torch's generator: one seed, one result."""
    from test_attention import one_training_step
    cfg = model_config("tiny", fused_kernels="on", codebook_dim=32)
    runs = [one_training_step(cfg, 64, compiled=True, autocast_dtype=torch.bfloat16) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][name], g) for name, g in runs[1][1].items())


@cuda
def test_cuda_bench_norm_times_both_paths_above_their_byte_floor():
    """`lease bench kernels --parts norm` on the tiny preset: every timing at or above the bytes' floor."""
    from benchmarks.kernels import NORM_ROWS_SWEEP, bench_norm, ceilings

    record = bench_norm("tiny", 16, ceilings())
    assert record.keys() == {"encoder", "decoder"}
    for row in record.values():
        times = [row["compiled_torch_fwd_bwd_ms"]] + [row[f"fused_rows{n}_fwd_bwd_ms"] for n in NORM_ROWS_SWEEP]
        assert min(times) >= row["byte_floor_ms"] > 0, row
