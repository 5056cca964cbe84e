"""The benchmarks' arithmetic and guards: the precompute's ImageNet-1K estimate, useful FLOPs against torch's
counter, record names and the results table, and the checks that void a timing (non-finite steps, a
compile inside the timed steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.train import finite_metrics, no_compilation, results_table
from benchmarks.records import machine_info
from benchmarks.precompute import IMAGENET_1K_IMAGES, imagenet_estimate, speedups

REPO = Path(__file__).resolve().parents[1]

IMAGENET = sum(IMAGENET_1K_IMAGES.values())


def test_per_image_stages_scale_and_fixed_costs_do_not():
    measured = {"manifest": 10.0, "features": 40.0, "kmeans": 15.0, "tokenize": 150.0, "pack": 5.0}
    est = imagenet_estimate(measured, {"tokenize": 50.0}, num_images=IMAGENET // 10, feature_images=100_000,
                            feature_sample=100_000)
    scale = IMAGENET / (IMAGENET // 10)
    assert est["manifest"] == pytest.approx(10.0 * scale, abs=0.05)
    assert est["pack"] == pytest.approx(5.0 * scale, abs=0.05)
    assert est["tokenize"] == pytest.approx(50.0 + 100.0 * scale, abs=0.05)  # compilation counted once
    assert (est["features"], est["kmeans"]) == (40.0, 15.0)  # a fixed sample and a fixed k-means


def test_a_feature_sample_smaller_than_configured_is_scaled_up():
    est = imagenet_estimate({"features": 10.0}, {}, num_images=50_000, feature_images=25_000, feature_sample=100_000)
    assert est["features"] == pytest.approx(40.0)


def test_speed_ups_are_against_the_one_worker_run():
    runs = [{"workers": 1, "stage_seconds": {"tokenize": 100.0, "pack": 5.0, "vq-codes": 0.0}},
            {"workers": 4, "stage_seconds": {"tokenize": 30.0, "pack": 5.0, "vq-codes": 0.0}}]
    assert speedups(runs) == {"1": {"tokenize": 1.0, "pack": 1.0}, "4": {"tokenize": 3.333, "pack": 1.0}}
    assert speedups(runs[1:]) == {}  # no 1-worker run to compare with


def test_precompute_records_reach_the_table(tmp_path):
    import json
    record = {"name": "precompute-in1k_vitb-1000", "machine": {"gpu": "GPU", "torch": "2"},
              "results": {"preset": "in1k_vitb", "tokenizers": "full", "num_images": {"train": 1000, "val": 39},
                          "total_seconds": 12.0, "imagenet_1k_minutes": 19.5,
                          "imagenet_1k_stage_seconds": {"manifest": 200.0, "tokenize": 800.0}}}
    (tmp_path / "precompute-in1k_vitb-1000.json").write_text(json.dumps(record))
    (tmp_path / "precompute-in1k_vitb-1000-tiny.json").write_text(json.dumps(
        {**record, "results": {**record["results"], "tokenizers": "tiny"}}))
    rows = [line for line in results_table(tmp_path).splitlines() if line.startswith("| precompute")]
    assert len(rows) == 1 and "ImageNet-1K estimate 19.5 min" in rows[0] and "1039 JPEGs" in rows[0]


def test_train_record_names_carry_every_non_default_setting():
    from benchmarks.train import train_record_name
    assert train_record_name("vit_base", 256, "bf16", "default", {"sdpa_kernel": "default", "dropout_impl": "triton"}
                             ) == "train-vit_base-b256-bf16-compile"
    name = train_record_name("vit_base", 128, "bf16", None, {"sdpa_kernel": "flash", "dropout_impl": "torch",
                                                             "dropout": 0.0, "decode_masked_only": False})
    assert name == "train-vit_base-b128-bf16-eager-sdpa_flash-dropout_torch-dropout0-decode_masked_only_False"


def test_profiled_kernels_fall_into_their_categories():
    from benchmarks.train import kernel_category
    names = {"cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": "attention",
             "void cudnn::fusion::convert_dq_to_16bits<true>": "attention",
             "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN": "matmul",
             "triton_poi_fused_gelu_gelu_backward_mul_view_15": "fused elementwise (Triton)",
             "_keep_mask_kernel": "dropout mask (lease/dropout.py)",
             "_attn_dkdv_kernel": "attention",
             "_split_cls_keys_bwd_kernel": "attention",
             "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
             "Memcpy DtoD (Device -> Device)": "other"}
    assert {name: kernel_category(name) for name in names} == names


def test_kernel_floors_take_the_larger_of_flops_and_bytes_over_the_measured_ceilings():
    """The elementwise floor counts 10r + 57.5 bytes per block row and feature (r: residual bytes) plus
    6 bytes per logit; attention takes the larger of its FLOP and byte floors."""
    from benchmarks.train import elementwise_bytes_per_step, kernel_floors_ms
    from lease.configs import model_config

    cfg = model_config("vit_base")
    by_residual = {}
    for residual in ("fp32", "autocast"):
        cfg.residual_dtype = residual
        by_residual[residual] = elementwise_bytes_per_step(cfg, 2, 128, 0, 0, 16384)
    enc, dec = 2 * 129 * 768 * 12, 2 * 257 * 768 * 7
    assert by_residual["fp32"] == pytest.approx(97.5 * (enc + dec))
    assert by_residual["autocast"] == pytest.approx(77.5 * (enc + dec))
    floors = kernel_floors_ms(cfg, 256, 128, 176, 80, 16384, {"matmul": 40.0, "attention": 1.0}, 800.0, 4000.0)
    assert floors["matmul"]["floor_ms"] == pytest.approx(50.0)
    attention = floors["attention"]
    assert attention["flop_floor_ms"] == pytest.approx(1.25)
    assert attention["floor_ms"] == max(attention["flop_floor_ms"], attention["byte_floor_ms"]) > 1.25
    assert floors["fused elementwise (Triton)"]["flop_floor_ms"] == 0.0


def test_gelu_passes_count_the_larger_of_bytes_and_issue_in_the_elementwise_floor():
    """At ViT-B's shapes, 47 / 58 instructions per element at an H200's issue rate (132 SMs at 1,860 MHz)
    take longer than the passes' bytes at 4.15 TB/s, so the floor grows by the difference; a GPU that
    issued ten times faster would leave it at the byte floor."""
    from benchmarks.sass import issue_rate
    from benchmarks.train import block_row_features, kernel_floors_ms
    from lease.configs import model_config

    cfg = model_config("vit_base")
    args = (cfg, 256, 128, 176, 80, 16384, {"matmul": 40.0, "attention": 1.0}, 800.0, 4150.0)
    instructions = {"forward": 47.0, "backward": 57.9}
    byte_only = kernel_floors_ms(*args)["fused elementwise (Triton)"]
    rate = issue_rate(132, 1860.0)
    with_issue = kernel_floors_ms(*args, rate, instructions)["fused elementwise (Triton)"]
    elements = 4 * block_row_features(cfg, 256, 128, 176)
    extra = sum(elements * (instructions[p] / rate - per_byte / 4150e9) * 1e3
                for p, per_byte in (("forward", 4.125), ("backward", 6.125)))
    assert extra > 1.0
    assert with_issue["floor_ms"] == pytest.approx(byte_only["floor_ms"] + extra, abs=0.02)
    assert with_issue["gelu_passes"]["forward"]["issue_floor_ms"] == pytest.approx(elements * 47.0 / rate * 1e3, abs=0.01)
    fast = kernel_floors_ms(*args, 10 * rate, instructions)["fused elementwise (Triton)"]
    assert fast["floor_ms"] == pytest.approx(byte_only["floor_ms"], abs=0.02)
    assert fast["parts_floor_ms"]["GELU passes"] == byte_only["parts_floor_ms"]["GELU passes"]


def test_elementwise_kernels_fall_into_the_passes_they_come_from_and_the_parts_floors_add_up():
    """Kernel names from an H200 profile (inductor names a kernel by its ops) by pass, and the parts'
    byte floors: LayerNorm 10r + 16.5 and GELU 41 bytes per block row and feature, the logits 6 bytes
    each, the gradient reductions nothing; measured over floor per part, none where the floor is 0."""
    from benchmarks.train import block_row_features, elementwise_part, kernel_floors_ms, parts_distance
    from lease.configs import model_config

    names = {"triton_per_fused__to_copy_add_mul_native_layer_norm_backward_view_36": "LayerNorm passes",
             "triton_per_fused___rshift____to_copy_add_arange_bitwise_and_mul_native_layer_norm_nativ":
                 "LayerNorm passes",
             "triton_poi_fused___rshift____to_copy_arange_bitwise_and_gelu_mul_unsqueeze_view_43": "GELU passes",
             "triton_poi_fused_gelu_gelu_backward_mul_view_34": "GELU passes",
             "triton_red_fused_gelu_gelu_backward_mul_sum_view_35": "gradient reductions",
             "triton_red_fused_stack_sum_view_67": "gradient reductions",
             "triton_per_fused__to_copy_mul_slice_sum_transpose_unbind_view_8": "gradient reductions",
             "triton_poi_fused__to_copy_cat_transpose_41": "other elementwise",
             "triton_red_fused__to_copy__unsafe_view_div_logsumexp_nll_loss_forward_69": "other elementwise"}
    assert {name: elementwise_part(name) for name in names} == names

    cfg = model_config("vit_base")
    parts = kernel_floors_ms(cfg, 256, 128, 176, 80, 16384, {}, 800.0, 4000.0)["fused elementwise (Triton)"][
        "parts_floor_ms"]
    features = block_row_features(cfg, 256, 128, 176)
    assert parts["LayerNorm passes"] == pytest.approx(56.5 * features / 4e12 * 1e3, abs=0.01)
    assert parts["GELU passes"] == pytest.approx(41 * features / 4e12 * 1e3, abs=0.01)
    assert parts["other elementwise"] == pytest.approx(6 * 256 * (80 * 16384 + 176 * cfg.vocab_gen) / 4e12 * 1e3,
                                                       abs=0.01)
    assert parts["gradient reductions"] == 0.0
    assert parts_distance({"GELU passes": 2 * parts["GELU passes"], "gradient reductions": 3.0}, parts) == {
        "GELU passes": 2.0, "gradient reductions": None}


def test_gelu_reference_kernels_count_the_erf_in_sass_for_sm90():
    """Compiled for sm_90 on this machine (Triton's ptxas and cuobjdump): the exact GELU's erf costs
    tens of instructions per element over the dropout-only pass, its backward more than its forward."""
    pytest.importorskip("triton")
    from benchmarks.sass import instructions_per_element

    counts = instructions_per_element(90)
    assert 10 < counts["dropout only"] < 25
    assert counts["forward"] - counts["dropout only"] > 20
    assert counts["backward"] > counts["forward"]


def test_gelu_reference_kernels_compute_the_models_gelu_and_dropout_through_the_interpreter(tmp_path):
    """The counted kernels do the model's arithmetic: nn.GELU() and the bit-packed dropout's mask and
    scale, forward and backward (Triton's interpreter in a subprocess, fp32)."""
    pytest.importorskip("triton")
    script = tmp_path / "gelu.py"
    script.write_text(GELU_INTERPRETER_CHECK)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors["forward"] < 1e-5 and errors["backward"] < 1e-5, errors  # fp32 at |x| up to about 12


GELU_INTERPRETER_CHECK = """
import json
import torch
import torch.nn.functional as F
from benchmarks import sass
from lease.dropout import unpack_bits

torch.manual_seed(0)
rows = sass.ROWS_PER_PROGRAM * 3
bits = torch.randint(0, 256, (rows,), dtype=torch.uint8)
keep = unpack_bits(bits, rows * 8).float()
x = torch.randn(rows * 8) * 3
dy = torch.randn(rows * 8)
y, dx = torch.empty_like(x), torch.empty_like(x)
grid = (3,)
sass.gelu_dropout_fwd_kernel[grid](x, bits, y, 1.25, ROWS=sass.ROWS_PER_PROGRAM)
sass.gelu_dropout_bwd_kernel[grid](x, bits, dy, dx, 1.25, ROWS=sass.ROWS_PER_PROGRAM)
xr = x.double().requires_grad_()
ref = F.gelu(xr) * keep.double() * 1.25
ref.backward(dy.double())
print(json.dumps({"forward": float((y.double() - ref).abs().max()),
                  "backward": float((dx.double() - xr.grad).abs().max())}))
"""


@pytest.mark.parametrize("contrast_on", ["encoder", "decoder", "both", "none"])
def test_useful_flops_equal_what_an_eager_step_executes(contrast_on):
    """flops_per_image against torch's FLOP counter on a real step that decodes every position: the
    same count but for the contrast rows the plan skips, so the MFU of a bench record neither flatters
    nor undersells (counted on 2 of the 4 images and scaled). Decoding the masked rows alone then
    executes fewer."""
    from benchmarks.train import executed_tflop
    from lease.configs import TrainConfig, model_config
    from lease.data import Batch
    from lease.model import flops_per_image
    from lease.synthetic import uniform_tokens
    from lease.train import Dist, Trainer, build_model

    codebook_size = 50
    codebook = torch.randn(codebook_size, 16) if contrast_on != "none" else None
    executed = {}
    for masked_only in (False, True):
        cfg = TrainConfig(preset="tiny", model=model_config("tiny", contrast_on=contrast_on,
                                                            decode_masked_only=masked_only), batch_size=4)
        trainer = Trainer(cfg, build_model(cfg, codebook), torch.device("cpu"), Dist(), steps_per_epoch=1)
        tokens = uniform_tokens(4, trainer.model.cfg.seq_len, trainer.model.cfg.vocab_gen, codebook_size, seed=0)
        executed[masked_only] = sum(executed_tflop(trainer, Batch(tokens.vq.long(), tokens.disc.long(),
                                                                  tokens.labels), count_images=2).values())
        assert all(p.grad is None for p in trainer.model.parameters())  # the count leaves no gradients
    cfg = trainer.model.cfg
    kept = cfg.seq_len - trainer.num_dropped
    useful = 4 * flops_per_image(cfg, kept, codebook_size) / 1e12
    # the encoder contrast runs on the plan's contrast rows alone (kept unmasked ones plus padding)
    skipped = 0.0
    if contrast_on in ("encoder", "both"):
        skipped_rows = kept - trainer.plan_at_mean_ratio(2).contrast_idx.shape[1]
        assert skipped_rows > 0  # the mean ratio masks some kept tokens
        skipped = 4 * 2 * skipped_rows * cfg.codebook_dim * (3 * cfg.embed_dim + 2 * codebook_size) / 1e12
    assert skipped < useful / 10
    assert executed[False] == pytest.approx(useful - skipped, rel=1e-9)
    if trainer.model.decodes_masked_only:
        assert executed[True] < useful


def test_gpu_sampler_summarises_what_its_command_prints_and_survives_without_one(tmp_path):
    """Medians of clock and power, and how often the power cap held the clocks down; a missing
    nvidia-smi (the CPU machines) or unreadable lines give no summary instead of an error."""
    import sys
    import time

    from benchmarks.train import GpuSampler

    done = tmp_path / "printed"
    printer = ("import pathlib, time\n"
               "for line in ['1875, 686.0, 0x0000000000000004', '1980, 565.0, 0x0000000000000000',"
               " '1695, 700.5, 0x0000000000000004', '[N/A], [N/A], [N/A]']:\n"
               "    print(line, flush=True)\n"
               f"pathlib.Path({str(done)!r}).touch()\n"
               "time.sleep(60)\n")
    sampler = GpuSampler()
    sampler.command = [sys.executable, "-c", printer]
    with sampler:  # stops the child on exit, as it stops nvidia-smi's endless loop
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sampler.summary() == {"samples": 3, "sm_clock_mhz_median": 1875.0, "power_w_median": 686.0,
                                 "power_capped_fraction": 0.667}

    missing = GpuSampler()
    missing.command = ["lease-no-such-nvidia-smi"]
    with missing:
        pass
    assert missing.summary() is None


def test_a_non_finite_timed_step_voids_the_record():
    """NaN arithmetic runs at other speeds and power than training: such timings must not be recorded."""
    assert finite_metrics({"loss": torch.tensor(8.06), "grad_norm": torch.tensor(0.8)}) == {"loss": 8.06,
                                                                                          "grad_norm": 0.8}
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="non-finite"):
            finite_metrics({"loss": torch.tensor(8.06), "grad_norm": torch.tensor(bad)})


def test_a_graph_compiled_inside_the_timed_block_is_refused():
    """`lease bench train` times its steps inside `no_compilation`: a new input shape there recompiles."""
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="aot_eager")
    double(torch.ones(4))
    with no_compilation("the timed steps"):
        double(torch.ones(4))  # the warmed-up shape: no compile
    with pytest.raises(RuntimeError, match="1 new graph.*timed steps.*--warmup"):
        with no_compilation("the timed steps"):
            double(torch.ones(5))


