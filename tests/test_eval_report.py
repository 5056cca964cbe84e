"""The report as the paper's tables: like with like, missing inputs as reasons, the codebook's handful of
statistics, readable figures and grids, and the report stage's own cache key."""
import json
import re
from dataclasses import replace
from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import Image

from lease.evaluate import paper, report
from lease.evaluate.grids import LABEL_CELL, header_layout, save_comparison_grid, save_image_grid
from lease.evaluate.report import ReportInputs, RunFacts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CAVEAT = "demo tokenizers: random weights — codes carry no meaning"
PAPER_RUN = RunFacts(name="in1k_vitb", source="/data/imagenet", images={"train": 1_281_167, "val": 50_000},
                     classes=1000, model="vit_base", embed_dim=768, depth=12, method="lease", epochs=1600,
                     contrast_on="encoder")
DEMO_RUN = RunFacts(name="demo", source="demo", images={"train": 240, "val": 80}, classes=10, model="tiny",
                    embed_dim=64, depth=2, method="lease", epochs=8, contrast_on="encoder", caveat=CAVEAT)
RESULTS = {
    "knn.json": {"top1": 61.234, "top5": 80.5, "k": 20, "temperature": 0.07, "eval_protocol": "fast"},
    "linear_probe.json": {"top1": 75.01, "top5": 92.3, "eval_protocol": "authors"},
    "fewshot.json": {"shots": {"5": {"top1": 50.0, "std": 0.4}, "10": {"top1": 58.0, "std": 0.3},
                               "13": {"top1": 61.0, "std": 0.2}, "25": {"top1": 66.0, "std": 0.1}},
                     "average": 58.75, "eval_protocol": "authors"},
    "fid.json": {"fid": 10.5, "isc": 88.1, "isc_std": 1.2, "samples": 50000, "protocol": "mage",
                 "extractor": "/ckpt/pt_inception-2015-12-05.pth", "missing": None},
    "finetune.json": {"top1": 82.1, "top5": 95.9, "epochs": 100, "protocol": "authors"},
}
EVAL_SETS = {
    "cifar10": {"role": "transfer", "images": 60000, "linear_probe_top1": 70.0, "fewshot": {"4": 30.0, "8": 40.0}},
    "flowers": {"role": "transfer", "images": 8189, "linear_probe_top1": 80.0, "fewshot": None},
    "imagenet_r": {"role": "robustness", "images": 30000, "knn_top1": 20.0},
    "imagenet-c": {"role": "robustness", "images": 50000, "knn_top1": 24.0, "severities": {"4": 26.0, "5": 19.0}},
}


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def run_dir(tmp_path):
    """A run's inputs as the stages leave them: evaluate results and grids, evaluation sets, stats, metrics."""
    rows = [{"step": s, "loss": 6.0 - s / 100, "rec_loss": 5.5 - s / 100, "contrast_loss": 5.0 - s / 200,
             "lr": 1e-4 * min(1.0, s / 50)} for s in range(0, 200, 10)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from pipeline.stats import token_statistics  # the pack stage's real stats.json layout

    rng = np.random.default_rng(0)
    write_json(tmp_path / "pack" / "stats.json", token_statistics(rng.integers(0, 64, (40, 16)),
                                                                   rng.integers(0, 32, (40, 16)), 64, 32))
    for name, result in RESULTS.items():
        write_json(tmp_path / "eval" / name, result)
    for name in ("samples", "reconstruction", "inpainting", "outpainting"):
        save_image_grid(torch.rand(4, 3, 8, 8), tmp_path / "eval" / f"{name}.png", nrow=2)
    sets = {}
    for name, result in EVAL_SETS.items():
        sets[name] = write_json(tmp_path / f"eval-{name}" / "result.json",
                                {"name": name, "protocol": "authors", "note": None, **result}).parent
    inputs = ReportInputs(eval_dir=tmp_path / "eval", eval_sets=sets, metrics_jsonl=tmp_path / "metrics.jsonl",
                          stats_json=tmp_path / "pack" / "stats.json")
    return tmp_path, inputs


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell (the metric), each as its cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0]] = cells
    return rows


