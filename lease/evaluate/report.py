"""A Markdown report of one run's evaluation, beside the paper's numbers for the same protocols.

Inputs: the protocol result JSONs in an evaluation directory (`knn.json`, `linear_probe.json`,
`fewshot.json`, `fid.json`, as the `lease eval` commands write them), the trainer's `metrics.jsonl`
(loss curves), the pack stage's `stats.json` (codebook statistics) and the image grids (PNG). Figures are
copied or drawn into `<out>/figures/` so the report directory stands on its own.

The paper's column is LEASE ViT-B pretrained 1600 epochs on ImageNet-1K (tables 1, 2 and 5); our numbers
are comparable to it only for that model, data and schedule, which the report states beside the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import get_args

import matplotlib

matplotlib.use("Agg")  # files only; no display on the workers
import matplotlib.pyplot as plt  # noqa: E402

from lease.configs import METHOD_DESCRIPTIONS, Method  # noqa: E402
from lease.io import atomic_path, atomic_write_bytes  # noqa: E402

log = logging.getLogger(__name__)

# LEASE ViT-B, IN-1K, 1600 epochs (paper): table 1 (linear probe, unconditional FID / IS on 50K samples),
# table 2 (few-shot top-1 per shots-per-class), table 5 (k-NN top-1 on the IN-1K validation set).
PAPER_LEASE_VIT_B = {
    "knn_top1": (62.60, "table 5 (IN-1K val)"),
    "linear_probe_top1": (76.7, "table 1"),
    "fewshot": ({"5": 51.00, "10": 59.39, "13": 62.00, "25": 66.19, "avg": 59.65}, "table 2"),
    "fid": (9.62, "table 1"),
    "isc": (91.78, "table 1"),
}
RESULT_FILES = {"knn": "knn.json", "linear_probe": "linear_probe.json", "fewshot": "fewshot.json",
                "fid": "fid.json"}
CURVE_KEYS = ("loss", "rec_loss", "contrast_loss", "uniformity_loss")


def load_results(eval_dir: str | Path) -> dict[str, dict]:
    """The protocol results present in `eval_dir` (missing protocols are simply absent)."""
    eval_dir = Path(eval_dir)
    return {name: json.loads((eval_dir / file).read_text()) for name, file in RESULT_FILES.items()
            if (eval_dir / file).is_file()}


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """Rows of the trainer's metrics log; a malformed line is an error naming its line number."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not a JSON object: {err}") from None
        if "step" not in row:
            raise ValueError(f"{path}:{number} has no 'step' field")
        rows.append(row)
    return rows


def _save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_loss_curves(rows: list[dict], path: str | Path) -> Path:
    """Training losses (and the learning rate) against the step."""
    if not rows:
        raise ValueError("the metrics log has no rows to plot")
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    steps = [r["step"] for r in rows]
    for key in CURVE_KEYS:
        if any(key in r for r in rows):
            ax_loss.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", fontsize="small")
    ax_loss.grid(alpha=0.3)
    if any("lr" in r for r in rows):
        ax_lr.plot([r["step"] for r in rows if "lr" in r], [r["lr"] for r in rows if "lr" in r], color="C3")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.set_xlim(min(steps), max(max(steps), min(steps) + 1))
    ax_lr.grid(alpha=0.3)
    return _save_figure(fig, Path(path))


