"""`lease bench numerics`: the harness adds no noise of its own, and tells a real change from none."""
import dataclasses
import json

import pytest
import torch

from benchmarks.cli import main as bench_main
from benchmarks.numerics import (
    NumericsRun,
    compare,
    finished_part,
    late_gap,
    plot_curves,
    smoothed,
    train_and_evaluate,
    train_config_for,
)
from benchmarks.train import results_table
from lease.configs import model_config
from lease.synthetic import planted_codebook, planted_token_set
from lease.typed_config import ConfigError

TINY = NumericsRun(preset="tiny", batch_size=8, steps=40, dtype="fp32", compile=False, batches_per_epoch=4,
                   heldout_batches=2, codebook_dim=16)

TINY_CLI = NumericsRun(preset="tiny", batch_size=8, steps=40, dtype="fp32", compile=False)  # the CLI's run


def test_smoothing_and_gap():
    curve = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert torch.allclose(smoothed(curve, 2), torch.tensor([1.0, 2.0, 4.0, 6.0], dtype=torch.float64))
    assert late_gap(curve, curve + 0.5, 2) == pytest.approx(0.5)
    assert late_gap(curve, curve, 2) == 0.0


def test_training_twice_from_one_seed_gives_the_same_curve():
    """What makes 'switched vs baseline' meaningful: the same config and seed reproduce bit for bit."""
    run = NumericsRun(preset="tiny", batch_size=8, steps=6, dtype="fp32", compile=False, codebook_dim=16)
    cfg = model_config(run.preset)
    tokens = planted_token_set(32, 5, cfg.seq_len, cfg.vocab_gen, run.synonyms, seed=0)
    heldout = planted_token_set(16, 5, cfg.seq_len, cfg.vocab_gen, run.synonyms, seed=1)
    centroids = torch.from_numpy(planted_codebook(cfg.vocab_gen // run.synonyms, run.codebook_dim, seed=0))
    first, second = (train_and_evaluate(train_config_for(run, {}, seed=0), tokens, heldout, centroids,
                                        torch.device("cpu")) for _ in range(2))
    assert torch.equal(first[0], second[0]) and first[1] == second[1]


def test_a_real_change_shows_and_a_seed_change_is_the_yardstick(tmp_path):
    result = compare(TINY, {"dropout": 0.3}, torch.device("cpu"))
    assert set(result["curves"]) == {"baseline", "baseline, next seed", "switched"}
    assert all(len(c) == TINY.steps for c in result["curves"].values())
    assert result["curves"]["switched"][0] != result["curves"]["baseline"][0]  # other dropout from step 0
    assert result["gap_switched_vs_baseline"] > 0 and result["gap_next_seed_vs_baseline"] > 0
    assert result["heldout_gap_switched"] > 0 and result["heldout_gap_next_seed"] > 0
    png = plot_curves(result["curves"], TINY.smooth, "a title", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_a_bad_switch_before_training(tmp_path):
    with pytest.raises(ConfigError, match="residual_dtype"):
        bench_main(["numerics", "--preset", "tiny", "--out-dir", str(tmp_path), "--model", "residual_dtype=fp8"])
    with pytest.raises(SystemExit, match="--steps"):
        bench_main(["numerics", "--preset", "tiny", "--steps", "10", "--model", "residual_dtype=autocast"])
    assert not list(tmp_path.iterdir())


def test_cli_writes_record_plot_and_table_row_in_one_call_or_split(tmp_path):
    """residual_dtype=autocast without autocast (fp32) is the same computation: zero gaps, bit for bit.
    `--runs` trains a subset and saves it; the call that completes the three writes the same record as
    one call and removes the saved parts; a part trained with other settings is not reused."""
    args = ["numerics", "--preset", "tiny", "--batch-size", "8", "--steps", "40", "--dtype", "fp32",
            "--compile", "off", "--model", "residual_dtype=autocast"]
    name = "numerics-tiny-b8-fp32-residual_dtype_autocast"
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert bench_main([*args, "--out-dir", str(whole)]) == 0
    result = json.loads((whole / f"{name}.json").read_text())["results"]
    assert result["curves"]["switched"] == result["curves"]["baseline"]
    assert result["gap_switched_vs_baseline"] == 0 and result["heldout_gap_switched"] == 0
    assert result["heldout_gap_next_seed"] > 0
    assert (whole / f"{name}.png").stat().st_size > 0
    assert "loss with residual_dtype=autocast: tiny b8 fp32, 40 steps" in results_table(whole)
    assert bench_main([*args, "--out-dir", str(split), "--runs", "switched", "baseline"]) == 0
    parts = split / f"{name}.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["baseline.json", "switched.json"]
    assert not (split / f"{name}.json").exists()
    saved = json.loads((parts / "baseline.json").read_text())
    assert finished_part(parts / "baseline.json", TINY_CLI, {}, 0) is not None
    assert finished_part(parts / "baseline.json", dataclasses.replace(TINY_CLI, steps=41), {}, 0) is None
    assert finished_part(parts / "baseline.json", TINY_CLI, {}, 1) is None
    assert len(saved["curve"]) == 40
    assert bench_main([*args, "--out-dir", str(split), "--runs", "next-seed"]) == 0
    want, got = (json.loads((d / f"{name}.json").read_text())["results"] for d in (whole, split))
    assert got == want and not parts.exists()