def test_paper_numbers_stand_beside_ours_only_for_the_papers_setting_and_protocol(run_dir):
    root, inputs = run_dir
    same = table_rows(report.write_report(root / "same", inputs, PAPER_RUN)["report"].read_text())
    # metric | ours | protocol | paper (like for like) | paper, for reference | source
    assert same["linear probe top-1"][1:] == ["75.01", "authors (authors' scripts: online augmented views)", "76.70",
                                              "–", "table 1 (LEASE)"]
    assert same["FID (unconditional)"][3] == "9.62" and same["Inception Score"][1:4:2] == ["88.10 ± 1.20", "91.78"]
    assert same["fine-tuned top-1"][3] == "82.70" and same["this run's val split: k-NN top-1"][3] == "62.60"
    assert same["average over 5, 10, 13, 25 shots"][1:5:3] == ["58.75", "–"]

    other = report.write_report(root / "demo", inputs, DEMO_RUN)["report"].read_text()
    rows = table_rows(other)
    assert rows["linear probe top-1"][3] == "–"
    assert rows["linear probe top-1"][4] == "76.70 (run differs: data, model, schedule)"
    assert "- data: demo data (generated), 240 train / 80 val images, 10 classes; the paper's is ImageNet-1K" in other
    # the paper's setting measured with another protocol: reference only, saying which
    fast = {**RESULTS["linear_probe.json"], "eval_protocol": "fast"}
    write_json(inputs.eval_dir / "linear_probe.json", fast)
    rows = table_rows(report.write_report(root / "fast", inputs, PAPER_RUN)["report"].read_text())
    assert rows["linear probe top-1"][3:5] == ["–", "76.70 (protocol fast, the paper's: authors' scripts)"]
    # a method the paper lacks is compared with no row; Sorcen with Sorcen's
    assert "method: `mage` has no row" in report.write_report(root / "m", inputs, replace(PAPER_RUN, method="mage"))[
        "report"].read_text()
    sorcen = table_rows(report.write_report(root / "s", inputs, replace(PAPER_RUN, method="sorcen"))["report"]
                        .read_text())
    assert sorcen["FID (unconditional)"][3:] == ["9.61", "–", "table 1 (Sorcen)"]


def test_fid_is_like_for_like_only_with_the_mage_preset_50k_samples_and_real_inception(run_dir):
    root, inputs = run_dir
    write_json(inputs.eval_dir / "fid.json", {**RESULTS["fid.json"], "samples": 5000,
                                              "extractor": "demo (random weights)"})
    rows = table_rows(report.write_report(root / "r", inputs, PAPER_RUN)["report"].read_text())
    assert rows["FID (unconditional)"][3] == "–"
    assert rows["FID (unconditional)"][4] == ("9.62 (5000 samples, the paper's 50,000; demo Inception extractor "
                                              "(random weights))")


def test_fewshot_averages_are_compared_over_the_same_shot_counts_only(run_dir):
    root, inputs = run_dir
    write_json(inputs.eval_dir / "fewshot.json", {"shots": {"2": {"top1": 30.0, "std": 0.0},
                                                            "5": {"top1": 50.0, "std": 0.0},
                                                            "10": {"top1": 60.0, "std": 0.0}},
                                                  "average": 46.67, "eval_protocol": "authors"})
    text = report.write_report(root / "r", inputs, PAPER_RUN)["report"].read_text()
    rows = table_rows(text)
    own = rows["average over this run's 2, 5, 10 shots"]
    assert own[1] == "46.67" and own[3:5] == ["not reported for these shots", "–"]
    both = rows["average over the shots both have (5, 10)"]
    assert both[1] == "55.00" and both[3] == f"{(51.00 + 59.39) / 2:.2f}"
    # the paper's average over its 4 shot counts stands beside none of ours
    assert not any("59.65" in cells[3] for cells in rows.values() if len(cells) == 6)