def flatten_scalars(data: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested mapping as dotted keys (lists such as histograms are left out)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_scalars(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def plot_codebook_stats(stats: dict, path: str | Path) -> Path:
    """Bar charts of the codebook utilisation fractions and of the (conditional) entropies in `stats.json`."""
    scalars = flatten_scalars(stats)
    usage = {k: v for k, v in scalars.items() if "utilisation" in k or "utilization" in k}
    entropy = {k: v for k, v in scalars.items() if "entropy" in k.lower() or k.lower().startswith("h_")}
    if not usage and not entropy:
        raise ValueError("stats.json holds no codebook utilisation or entropy values to plot")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, values, label in ((axes[0], usage, "fraction of codes used"), (axes[1], entropy, "nats")):
        ax.barh(list(values), list(values.values()), color="C0")
        ax.set_xlabel(label)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3, axis="x")
    return _save_figure(fig, Path(path))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


PROTOCOL_NAMES = {"fast": "cached centre-crop tokens", "authors": "authors' scripts: online augmented views",
                  "paper": "paper's tables: online augmented views"}


def _by(r: dict) -> str:
    """Which evaluation protocol produced a result (`evaluate.protocol`; results of the standalone
    `lease eval` commands on cached features are `fast`)."""
    protocol = r.get("eval_protocol", "fast")
    return f" [{protocol}: {PROTOCOL_NAMES.get(protocol, protocol)}]"


def metrics_rows(results: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(metric, ours, paper, paper source) rows for every protocol present; each metric names the
    evaluation protocol that produced it."""
    rows = []
    paper = PAPER_LEASE_VIT_B
    if "knn" in results:
        r = results["knn"]
        rows.append((f"k-NN top-1 (k={r.get('k')}, T={r.get('temperature')}){_by(r)}", _fmt(r["top1"]),
                     _fmt(paper["knn_top1"][0]), paper["knn_top1"][1]))
        rows.append(("k-NN top-5", _fmt(r["top5"]), "–", ""))
    if "linear_probe" in results:
        r = results["linear_probe"]
        rows.append((f"linear probe top-1{_by(r)}", _fmt(r["top1"]), _fmt(paper["linear_probe_top1"][0], 1),
                     paper["linear_probe_top1"][1]))
        rows.append(("linear probe top-5", _fmt(r["top5"]), "–", ""))
    if "fewshot" in results:
        ref, source = paper["fewshot"]
        for shots, r in results["fewshot"]["shots"].items():
            rows.append((f"{shots}-shot top-1 (mean ± std over seeds){_by(results['fewshot'])}",
                         f"{r['top1']:.2f} ± {r['std']:.2f}",
                         _fmt(ref.get(shots)), source if shots in ref else ""))
        rows.append(("few-shot average", _fmt(results["fewshot"]["average"]), _fmt(ref["avg"]), source))
    if "fid" in results:
        r = results["fid"]
        rows.append((f"FID ({r.get('num_generated')} samples)", _fmt(r["fid"]), _fmt(paper["fid"][0]),
                     paper["fid"][1] + ", 50K samples"))
        if "isc_mean" in r:
            rows.append(("Inception Score", f"{r['isc_mean']:.2f} ± {r['isc_std']:.2f}", _fmt(paper["isc"][0]),
                         paper["isc"][1]))
    return rows


def render_report(results: dict[str, dict], figures: dict[str, str], stats: dict | None, title: str,
                  notes: list[str], method: str | None = None) -> str:
    """The Markdown text; `figures` maps captions to paths relative to the report; `method` the
    pretraining method (`pretrain.method`), named under the title."""
    lines = [f"# {title}", ""]
    if method is not None:
        lines += [f"Pretraining method: `{method}` ({METHOD_DESCRIPTIONS[method]}).", ""]
    lines += ["## Metrics", "",
              "Accuracies in %. Paper: LEASE ViT-B, ImageNet-1K, 1600 epochs — comparable only for that setting.", "",
              "| Metric | This run | LEASE ViT-B (paper) | Paper source |", "|---|---|---|---|"]
    rows = metrics_rows(results)
    lines += [f"| {m} | {ours} | {ref} | {src} |" for m, ours, ref, src in rows] or ["| (no results) | | | |"]
    lines += [""] + [f"- {note}" for note in notes] + ([""] if notes else [])
    if stats:
        scalars = flatten_scalars(stats)
        lines += ["## Codebook statistics (pack stage)", "", "| Statistic | Value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in scalars.items()] + [""]
    if figures:
        lines += ["## Figures", ""]
        for caption, rel in figures.items():
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, results: dict[str, dict], metrics_jsonl: str | Path | None = None,
                 stats_json: str | Path | None = None, grids: dict[str, str | Path] | None = None,
                 title: str = "LEASE evaluation report", caveat: str | None = None, method: str | None = None) -> Path:
    """Write `<out_dir>/report.md` and its figures; returns the report path. `caveat` (e.g. that the tokenizers
    had random weights) goes into the title and the caption of every image grid. `method` names the
    pretraining method in the report."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    if caveat:
        title = f"{title} — {caveat}"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    notes: list[str] = []
    if metrics_jsonl is not None:
        rows = read_metrics_jsonl(metrics_jsonl)
        plot_loss_curves(rows, fig_dir / "loss_curves.png")
        figures["Training loss curves"] = "figures/loss_curves.png"
        notes.append(f"training log: {len(rows)} rows, last step {rows[-1]['step']}, last loss "
                     f"{rows[-1].get('loss', float('nan')):.4f}")
    stats = None
    if stats_json is not None:
        stats = json.loads(Path(stats_json).read_text())
        plot_codebook_stats(stats, fig_dir / "codebook_stats.png")
        figures["Codebook statistics"] = "figures/codebook_stats.png"
    for name, path in (grids or {}).items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"grid image {path} ({name}) does not exist")
        target = fig_dir / f"{name}.png"
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
        figures[name.replace("_", " ").capitalize() + (f" ({caveat})" if caveat else "")] = f"figures/{name}.png"
    report = out_dir / "report.md"
    atomic_write_bytes(report, render_report(results, figures, stats, title, notes, method).encode())
    log.info("wrote %s with %d figures", report, len(figures))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-dir", type=Path, required=True,
                        help="directory with knn.json / linear_probe.json / fewshot.json / fid.json and grid PNGs")
    parser.add_argument("--metrics", type=Path, default=None, help="the trainer's metrics.jsonl")
    parser.add_argument("--stats", type=Path, default=None, help="the pack stage's stats.json")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--title", default="LEASE evaluation report")
    parser.add_argument("--method", default=None, choices=list(get_args(Method)),
                        help="the pretraining method, named in the report")


def run(args: argparse.Namespace) -> int:
    grids = {p.stem: p for p in sorted(args.eval_dir.glob("*.png"))}
    write_report(args.out, load_results(args.eval_dir), args.metrics, args.stats, grids, args.title, args.method)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval report", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