def test_records_name_the_kernel_switches_set_in_the_environment(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", "0")
    monkeypatch.setenv("LEASE_UNRELATED", "1")
    env = machine_info()["env"]
    assert env["TORCHINDUCTOR_MIX_ORDER_REDUCTION"] == "0" and "LEASE_UNRELATED" not in env


def test_sorcen_useful_flops_count_teacher_projector_and_predictor():
    """flops_per_image of Sorcen against torch's FLOP counter on an eager step: the student's matmuls,
    the teacher's forward on [CLS] + echo and both projectors and the predictor; all that differs are
    the batch's B × B logits (InfoNCE: forward and the student side's gradient; uniformity: forward and
    both sides' gradients), which the count leaves out."""
    from benchmarks.train import executed_tflop
    from lease.configs import train_config
    from lease.data import Batch
    from lease.model import flops_per_image
    from lease.synthetic import uniform_tokens
    from lease.train import Dist, Trainer, build_model

    b = 4
    cfg = train_config({"preset": "tiny", "method": "sorcen", "batch_size": b,
                        "model": {"projector_hidden": 48, "projector_dim": 24, "predictor_hidden": 40}})
    trainer = Trainer(cfg, build_model(cfg, None), torch.device("cpu"), Dist(), steps_per_epoch=1)
    m = trainer.model.cfg
    tokens = uniform_tokens(b, m.seq_len, m.vocab_gen, 1, seed=0)
    executed = sum(executed_tflop(trainer, Batch(tokens.vq.long(), None, tokens.labels), count_images=b).values())
    batch_logits = b * b * (4 * m.projector_dim + 6 * m.embed_dim) / 1e12
    useful = b * flops_per_image(m, m.seq_len - trainer.num_dropped, 0) / 1e12
    assert executed == pytest.approx(useful + batch_logits, rel=1e-9)


def test_methods_record_holds_each_rate_and_lease_over_the_others(tmp_path, caplog):
    """`lease bench train --method ...` on the CPU with a tiny model and VQGAN, 2 steps each: one record
    with every method's images/s and peak memory, and the ratios computed from those rates. Each run
    logs its first step's time (a long compile shows in the log) before timing, and records it."""
    import json
    import logging

    caplog.set_level(logging.INFO, logger="benchmarks.train")
    from benchmarks.train import bench_methods, methods_record_name
    from benchmarks.records import write_record
    from lease.tokenizers.vqgan_maskgit import MaskGITVQGANConfig

    methods = ["lease", "sorcen", "mage", "mage_online"]
    vqgan = MaskGITVQGANConfig(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=64,
                               resolution=64)  # f4: 16 × 16 codes, the tiny preset's grid
    result = bench_methods(methods, preset="tiny", batch_size=4, dtype="fp32", compile=False, steps=2, warmup=1,
                           codebook_size=16, codebook_dim=8, device="cpu", vqgan=vqgan,
                           model_overrides={"vocab_gen": 64, "projector_hidden": 32,
                                            "projector_dim": 16, "predictor_hidden": 32})
    assert result["methods"] == methods and set(result["runs"]) == set(methods)
    rates = result["images_per_s"]
    for method, run in result["runs"].items():
        assert run["method"] == method and run["batch_size"] == 4 and run["steps_timed"] == 2
        assert rates[method] == run["images_per_s"] > 0 and result["peak_memory_gib"][method] is None  # CPU
        assert (run["last_step_metrics"].get("uniformity_loss") is not None) == (method == "sorcen")
        assert run["first_step_s"] > 0
        assert f"{method} tiny b4: first step {run['first_step_s']:.1f} s; 0 more warm-up steps, then 2 timed" \
            in caplog.text
    assert result["ratios"] == {f"lease/{m}": round(rates["lease"] / rates[m], 4) for m in methods[1:]}
    name = methods_record_name(methods, "train-tiny-b4-fp32-eager")
    assert name == "methods-lease-sorcen-mage-mage_online-tiny-b4-fp32-eager"
    write_record(name, {"results": result}, tmp_path)
    assert json.loads((tmp_path / f"{name}.json").read_text())["results"]["ratios"] == result["ratios"]
    table = results_table(tmp_path)
    assert "train mage_online tiny b4 fp32 eager" in table and "lease/mage_online" in table


def test_a_long_epochs_rate_leaves_out_what_every_epoch_pays_once():
    from benchmarks.evaluation import marginal_rate

    fill, per_step, batch = 5.0, 0.5, 1024  # seconds to start the workers, then seconds per step
    rate = marginal_rate({40: fill + 40 * per_step, 8: fill + 8 * per_step}, batch)
    assert rate["images_per_s"] == pytest.approx(batch / per_step, rel=1e-6)
    assert rate["epoch_fill_seconds"] == pytest.approx(fill, abs=1e-3)
    assert list(rate["epoch_seconds"]) == ["8", "40"]


def test_records_name_the_bench_command_however_it_was_started(tmp_path, monkeypatch):
    import json
    import sys

    from benchmarks.records import write_record

    for argv in (["lease", "bench", "eval", "--time-loaders"], ["-m", "eval", "--time-loaders"]):
        monkeypatch.setattr(sys, "argv", argv)
        path = write_record("eval-x", {"results": {}}, tmp_path)
        assert json.loads(path.read_text())["command"] == "lease bench eval --time-loaders"


def test_a_record_names_the_commit_given_for_a_copied_tree(monkeypatch):
    import subprocess

    assert machine_info()["lease_commit"].split("+")[0] == subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("LEASE_COMMIT", "abc1234+dirty")  # a GPU machine's copy, whose .git is not this tree's
    assert machine_info()["lease_commit"] == "abc1234+dirty"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_profiled_train_record_holds_the_floors_and_the_elementwise_breakdown(tmp_path):
    """`lease bench train --profile` on the GPU (tiny preset, eager): the profile text lists the
    elementwise parts, and the record the GELU passes' instruction counts for this GPU and each part's
    floor."""
    from benchmarks.train import ELEMENTWISE, bench_train

    profile = tmp_path / "tiny.profile.txt"
    result = bench_train("tiny", 8, "bf16", False, steps=200, warmup=2, codebook_size=64, codebook_dim=16,
                         profile_to=profile)  # enough steps for nvidia-smi's clock samples, which the issue rate needs
    assert result["gpu_during_timed_steps"] is not None
    assert f"{ELEMENTWISE}, by passes:" in profile.read_text()
    elementwise = result["kernel_floors"][ELEMENTWISE]
    assert elementwise["gelu_passes"]["forward"]["instructions_per_element"] > 20
    assert isinstance(result["profile_elementwise_ms_per_step"], dict)