def test_fewshot_counts_a_small_split_could_not_fill_are_named_in_the_report(run_dir):
    root, inputs = run_dir
    reason = "3 of 4 classes have fewer than 5 training samples (class 1 has 4)"
    write_json(inputs.eval_dir / "fewshot.json", {"shots": {"2": {"top1": 30.0, "std": 0.0}}, "average": 30.0,
                                                  "skipped_shots": {"5": reason}, "eval_protocol": "fast"})
    text = report.write_report(root / "r", inputs, PAPER_RUN)["report"].read_text()
    assert table_rows(text)["2-shot top-1 (mean ± std over seeds)"][1] == "30.00 ± 0.00"
    assert f"5-shot skipped: {reason} (evaluate.fewshot.on_short_class=skip)." in text
    write_json(inputs.eval_dir / "fewshot.json", {"shots": {}, "average": None, "skipped_shots": {"5": reason},
                                                  "eval_protocol": "fast"})
    text = report.write_report(root / "n", inputs, PAPER_RUN)["report"].read_text()
    assert table_rows(text)["few-shot top-1"][1] == f"not measured: 5-shot skipped: {reason}"


def test_transfer_and_robustness_sets_meet_the_papers_columns(run_dir):
    root, inputs = run_dir
    rows = table_rows(report.write_report(root / "r", inputs, PAPER_RUN)["report"].read_text())
    c8, c9 = paper.TABLES["C.8"]["rows"]["LEASE"]["cifar10"], paper.TABLES["C.9"]["rows"]["LEASE"]["cifar10"]
    assert rows["cifar10: 8-shot top-1"][1:] == ["40.00", rows["cifar10: 8-shot top-1"][2], f"{c8:.2f}", "–",
                                                 "table C.8 (LEASE)"]
    assert rows["cifar10: 4-shot top-1"][3] == f"{c9:.2f}"
    # table 4 is the 16-shot probe: beside the full probe it is for reference only
    assert rows["cifar10 (60,000 images): linear probe top-1"][3:5] == [
        "–", "81.21 (table 4 is the 16-shot probe (supplement §C), this the full-train-set probe)"]
    assert rows["flowers (8,189 images): linear probe top-1"][3:6] == ["–", "–", ""]  # no such column in the paper
    assert rows["imagenet_r (30,000 images): k-NN top-1"][1:4:2] == ["20.00", "28.04"]
    assert rows["imagenet-c-s4 (50,000 images): k-NN top-1"][3] == "30.24"
    assert rows["imagenet-c-s5 (50,000 images): k-NN top-1"][3] == "20.39"


def test_missing_inputs_are_one_line_reasons_not_exceptions(tmp_path):
    (tmp_path / "eval").mkdir()
    write_json(tmp_path / "eval" / "fid.json", {"fid": None, "isc": None, "samples": 0, "protocol": "mage",
                                                "extractor": "", "missing": "evaluate.fid.inception: give the "
                                                                            "Inception weights file"})
    (tmp_path / "eval-sketch").mkdir()
    (tmp_path / "eval-broken").mkdir()
    (tmp_path / "eval-broken" / "result.json").write_text("{not json")
    inputs = ReportInputs(eval_dir=tmp_path / "eval", eval_sets={"objectnet": None, "sketch": tmp_path / "eval-sketch",
                                                                 "broken": tmp_path / "eval-broken"},
                          condgen=True, metrics_jsonl=tmp_path / "none.jsonl", stats_json=tmp_path / "none.json")
    written = report.write_report(tmp_path / "r", inputs, DEMO_RUN)
    text = written["report"].read_text()
    rows = table_rows(text)
    assert rows["FID (unconditional)"][1] == "not measured: evaluate.fid.inception: give the Inception weights file"
    assert rows["linear probe top-1"][1] == f"not measured: no linear_probe.json in {tmp_path / 'eval'}"
    assert rows["fine-tuned top-1"][1].startswith("not measured: fine-tuning did not run (no finetune.json")
    assert rows["objectnet"][1] == "not measured: evaluation set objectnet: no directory for it in this run"
    assert rows["sketch"][1] == f"not measured: no result.json in {tmp_path / 'eval-sketch'}"
    assert rows["broken"][1].startswith(f"not measured: {tmp_path / 'eval-broken' / 'result.json'} is unreadable")
    assert rows["FID (class-conditional)"][1].startswith("not measured: class-conditional generation: no directory")
    assert f"Not available: no none.json in {tmp_path}" in text
    assert f"- loss curves: no metrics.jsonl ({tmp_path / 'none.jsonl'})" in text
    assert json.loads(written["metrics"].read_text())[0]["table"] == "1"


