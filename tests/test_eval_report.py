"""The evaluation report renders with every figure present, beside the paper's numbers."""
import json
import re

import pytest
import torch
from PIL import Image

from lease.evaluate import report
from lease.evaluate.grids import save_image_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RESULTS = {
    "knn": {"top1": 61.234, "top5": 80.5, "k": 20, "temperature": 0.07},
    "linear_probe": {"top1": 75.01, "top5": 92.3},
    "fewshot": {"shots": {"5": {"top1": 50.0, "std": 0.4}, "25": {"top1": 66.0, "std": 0.1}}, "average": 58.0},
    "fid": {"fid": 10.5, "isc_mean": 88.1, "isc_std": 1.2, "num_generated": 50000},
}


@pytest.fixture
def run_dir(tmp_path):
    rows = [{"step": s, "loss": 6.0 - s / 100, "rec_loss": 5.5 - s / 100, "contrast_loss": 5.0 - s / 200,
             "lr": 1e-4 * min(1.0, s / 50), "images_per_s": 900.0} for s in range(0, 200, 10)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = {"codebook_utilisation": {"gen": 0.97, "disc": 0.88}, "entropy": {"H_gen": 6.5, "H_disc": 9.1},
             "conditional_entropy": {"H_gen_given_disc": 2.2, "H_disc_given_gen": 4.8},
             "histogram_gen": [3, 1, 4, 1, 5], "num_tokens": 51200}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    grids = {}
    for name in ("samples", "reconstruction", "inpainting", "outpainting"):
        grids[name] = save_image_grid(torch.rand(4, 3, 8, 8), tmp_path / "eval" / f"{name}.png", nrow=2)
    for name, result in RESULTS.items():
        (tmp_path / "eval" / report.RESULT_FILES[name]).write_text(json.dumps(result))
    return tmp_path, grids


def test_report_renders_with_every_figure(run_dir):
    root, grids = run_dir
    path = report.write_report(root / "report", RESULTS, root / "metrics.jsonl", root / "stats.json", grids)
    text = path.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    expected = {"figures/loss_curves.png", "figures/codebook_stats.png"} | {f"figures/{n}.png" for n in grids}
    assert set(linked) == expected
    for rel in linked:
        assert (path.parent / rel).read_bytes().startswith(PNG_MAGIC)
    for name, grid in grids.items():
        assert (path.parent / "figures" / f"{name}.png").read_bytes() == grid.read_bytes()
    for plot in ("loss_curves", "codebook_stats"):
        with Image.open(path.parent / "figures" / f"{plot}.png") as img:
            assert img.size[0] > 600 and img.size[1] > 200
    # our numbers beside the paper's (tables 1, 2, 5)
    # (results without eval_protocol come from the cached-token commands: protocol fast)
    fast = "[fast: cached centre-crop tokens]"
    assert f"| k-NN top-1 (k=20, T=0.07) {fast} | 61.23 | 62.60 | table 5 (IN-1K val) |" in text
    assert f"| linear probe top-1 {fast} | 75.01 | 76.7 | table 1 |" in text
    assert f"| 5-shot top-1 (mean ± std over seeds) {fast} | 50.00 ± 0.40 | 51.00 | table 2 |" in text
    assert "| few-shot average | 58.00 | 59.65 | table 2 |" in text
    assert "| FID (50000 samples) | 10.50 | 9.62 |" in text and "| Inception Score | 88.10 ± 1.20 | 91.78 |" in text
    assert "| codebook_utilisation.disc | 0.88 |" in text and "histogram_gen" not in text


def test_report_cli_collects_results_and_grids(run_dir):
    root, _ = run_dir
    assert report.main(["--eval-dir", str(root / "eval"), "--metrics", str(root / "metrics.jsonl"),
                        "--stats", str(root / "stats.json"), "--out", str(root / "out")]) == 0
    text = (root / "out" / "report.md").read_text()
    assert text.count("![") == 6 and "76.7" in text


def test_bad_metrics_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        report.read_metrics_jsonl(tmp_path / "metrics.jsonl")


def test_a_caveat_heads_the_report_and_captions_every_image_grid(run_dir):
    root, grids = run_dir
    caveat = "demo tokenizers: random weights — codes carry no meaning"
    text = report.write_report(root / "report", RESULTS, root / "metrics.jsonl", grids=grids,
                               title="LEASE evaluation (demo)", caveat=caveat).read_text()
    assert text.splitlines()[0] == f"# LEASE evaluation (demo) — {caveat}"
    captions = re.findall(r"^### (.+)$", text, re.M)
    assert sorted(c for c in captions if caveat in c) == sorted(f"{n.capitalize()} ({caveat})" for n in grids)
    assert "Training loss curves" in captions  # a figure of the run itself, not of the tokenizers' codes