def test_codebook_table_shows_the_handful_of_statistics_and_links_the_full_json(run_dir):
    root, inputs = run_dir
    out = report.write_report(root / "r", inputs, DEMO_RUN)["report"]
    text = out.read_text()
    section = text.split("## Codebook statistics (pack stage)")[1].split("##")[0]
    stats = json.loads(inputs.stats_json.read_text())
    names = [cells[0] for cells in table_rows(section).values()][1:]  # without the header
    assert names == ["utilisation, generative (VQGAN)", "utilisation, discriminative (k-means)",
                     "perplexity, generative", "perplexity, discriminative", r"H(gen \| disc)", r"H(disc \| gen)"]
    rows = table_rows(section)
    assert rows[r"H(gen \| disc)"][1] == f"{stats['entropy_nats']['gen_given_disc']:.3f} nats"
    used = stats["codes_used"]["disc"]
    assert rows["utilisation, discriminative (k-means)"][1] == \
        f"{100 * stats['codebook_utilisation']['disc']:.1f} % ({used} of 32 codes)"
    assert "[stats.json](stats.json)" in section and json.loads((out.parent / "stats.json").read_text()) == stats
    assert "histograms" not in table_rows(section) and "codebook_utilisation.disc" not in text


def drawn_texts(fig) -> list:
    """The texts a reader sees: titles, axis labels, the tick labels inside the view, offsets, legends."""
    texts = []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()]
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            texts += [tick.label1 for tick in axis.get_major_ticks() if low <= tick.get_loc() <= high]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def texts_overlap(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # what savefig draws with
    canvas.draw()
    boxes = [(t.get_text(), t.get_window_extent(canvas.get_renderer())) for t in drawn_texts(fig)]
    return [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]


@pytest.mark.parametrize("steps", [[4], [2, 4], list(range(0, 400, 2))])
def test_loss_curves_are_labelled_and_drawn_even_for_a_short_run(steps):
    rows = [{"step": s, "loss": 6.0 - s / 1000, "rec_loss": 5.0, "lr": 1e-4} for s in steps]
    fig = report.loss_figure(rows)
    losses, lr = fig.axes
    assert losses.get_xlabel() == lr.get_xlabel() == "optimizer step"
    assert "nats" in losses.get_ylabel() and lr.get_ylabel() == "learning rate"
    assert [line.get_label() for line in losses.lines] == ["loss", "rec loss"]
    assert all(len(line.get_xdata()) == len(steps) for line in losses.lines + lr.lines)
    marked = len(steps) <= report.FEW_POINTS
    assert all((line.get_marker() not in (None, "None", "")) == marked for line in losses.lines + lr.lines)
    left, right = losses.get_xlim()
    assert right - left >= 1  # a single logged step still gets a visible span
    assert texts_overlap(fig) == []


def test_comparison_grid_columns_are_labelled_and_fit_their_columns(tmp_path):
    labels = ["input image", "VQGAN tokens decoded", "masked (grey: regenerated)", "completion"]
    images = [torch.rand(2, 3, 8, 8) for _ in labels]
    path = save_comparison_grid(images, tmp_path / "grid.png", labels=labels)
    height, placed = header_layout(labels, LABEL_CELL, 2)
    with Image.open(path) as img:  # 8 px images upscaled so the names fit; a header above two rows
        assert img.size == (4 * LABEL_CELL + 5 * 2, height + 2 * LABEL_CELL + 3 * 2)
        header = np.asarray(img)[:height]
    from PIL import ImageFont

    for column, label in enumerate(labels):
        words = [text for x, y, text, size in placed if 2 + column * (LABEL_CELL + 2) <= x]
        assert label.split()[0] in " ".join(words)
    for x, y, text, size in placed:  # every line inside its column, no two lines on one spot
        width = ImageFont.load_default(size=size).getlength(text)
        column = (x - 2) // (LABEL_CELL + 2)
        assert 2 + column * (LABEL_CELL + 2) <= x and x + width <= 2 + column * (LABEL_CELL + 2) + LABEL_CELL
    assert len({(x // (LABEL_CELL + 2), y) for x, y, *_ in placed}) == len(placed)
    assert (header < 128).any()  # the labels are drawn
    with pytest.raises(ValueError, match="3 labels for 4 columns"):
        save_comparison_grid(images, tmp_path / "bad.png", labels=labels[:3])


def test_figures_and_grids_are_in_the_report_with_the_caveat_on_every_grid(run_dir):
    root, inputs = run_dir
    inputs.token_usage_png = save_image_grid(torch.rand(1, 3, 8, 8), root / "pack" / "token_usage.png")
    inputs.condgen, inputs.condgen_dir = True, root / "condgen"
    save_image_grid(torch.rand(4, 3, 8, 8), inputs.condgen_dir / "class-3.png", nrow=2)
    path = report.write_report(root / "r", inputs, DEMO_RUN)["report"]
    text = path.read_text()
    assert text.splitlines()[0] == ("# LEASE evaluation: run `demo` on demo data (generated), 240 train / 80 val "
                                    f"images, 10 classes — {CAVEAT}")
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(linked) == {"figures/loss_curves.png", "figures/token_usage.png", "figures/class-3.png"} | \
        {f"figures/{n}.png" for n in ("samples", "reconstruction", "inpainting", "outpainting")}
    assert all((path.parent / rel).read_bytes().startswith(PNG_MAGIC) for rel in linked)
    captions = re.findall(r"^### (.+)$", text, re.M)
    grids = [c for c in captions if c.split(" — ")[0] in ("Samples", "Reconstruction", "Inpainting", "Outpainting")]
    assert len(grids) == 4 and all(CAVEAT in c for c in grids)
    assert "Training loss curves" in captions  # a figure of the run itself, not of the tokenizers' codes
    described = dict(re.findall(r"^### (.+)\n\n(.+)\n\n!\[", text, re.M))  # caption -> its description
    assert described[f"Reconstruction — {CAVEAT}"] == (
        "Columns: input image | its VQGAN tokens decoded | 50 % of the tokens masked (grey) | the model's completion. "
        "Demo tokenizers: random weights — codes carry no meaning.")
    assert described[f"Class 3 — {CAVEAT}"] == "Class-conditional samples of class 3. " \
                                              "Demo tokenizers: random weights — codes carry no meaning."
    assert len(described) == len(captions) == 7
    for description in described.values():  # whole sentences: each begun with a capital or a number, and ended
        assert description.endswith("."), description
        assert all(s[0].isupper() or s[0].isdigit() for s in description.split(". ")), description
    with Image.open(path.parent / "figures" / "loss_curves.png") as img:
        assert img.size[0] > 600 and img.size[1] > 200


def test_table_7_from_condgen_and_table_8_only_for_an_ablation_run(run_dir):
    root, inputs = run_dir
    inputs.condgen = True
    inputs.condgen_dir = write_json(root / "condgen" / "condgen.json", {
        "fid": 4.1, "isc": 170.0, "samples_per_class": 50, "classes": 1000, "guidance": 2.0, "tail": "centroids",
        "extractor": "/ckpt/pt_inception-2015-12-05.pth", "missing": None}).parent
    rows = table_rows(report.write_report(root / "a", inputs, PAPER_RUN)["report"].read_text())
    assert rows["FID (class-conditional)"][1:6:2] == ["4.10", "3.72", "table 7 (LEASE)"]
    assert "## Table 8" not in (root / "a" / "report.md").read_text()
    text = report.write_report(root / "b", inputs, replace(PAPER_RUN, contrast_on="decoder", epochs=400))[
        "report"].read_text()
    table8 = table_rows(text.split("## Table 8")[1])
    # table 8's runs are of an unstated length: the schedule does not count against them
    assert table8["linear probe top-1"][3] == "74.20" and table8["FID"][3] == "10.97"
    assert 'table 8\'s row "Rec. + DC"' in text


def test_report_cli_collects_results_grids_and_sets(run_dir):
    root, inputs = run_dir
    argv = ["--eval-dir", str(root / "eval"), "--metrics", str(root / "metrics.jsonl"), "--stats",
            str(inputs.stats_json), "--out", str(root / "out"), "--eval-set", f"cifar10={root / 'eval-cifar10'}"]
    assert report.main(argv) == 0
    text = (root / "out" / "report.md").read_text()
    assert text.count("![") == 5 and "| cifar10: 8-shot top-1 | 40.00 |" in text


def test_bad_metrics_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        report.read_metrics_jsonl(tmp_path / "metrics.jsonl")


def test_a_report_only_edit_rekeys_the_report_stage_alone(monkeypatch):
    """What a cached rerun recomputes is what changed key: editing the report's module re-keys `report`
    and nothing upstream (the evaluate stage does not import it)."""
    from pipeline import code_version
    from pipeline.config import load_pipeline_config
    from pipeline.stages import STAGES

    cfg = load_pipeline_config("demo")

    def keys() -> dict[str, str]:
        done: dict[str, str] = {}
        for name, stage in STAGES.items():
            if stage.enabled(cfg):
                done[name] = stage.spec(cfg, done).key
        return done

    code_version.clear_caches()
    before = keys()
    edited, real = code_version.module_path("lease.evaluate.report"), code_version.read_source
    monkeypatch.setattr(code_version, "read_source", lambda p: real(p) + (b"\n# edited\n" if p == edited else b""))
    code_version.clear_caches()
    after = keys()
    code_version.clear_caches()
    assert {name for name in before if before[name] != after[name]} == {"report"}
    assert STAGES["report"].upstream(cfg) == ("evaluate", "pretrain", "pack", "manifest",
                                              *[f"eval-{d.name}" for d in cfg.evaluate.datasets], "finetune")


TWO_SETS = "evaluate.datasets=[{name: imagenet_r, role: robustness, root: demo}, {name: cifar10, role: transfer, root: demo}]"


def test_the_report_stage_waits_for_every_configured_evaluation_set_finetune_and_condgen():
    from pipeline.config import load_pipeline_config
    from pipeline.stages import STAGES

    cfg = load_pipeline_config("demo", [TWO_SETS, "condgen.enabled=on"])
    assert STAGES["report"].upstream(cfg)[4:] == ("eval-imagenet_r", "eval-cifar10", "finetune", "condgen-eval")
    cfg = load_pipeline_config("demo", [TWO_SETS, "finetune.enabled=off"])
    assert STAGES["report"].upstream(cfg)[4:] == ("eval-imagenet_r", "eval-cifar10")


def test_paper_dataset_names():
    assert [paper.paper_dataset(n) for n in ("CIFAR-10", "imagenet_r", "ImageNet-C-5", "Flowers")] == \
        ["cifar10", "imagenet-r", "imagenet-c-s5", "flowers"]


def test_an_unlabelled_source_says_why_its_label_metrics_are_missing(tmp_path):
    (tmp_path / "eval").mkdir()
    reason = "the source is unlabelled (images without class folders)"
    facts = replace(DEMO_RUN, unlabelled=reason, caveat=None)
    text = report.write_report(tmp_path / "r", ReportInputs(eval_dir=tmp_path / "eval"), facts)["report"].read_text()
    assert text.splitlines()[0].endswith(f" — no label metrics: {reason}")
    rows = table_rows(text)
    for metric in ("linear probe top-1", "few-shot top-1", "this run's val split: k-NN top-1"):
        assert rows[metric][1] == f"not measured: skipped: {reason}"
    assert rows["fine-tuned top-1"][1] == f"not measured: skipped: {reason}; fine-tuning needs labels"
    assert rows["FID (unconditional)"][1] == f"not measured: no fid.json in {tmp_path / 'eval'}"


def test_task_grids_put_the_input_image_beside_its_tokens_and_completion(tmp_path):
    from lease.configs import model_config
    from lease.evaluate import generate
    from lease.model import LeaseModel
    from lease.synthetic import planted_tokens
    from lease.tokenizers import load_vqgan
    from lease.tokenizers.tiny import save_tiny_maskgit_vqgan
    from planted import write_shards

    grid, size, count = 4, 16, 2  # a 4x4 code grid of an f4 VQGAN at 16 px
    vq, disc, labels = planted_tokens(4, 2, grid * grid, concepts=4, synonyms=4, seed=0)
    write_shards(tmp_path / "val", vq, disc, labels, per_shard=4, prefix="val")
    torch.manual_seed(0)
    model = LeaseModel(model_config("tiny", grid_size=grid, vocab_gen=64, embed_dim=32, num_heads=2, depth=1,
                                    decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=1, contrast_on="none"))
    vqgan = load_vqgan("maskgit", save_tiny_maskgit_vqgan(tmp_path / "vq.ckpt", ch=32, ch_mult=(1, 1, 2),
                                                          z_channels=32, resolution=size))
    sampler = generate.MaskGitSampler(model.eval(), generate.GenerateConfig(num_images=count, batch_size=count,
                                                                            num_steps=2), "cpu")
    inputs = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    asked = []

    def load_inputs(keys):
        asked.append(list(keys))
        return inputs

    written = generate._task_grids(sampler, vqgan, str(tmp_path / "val"), count, tmp_path, load_inputs)
    assert set(written) == {"reconstruction", "inpainting", "outpainting"} and [len(k) for k in asked] == [count]
    height, _ = header_layout(generate.TASK_COLUMNS, LABEL_CELL, 2)
    with Image.open(written["reconstruction"]) as img:
        pixels = np.asarray(img)
    assert pixels.shape[:2] == (height + count * LABEL_CELL + (count + 1) * 2, 4 * LABEL_CELL + 5 * 2)
    scale = LABEL_CELL // size
    for row in range(count):  # the first column is the input image itself (upscaled by whole pixels)
        top = height + 2 + row * (LABEL_CELL + 2)
        cell = pixels[top:top + LABEL_CELL, 2:2 + LABEL_CELL]
        expected = inputs[row].permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
        assert np.array_equal(cell, expected)


def test_the_report_stage_reads_every_upstream_directory_it_is_given(run_dir):
    """build_report on hand-written stage directories: the evaluation sets the config names (by the
    `eval-<name>` convention), the manifest's counts and evaluate's record."""
    from pipeline.artifacts import RECORD_NAME
    from pipeline.config import load_pipeline_config
    from pipeline.stages import STAGES

    root, inputs = run_dir
    cfg = load_pipeline_config("demo", ["evaluate.datasets=[{name: cifar10, role: transfer, root: demo}, "
                                        "{name: objectnet, role: robustness, root: demo}]"])
    write_json(root / "manifest" / RECORD_NAME, {"result": {"split_counts": {"train": 240, "val": 80},
                                                            "class_names": [f"c{i}" for i in range(10)]}})
    write_json(root / "eval" / RECORD_NAME, {"result": {"skipped": None}})
    (root / "pretrain").mkdir()
    (root / "metrics.jsonl").rename(root / "pretrain" / "metrics.jsonl")
    dirs = {"manifest": root / "manifest", "evaluate": root / "eval", "pretrain": root / "pretrain",
            "pack": root / "pack", "eval-cifar10": root / "eval-cifar10"}  # objectnet's stage did not run
    result = STAGES["report"].build(cfg, dirs, root / "out")
    assert result == {"report": "report.md", "metrics": "metrics.json"}
    text = (root / "out" / "report.md").read_text()
    assert text.splitlines()[0] == "# LEASE evaluation: run `demo` on demo data (generated), 240 train / 80 val " \
                                   "images, 10 classes"
    rows = table_rows(text)
    assert rows["cifar10: 8-shot top-1"][1] == "40.00" and "Training loss curves" in text
    assert rows["objectnet"][1] == "not measured: evaluation set objectnet: no directory for it in this run"
