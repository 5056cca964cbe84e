"""A run's evaluation as the paper's tables, each number beside the paper's where the two are comparable.

Inputs (a `ReportInputs`), every one optional — a missing file becomes a one-line reason in the place of
its number, never an exception:
- the evaluate stage's directory: `knn.json`, `linear_probe.json`, `fewshot.json`, `fid.json`,
  `finetune.json` and the grid PNGs (samples, reconstruction, inpainting, outpainting);
- one directory per evaluation set (`eval-<name>` stages) holding `result.json`;
- the `condgen-eval` directory: `condgen.json` and `class-<id>.png` grids;
- the trainer's `metrics.jsonl` (loss curves), the pack stage's `stats.json` and `token_usage.png`.

Like with like: the paper's numbers (`lease.evaluate.paper`) come from LEASE ViT-B pretrained 1600 epochs on
ImageNet-1K, measured with the authors' protocol. A number of ours sits beside the paper's only when the run
(`RunFacts`: data, model, schedule, method) and the protocol that produced it match; otherwise the paper's
number goes to a separate "paper, for reference" column with the reason. Tables: 1 (linear probe, FID,
IS), 2 (few-shot), 3 (fine-tuning), 4 (transfer), 5 (robustness), 7 (class-conditional generation), 8
(ablations, for a run with one of its contrast placements), then the codebook statistics and the figures.
`<out>/report.md`, `<out>/metrics.json` (every table row, for the flow's table artifact), the figures and a
copy of `stats.json` stand together in one directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from matplotlib.figure import Figure

from lease.configs import METHOD_DESCRIPTIONS, Method
from lease.evaluate import paper
from lease.io import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)

RESULT_FILES = {"knn": "knn.json", "linear_probe": "linear_probe.json", "fewshot": "fewshot.json",
                "fid": "fid.json", "finetune": "finetune.json"}
GRIDS = {  # the evaluate stage's grids: file stem -> what its columns show (a sentence)
    "samples": "Unconditional samples (MaskGIT decoding from an all-[MASK] canvas), one image per cell.",
    "reconstruction": "Columns: input image | its VQGAN tokens decoded | 50 % of the tokens masked (grey) | "
                      "the model's completion.",
    "inpainting": "Columns: input image | its VQGAN tokens decoded | centre box masked (grey) | the model's "
                  "completion.",
    "outpainting": "Columns: input image | its VQGAN tokens decoded | all but the centre box masked (grey) | "
                   "the model's completion.",
}
CURVE_KEYS = ("loss", "rec_loss", "contrast_loss", "uniformity_loss")
FEW_POINTS = 25  # curves with at most this many logged steps are drawn with a marker on every point
CONDGEN_GRIDS_SHOWN = 4  # class grids copied into the report (the rest stay in the condgen-eval directory)
ONLINE_PROTOCOLS = ("authors", "paper")  # the probe protocols the paper's numbers were measured with
PROTOCOL_NAMES = {"fast": "cached centre-crop tokens", "authors": "authors' scripts: online augmented views",
                  "paper": "paper's tables: online augmented views"}


# ---------------------------------------------------------------------------------- inputs


@dataclass
class RunFacts:
    """What a run was (from its config and manifest): decides whether the paper's numbers are comparable."""

    name: str = "run"
    source: str = "not given"  # data.source; `demo` is the generated demo set
    images: dict[str, int] = field(default_factory=dict)  # usable images per split
    classes: int | None = None
    model: str = "not given"  # pretrain.preset
    embed_dim: int | None = None
    depth: int | None = None
    method: str | None = None
    epochs: float | None = None
    max_steps: int = 0
    contrast_on: str | None = None
    caveat: str | None = None  # e.g. random-weight demo tokenizers on real images
    unlabelled: str | None = None  # why the evaluate stage measured no label metrics (an unlabelled source)

    def data_line(self) -> str:
        what = "demo data (generated)" if self.source == "demo" else f"`{self.source}`"
        counts = " / ".join(f"{n:,} {split}" for split, n in sorted(self.images.items(), key=_split_order))
        parts = [what] + ([f"{counts} images"] if counts else []) + \
                ([f"{self.classes} classes" if self.classes else "unlabelled"] if self.classes is not None else [])
        return ", ".join(parts)


@dataclass
class ReportInputs:
    eval_dir: Path | None = None
    finetune_dir: Path | None = None  # where finetune.json lies when not in eval_dir (the finetune stage's)
    eval_sets: dict[str, Path | None] = field(default_factory=dict)  # configured name -> its stage dir (None: none)
    condgen: bool = False  # conditional generation is part of the run (table 7)
    condgen_dir: Path | None = None
    metrics_jsonl: Path | None = None
    stats_json: Path | None = None
    token_usage_png: Path | None = None


def _split_order(item: tuple[str, int]) -> tuple[int, str]:
    return ({"train": 0, "val": 1}.get(item[0], 2), item[0])


def read_result(path: Path | None, what: str) -> tuple[dict | None, str | None]:
    """(the JSON object, None) or (None, a one-line reason it is not there)."""
    if path is None:
        return None, f"{what}: no directory for it in this run"
    if not path.is_file():
        return None, f"no {path.name} in {path.parent}"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{path} is unreadable ({err})"
    if not isinstance(data, dict):
        return None, f"{path} holds no JSON object"
    return data, None


def label_result(eval_dir: Path | None, file: str, what: str, facts: RunFacts) -> tuple[dict | None, str | None]:
    """A label metric's result (k-NN, probes, fine-tuning), or the reason it is missing: for an unlabelled
    source, that reason."""
    result, why = read_result(eval_dir / file if eval_dir else None, what)
    if result is None and facts.unlabelled:
        return None, f"skipped: {facts.unlabelled}"
    return result, why


def load_results(eval_dir: str | Path) -> dict[str, dict]:
    """The protocol results present in `eval_dir` (absent ones are left out)."""
    found = {name: read_result(Path(eval_dir) / file, name)[0] for name, file in RESULT_FILES.items()}
    return {name: data for name, data in found.items() if data is not None}


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


# ---------------------------------------------------------------------------- comparability


def run_mismatch(facts: RunFacts, schedule: bool = True) -> list[str]:
    """Why this run is not the paper's setting (empty: it is). `schedule`: count the pretraining length
    (table 8's runs are of an unstated, shorter length)."""
    s = paper.PAPER_SETTING
    reasons = []
    if (facts.images.get("train"), facts.images.get("val"), facts.classes) != \
            (s["train_images"], s["val_images"], s["classes"]):
        reasons.append(f"data: {facts.data_line()}; the paper's is {s['data']} ({s['train_images']:,} train / "
                       f"{s['val_images']:,} val images, {s['classes']} classes)")
    if (facts.embed_dim, facts.depth) != (s["embed_dim"], s["depth"]):
        reasons.append(f"model: `{facts.model}` (width {facts.embed_dim}, depth {facts.depth}); the paper's is "
                       f"{s['model']} (width {s['embed_dim']}, depth {s['depth']})")
    if schedule and (facts.max_steps > 0 or facts.epochs != s["epochs"]):
        length = f"{facts.epochs:g} epochs" if facts.epochs is not None else "not given"
        if facts.max_steps > 0:
            length += f", capped at {facts.max_steps} steps"
        reasons.append(f"schedule: {length}; the paper pretrained {s['epochs']} epochs (table A.1)")
    if facts.method is None:
        reasons.append("method: not given")
    elif facts.method not in paper.PAPER_ROW:
        reasons.append(f"method: `{facts.method}` has no row of its own in the paper" +
                       (" (the paper's MAGE tokenizes online: `mage_online`)" if facts.method == "mage" else ""))
    return reasons


def paper_row_name(facts: RunFacts) -> str:
    """The paper's row to compare with: the run's method's, LEASE's for a method the paper lacks."""
    return paper.PAPER_ROW.get(facts.method or "", "LEASE")


def protocol_of(result: dict) -> str:
    """Which protocol produced a result (`protocol`, or the older `eval_protocol`; cached-token commands: fast)."""
    return str(result.get("protocol", result.get("eval_protocol", "fast")))


def _protocol_label(protocol: str) -> str:
    return f"{protocol} ({PROTOCOL_NAMES[protocol]})" if protocol in PROTOCOL_NAMES else protocol


@dataclass
class Row:
    """One line of a table: our number (or why it is missing), the protocol behind it, the paper's number
    and where it comes from; `reason` says why the paper's number is not comparable (None: it is)."""

    metric: str
    ours: str
    protocol: str = ""
    paper: float | str | None = None
    source: str = ""
    reason: str | None = None

    def cells(self) -> tuple[str, str, str, str, str, str]:
        value = "–" if self.paper is None else (f"{self.paper:.2f}" if isinstance(self.paper, float) else self.paper)
        if self.paper is None:
            like, reference = "–", "–"
        elif self.reason is None:
            like, reference = value, "–"
        else:
            like, reference = "–", f"{value} ({self.reason})"
        return self.metric, self.ours, self.protocol, like, reference, self.source

    def record(self, table: str) -> dict[str, str]:
        metric, ours, protocol, like, reference, source = self.cells()
        return {"table": table, "metric": metric, "this run": ours, "protocol": protocol,
                "paper (like for like)": like, "paper, for reference": reference, "source": source}


@dataclass
class Table:
    number: str
    title: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _missing(reason: str) -> str:
    return f"not measured: {reason}"


def _reason(run: list[str], protocol: list[str]) -> str | None:
    """The short reason of a non-comparable cell: which of the run's facts differ, and the protocol's."""
    parts = ([f"run differs: {', '.join(r.split(':')[0] for r in run)}"] if run else []) + protocol
    return "; ".join(parts) or None


def _probe_protocol_mismatch(protocol: str) -> list[str]:
    return [] if protocol in ONLINE_PROTOCOLS else [f"protocol {protocol}, the paper's: authors' scripts"]


# ------------------------------------------------------------------------------------------ tables


def table_1(eval_dir: Path | None, facts: RunFacts) -> Table:
    run, row = run_mismatch(facts), paper_row_name(facts)
    ref, source = paper.TABLES["1"]["rows"][row], f"table 1 ({row})"
    rows = []
    lp, why = label_result(eval_dir, "linear_probe.json", "linear probe", facts)
    if lp is None:
        rows.append(Row("linear probe top-1", _missing(why)))
    else:
        protocol = protocol_of(lp)
        rows.append(Row("linear probe top-1", _fmt(lp.get("top1")), _protocol_label(protocol),
                        ref["linear_probe_top1"], source, _reason(run, _probe_protocol_mismatch(protocol))))
        rows.append(Row("linear probe top-5", _fmt(lp.get("top5")), _protocol_label(protocol), "not reported"))
    fid, why = read_result(eval_dir / "fid.json" if eval_dir else None, "FID")
    if fid is None or fid.get("missing") or fid.get("fid") is None:
        reason = why if fid is None else (fid.get("missing") or "fid.json holds no FID")
        rows += [Row("FID (unconditional)", _missing(reason)), Row("Inception Score", _missing(reason))]
    else:
        samples = fid.get("samples", fid.get("num_generated"))
        extractor = str(fid.get("extractor", "not given"))
        protocol = f"{fid.get('protocol', 'not given')}, {samples} samples, Inception: {extractor}"
        differs = _generation_differences(fid.get("protocol"), samples, extractor)
        isc, isc_std = fid.get("isc", fid.get("isc_mean")), fid.get("isc_std")
        rows.append(Row("FID (unconditional)", _fmt(fid["fid"]), protocol, ref["fid"], source, _reason(run, differs)))
        rows.append(Row("Inception Score", _fmt(isc) + (f" ± {isc_std:.2f}" if isinstance(isc_std, float) else ""),
                        protocol, ref["isc"], source, _reason(run, differs)))
    return Table("1", "Linear probe, FID and IS (ImageNet-1K in the paper)", rows)


def _generation_differences(preset: str | None, samples: Any, extractor: str) -> list[str]:
    """How an unconditional FID / IS measurement differs from the paper's (MAGE's preset, 50K samples, the
    real Inception weights)."""
    return ([] if preset == "mage" else [f"generation preset {preset}, the paper's: mage (the authors')"]) + \
           ([] if samples == paper.FID_SAMPLES else [f"{samples} samples, the paper's {paper.FID_SAMPLES:,}"]) + \
           (["demo Inception extractor (random weights)"] if extractor.startswith("demo") else [])


def table_2(eval_dir: Path | None, facts: RunFacts) -> Table:
    run, row = run_mismatch(facts), paper_row_name(facts)
    ref, source = paper.TABLES["2"]["rows"][row], f"table 2 ({row})"
    fs, why = label_result(eval_dir, "fewshot.json", "few-shot", facts)
    skipped = [] if fs is None else [f"{k}-shot skipped: {reason}" for k, reason in
                                     sorted((fs.get("skipped_shots") or {}).items(), key=lambda kv: int(kv[0]))]
    if fs is None or not fs.get("shots"):
        reason = why or "; ".join(skipped) or "fewshot.json has no shots"
        return Table("2", "Few-shot linear probe", [Row("few-shot top-1", _missing(reason))])
    protocol = protocol_of(fs)
    differs = _probe_protocol_mismatch(protocol)
    rows = []
    shots = {str(k): v for k, v in fs["shots"].items()}
    for k, r in sorted(shots.items(), key=lambda kv: int(kv[0])):
        spread = f" ± {r['std']:.2f}" if isinstance(r.get("std"), float) else ""
        rows.append(Row(f"{k}-shot top-1 (mean ± std over seeds)", _fmt(r.get("top1")) + spread,
                        _protocol_label(protocol), ref.get(k), source if k in ref else "",
                        _reason(run, differs) if k in ref else None))
    paper_shots = {k for k in ref if k != "avg"}
    notes = [f"{line} (evaluate.fewshot.on_short_class=skip)." for line in skipped]
    if set(shots) == paper_shots:
        rows.append(Row(f"average over {', '.join(sorted(shots, key=int))} shots", _fmt(fs.get("average")),
                        _protocol_label(protocol), ref["avg"], source, _reason(run, differs)))
    else:
        common = sorted(set(shots) & paper_shots, key=int)
        mean = statistics.fmean(shots[k]["top1"] for k in shots)
        rows.append(Row(f"average over this run's {', '.join(sorted(shots, key=int))} shots", _fmt(mean),
                        _protocol_label(protocol), "not reported for these shots"))
        if len(common) > 1:  # (one shared shot count is its own row above)
            rows.append(Row(f"average over the shots both have ({', '.join(common)})",
                            _fmt(statistics.fmean(shots[k]["top1"] for k in common)), _protocol_label(protocol),
                            round(statistics.fmean(ref[k] for k in common), 2), f"{source}, mean of its columns",
                            _reason(run, differs)))
        notes.append(f"The paper averages over {', '.join(sorted(paper_shots, key=int))} shots per class "
                     f"({ref['avg']:.2f}); averages are compared over the same shot counts only.")
    return Table("2", "Few-shot linear probe (shots per class, 10 epochs in the paper)", rows, notes)


def table_3(eval_dir: Path | None, facts: RunFacts) -> Table:
    run, row = run_mismatch(facts), paper_row_name(facts)
    ref, source = paper.TABLES["3"]["rows"][row], f"table 3 ({row})"
    ft, why = label_result(eval_dir, "finetune.json", "fine-tuning", facts)
    if ft is None and facts.unlabelled:
        return Table("3", "Full fine-tuning", [Row("fine-tuned top-1", _missing(f"{why}; fine-tuning needs labels"))])
    if ft is None:
        reason = (f"fine-tuning did not run ({why}; `finetune.enabled=on` or `lease eval finetune` runs table "
                  "A.3's recipe)")
        return Table("3", "Full fine-tuning", [Row("fine-tuned top-1", _missing(reason))])
    protocol = protocol_of(ft)
    epochs = ft.get("epochs", ft.get("epochs_done"))
    differs = _probe_protocol_mismatch(protocol) + ([] if epochs == 100 else [f"{epochs} epochs, the paper's 100"])
    label = f"{_protocol_label(protocol)}, {epochs} epochs"
    return Table("3", "Full fine-tuning (table A.3 recipe)", [
        Row("fine-tuned top-1", _fmt(ft.get("top1")), label, ref.get("top1"), source, _reason(run, differs)),
        Row("fine-tuned top-5", _fmt(ft.get("top5")), label, ref.get("top5", "not reported"),
            source if "top5" in ref else "", _reason(run, differs) if "top5" in ref else None)])


def _eval_set_results(inputs: ReportInputs, role: str) -> list[tuple[str, dict | None, str | None]]:
    """(name, result.json or None, reason) for every configured evaluation set of `role` (a set whose result is
    missing is listed under both roles' tables: its role is in the file that is missing)."""
    out = []
    for name, directory in inputs.eval_sets.items():
        result, why = read_result(directory / "result.json" if directory else None, f"evaluation set {name}")
        if result is None or result.get("role", role) == role:
            out.append((name, result, why))
    return out


def _set_label(name: str, result: dict | None) -> str:
    images = result.get("images") if result else None
    return f"{name} ({images:,} images)" if isinstance(images, int) else name


def table_4(inputs: ReportInputs, facts: RunFacts) -> Table:
    run, row = run_mismatch(facts), paper_row_name(facts)
    by_shots = {paper.TABLES[t]["shots"]: t for t in ("4", "C.8", "C.9")}
    rows, sets = [], _eval_set_results(inputs, "transfer")
    for name, result, why in sets:
        column = paper.paper_dataset(name)
        if result is None:
            rows.append(Row(name, _missing(why)))
            continue
        protocol = protocol_of(result)
        differs = _probe_protocol_mismatch(protocol)
        probe = result.get("linear_probe_top1")
        ours = _fmt(probe) if probe is not None else _missing(result.get("note") or "no linear_probe_top1 in result.json")
        # table 4 is the 16-shot probe: beside our full-train-set probe it is for reference only
        sixteen = paper.TABLES["4"]["rows"][row].get(column)
        rows.append(Row(f"{_set_label(name, result)}: linear probe top-1", ours, _protocol_label(protocol), sixteen,
                        f"table 4 ({row}, 16-shot)" if sixteen is not None else "",
                        "table 4 is the 16-shot probe (supplement §C), this the full-train-set probe"
                        if sixteen is not None else None))
        for shots, value in sorted((result.get("fewshot") or {}).items(), key=lambda kv: -int(kv[0])):
            table = by_shots.get(str(shots))
            ref = paper.TABLES[table]["rows"][row].get(column) if table else None
            rows.append(Row(f"{name}: {shots}-shot top-1", _fmt(value), _protocol_label(protocol), ref,
                            f"table {table} ({row})" if ref is not None else "",
                            _reason(run, differs) if ref is not None else None))
    if not sets:
        rows.append(Row("transfer sets", _missing("no evaluation set of role transfer in evaluate.datasets")))
    notes = ["A set is taken for the paper's by its name (Caltech-101, UCF-101, SUN397, DTD, CIFAR-10/100, "
             "Places365); sets the paper has no column for show no paper number."]
    return Table("4", "Transfer: linear probe and few-shot per dataset", rows, notes)


def table_5(inputs: ReportInputs, facts: RunFacts) -> Table:
    run, row = run_mismatch(facts), paper_row_name(facts)
    ref, source = paper.TABLES["5"]["rows"][row], f"table 5 ({row})"
    rows = []
    knn, why = label_result(inputs.eval_dir, "knn.json", "k-NN", facts)
    if knn is None:
        rows.append(Row("this run's val split: k-NN top-1", _missing(why)))
    else:
        k, temperature = knn.get("k"), knn.get("temperature")
        differs = [] if (k, temperature) == (20, 0.07) else [f"k={k}, T={temperature}; the paper's k=20, T=0.07"]
        label = f"k-NN k={k}, T={temperature}, {_protocol_label(protocol_of(knn))}"
        rows.append(Row("this run's val split: k-NN top-1", _fmt(knn.get("top1")), label, ref["imagenet-val"],
                        source, _reason(run, differs)))
        rows.append(Row("this run's val split: k-NN top-5", _fmt(knn.get("top5")), label, "not reported"))
    sets = _eval_set_results(inputs, "robustness")
    for name, result, why in sets:
        if result is None:
            rows.append(Row(name, _missing(why)))
            continue
        protocol = _protocol_label(protocol_of(result))
        values = {f"{name}-s{s}": v for s, v in (result.get("severities") or {}).items()} or \
                 {name: result.get("knn_top1")}
        for label, value in values.items():
            column = paper.paper_dataset(label)
            number = ref.get(column)
            ours = _fmt(value) if value is not None else _missing(result.get("note") or "no knn_top1 in result.json")
            rows.append(Row(f"{_set_label(label, result)}: k-NN top-1", ours, protocol, number,
                            source if number is not None else "", _reason(run, []) if number is not None else None))
    if not sets:
        rows.append(Row("robustness sets", _missing("no evaluation set of role robustness in evaluate.datasets")))
    return Table("5", "Robustness: k-NN with the train bank", rows)


def table_7(condgen_dir: Path | None, facts: RunFacts) -> Table:
    run = run_mismatch(facts)
    result, why = read_result(condgen_dir / "condgen.json" if condgen_dir else None, "class-conditional generation")
    if result is None or result.get("missing") or result.get("fid") is None:
        reason = why if result is None else (result.get("missing") or "condgen.json holds no FID")
        return Table("7", "Class-conditional generation", [Row("FID (class-conditional)", _missing(reason)),
                                                             Row("Inception Score", _missing(reason))])
    classes, per_class = result.get("classes"), result.get("samples_per_class")
    extractor = str(result.get("extractor", "not given"))
    protocol = (f"{classes} classes × {per_class} samples, guidance {result.get('guidance')}, tail "
                f"{result.get('tail')}, Inception: {extractor}")
    wanted = (paper.PAPER_SETTING["classes"], paper.CONDITIONAL_SAMPLES_PER_CLASS)
    differs = ([] if (classes, per_class) == wanted else
               [f"{classes} × {per_class} samples, the paper's {wanted[0]} × {wanted[1]}"]) + \
              ([] if result.get("tail") == "centroids" else ["no centroid tail (the paper's: all centroids)"]) + \
              (["demo Inception extractor (random weights)"] if extractor.startswith("demo") else [])
    ref = paper.TABLES["7"]["rows"]["LEASE"]  # the paper fine-tuned LEASE's decoder only
    reason = _reason(run, differs) if facts.method == "lease" else \
        f"this run trained `{facts.method}`; the number is LEASE's"
    return Table("7", "Class-conditional generation", [
        Row("FID (class-conditional)", _fmt(result["fid"]), protocol, ref["fid"], "table 7 (LEASE)", reason),
        Row("Inception Score", _fmt(result.get("isc")), protocol, ref["isc"], "table 7 (LEASE)", reason)])


ABLATION_PLACEMENTS = {"none": "none", "decoder": "decoder", "decoder_authors": "decoder", "both": "both",
                       "both_authors": "both"}


def table_8(eval_dir: Path | None, facts: RunFacts) -> Table | None:
    """Table 8's row for a LEASE run with one of its ablated contrast placements (None for any other run)."""
    placement = ABLATION_PLACEMENTS.get(facts.contrast_on or "")
    if facts.method != "lease" or placement is None:
        return None
    t8 = paper.TABLES["8"]
    ref, label = t8["rows"][placement], t8["labels"][placement]
    run = run_mismatch(facts, schedule=False)
    source = f"table 8 ({label})"
    rows = []
    lp, why = label_result(eval_dir, "linear_probe.json", "linear probe", facts)
    rows.append(Row("linear probe top-1", _missing(why)) if lp is None else
                Row("linear probe top-1", _fmt(lp.get("top1")), _protocol_label(protocol_of(lp)),
                    ref["linear_probe_top1"], source, _reason(run, _probe_protocol_mismatch(protocol_of(lp)))))
    fid, why = read_result(eval_dir / "fid.json" if eval_dir else None, "FID")
    for key, metric in (("fid", "FID"), ("isc", "Inception Score")):
        value = None if fid is None else fid.get(key, fid.get(f"{key}_mean"))
        rows.append(Row(metric, _fmt(value) if value is not None else
                        _missing(why if fid is None else (fid.get("missing") or f"fid.json has no {key}")),
                        str(fid.get("protocol", "")) if fid else "", ref[key], source, _reason(run, [])))
    others = "; ".join(f"{t8['labels'][k]}: {v['linear_probe_top1']} / {v['fid']} / {v['isc']}"
                       for k, v in t8["rows"].items())
    notes = [f"This run: `pretrain.model.contrast_on={facts.contrast_on}` = table 8's row \"{label}\". All rows "
             f"(LP / FID / IS): {others}. The paper does not state these runs' length."]
    return Table("8", "Ablation: where the codebook contrast acts", rows, notes)


# ------------------------------------------------------------------------------------ codebook


def codebook_rows(stats: dict) -> list[tuple[str, str]]:
    """The codebook statistics a reader wants (pipeline/stats.py's keys), as (statistic, value) rows."""
    use, used = stats.get("codebook_utilisation", {}), stats.get("codes_used", {})
    ent, ppl = stats.get("entropy_nats", {}), stats.get("perplexity", {})
    sizes = {"gen": stats.get("vocab_gen"), "disc": stats.get("codebook_size")}
    rows = []
    for name, label in (("gen", "generative (VQGAN)"), ("disc", "discriminative (k-means)")):
        if name in use:
            count = f" ({used[name]:,} of {sizes[name]:,} codes)" if name in used and sizes[name] else ""
            rows.append((f"utilisation, {label}", f"{100 * use[name]:.1f} %{count}"))
    for name, label in (("gen", "generative"), ("disc", "discriminative")):
        if name in ppl:
            rows.append((f"perplexity, {label}", f"{ppl[name]:.1f}"))
    for key, label in (("gen_given_disc", r"H(gen \| disc)"), ("disc_given_gen", r"H(disc \| gen)")):
        if key in ent:
            rows.append((label, f"{ent[key]:.3f} nats"))
    return rows


# ------------------------------------------------------------------------------------------ figures


def loss_figure(rows: list[dict]) -> Figure:
    """Training losses and the learning rate against the optimizer step; every point marked when there are
    few (a short run's curve is a handful of logged steps)."""
    if not rows:
        raise ValueError("the metrics log has no rows to plot")
    fig = Figure(figsize=(11, 3.8), layout="constrained")  # no pyplot: no global figure state
    ax_loss, ax_lr = fig.subplots(1, 2)
    marker = "o" if len(rows) <= FEW_POINTS else None
    for key in CURVE_KEYS:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax_loss.plot(*zip(*points), marker=marker, label=key.replace("_", " "))
    ax_loss.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="training losses")
    if ax_loss.lines:
        ax_loss.legend(loc="upper right", fontsize="small")
    points = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if points:
        ax_lr.plot(*zip(*points), marker=marker, color="C3")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    steps = [r["step"] for r in rows]
    for ax in (ax_loss, ax_lr):
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)  # one logged point still gets a visible span
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    return path


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


# ------------------------------------------------------------------------------------------ render


def render_table(table: Table, paper_row: str) -> list[str]:
    lines = [f"## Table {table.number}: {table.title}", "",
             f"| Metric | This run | Protocol (ours) | Paper, {paper_row} (like for like) | Paper, for reference "
             "(why not like for like) | Paper source |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in table.rows]
    return lines + [""] + [f"{note}" for note in table.notes] + ([""] if table.notes else [])


def build_tables(inputs: ReportInputs, facts: RunFacts) -> list[Table]:
    tables = [table_1(inputs.eval_dir, facts), table_2(inputs.eval_dir, facts), table_3(inputs.finetune_dir or inputs.eval_dir, facts),
              table_4(inputs, facts), table_5(inputs, facts)]
    if inputs.condgen:
        tables.append(table_7(inputs.condgen_dir, facts))
    ablation = table_8(inputs.eval_dir, facts)
    return tables + ([ablation] if ablation else [])


def title_of(facts: RunFacts, title: str) -> str:
    caveats = [note for note in (facts.caveat, facts.unlabelled and f"no label metrics: {facts.unlabelled}") if note]
    return " — ".join([f"{title}: run `{facts.name}` on {facts.data_line()}", *caveats])


def comparability_lines(facts: RunFacts) -> list[str]:
    reasons = run_mismatch(facts)
    row = paper_row_name(facts)
    if not reasons:
        return [f"This run is the paper's setting (ImageNet-1K, ViT-B, 1600 epochs, `{facts.method}`): numbers "
                f"measured with the authors' or the paper's protocol stand beside the paper's {row} row.", ""]
    return [f"Not the paper's setting, so the paper's {row} numbers stand only in the \"paper, for reference\" "
            "column:", ""] + [f"- {r}" for r in reasons] + [""]


def render_report(tables: list[Table], facts: RunFacts, figures: dict[str, tuple[str, str]],
                  stats: tuple[list[tuple[str, str]], str | None] | None, notes: list[str],
                  title: str = "LEASE evaluation") -> str:
    """The Markdown text. `figures`: caption -> (path relative to the report, description); `stats`: the
    codebook rows and the link to the full JSON (or the reason it is missing)."""
    lines = [f"# {title_of(facts, title)}", ""]
    if facts.method in METHOD_DESCRIPTIONS:
        lines += [f"Pretraining method: `{facts.method}` ({METHOD_DESCRIPTIONS[facts.method]}).", ""]
    lines += comparability_lines(facts)
    lines += ["Accuracies are top-1 / top-5 in %; \"not measured\" says which input is missing."] + [""]
    for table in tables:
        lines += render_table(table, paper_row_name(facts))
    lines += ["## Codebook statistics (pack stage)", ""]
    if stats is None or not stats[0]:
        lines += [f"Not available: {stats[1] if stats else 'no stats.json given'}", ""]
    else:
        rows, link = stats
        lines += ["| Statistic | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
        lines += ["", f"Every statistic (entropies, per-token quantiles, histograms): [{link}]({link}).", ""]
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    if figures:
        lines += ["## Figures", ""]
        for caption, (rel, description) in figures.items():
            lines += [f"### {caption}", "", description, "", f"![{caption}]({rel})", ""]
    return "\n".join(lines)


def sentences(*parts: str | None) -> str:
    """The non-empty `parts` as sentences of one paragraph: each begun with a capital, ended with a full stop
    (unless it ends with one already), separated by a space."""
    def sentence(part: str) -> str:
        part = part.strip()
        return part[:1].upper() + part[1:] + ("" if part.endswith((".", "!", "?")) else ".")

    return " ".join(sentence(part) for part in parts if part and part.strip())


def _grid_caption(stem: str, caveat: str | None) -> str:
    """"Samples" or "Samples — <caveat>" (a dash: the caveat may hold brackets of its own)."""
    name = stem.replace("_", " ").replace("-", " ").capitalize()
    return name + (f" — {caveat}" if caveat else "")


def collect_figures(inputs: ReportInputs, facts: RunFacts, fig_dir: Path, notes: list[str]
                    ) -> dict[str, tuple[str, str]]:
    """Draw or copy every figure into `fig_dir`; a missing input becomes a note."""
    figures: dict[str, tuple[str, str]] = {}
    if inputs.metrics_jsonl is not None and inputs.metrics_jsonl.is_file():
        rows = read_metrics_jsonl(inputs.metrics_jsonl)
        if rows:
            save_figure(loss_figure(rows), fig_dir / "loss_curves.png")
            steps = f"{len(rows)} logged step{'' if len(rows) == 1 else 's'}"
            figures["Training loss curves"] = ("figures/loss_curves.png",
                                               f"{steps}, last step {rows[-1]['step']}, last loss "
                                               f"{rows[-1].get('loss', float('nan')):.4f}.")
        else:
            notes.append(f"loss curves: {inputs.metrics_jsonl} has no rows")
    else:
        notes.append(f"loss curves: no metrics.jsonl ({inputs.metrics_jsonl or 'not given'})")
    if inputs.token_usage_png is not None and inputs.token_usage_png.is_file():
        _copy(inputs.token_usage_png, fig_dir / "token_usage.png")
        figures["Token usage and per-token conditional entropy"] = (
            "figures/token_usage.png", "Left: token frequency against rank for both codebooks; right: histograms "
                                       "of H(gen | disc = d) and H(disc | gen = g) over tokens (pack stage).")
    grids = inputs.eval_dir and sorted(p for p in inputs.eval_dir.glob("*.png"))
    for path in grids or []:
        _copy(path, fig_dir / path.name)
        figures[_grid_caption(path.stem, facts.caveat)] = (f"figures/{path.name}",
                                                           sentences(GRIDS.get(path.stem), facts.caveat))
    if inputs.condgen and inputs.condgen_dir is not None:
        for path in sorted(inputs.condgen_dir.glob("class-*.png"))[:CONDGEN_GRIDS_SHOWN]:
            _copy(path, fig_dir / path.name)
            figures[_grid_caption(path.stem, facts.caveat)] = (
                f"figures/{path.name}", sentences(f"class-conditional samples of class "
                                                  f"{path.stem.removeprefix('class-')}", facts.caveat))
    return figures


def write_report(out_dir: str | Path, inputs: ReportInputs, facts: RunFacts | None = None,
                 title: str = "LEASE evaluation") -> dict[str, Path]:
    """Write `<out>/report.md`, `<out>/metrics.json` (every table row), the figures and a copy of `stats.json`;
    returns their paths (`report`, `metrics`)."""
    out_dir, facts = Path(out_dir), facts or RunFacts()
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    figures = collect_figures(inputs, facts, fig_dir, notes)
    stats_data, why = read_result(inputs.stats_json, "codebook statistics")
    stats = None
    if stats_data is not None:
        _copy(inputs.stats_json, out_dir / "stats.json")
        stats = (codebook_rows(stats_data), "stats.json")
    elif why:
        stats = ([], why)
    tables = build_tables(inputs, facts)
    report = out_dir / "report.md"
    atomic_write_bytes(report, render_report(tables, facts, figures, stats, notes, title).encode())
    metrics = out_dir / "metrics.json"
    records = [row.record(t.number) for t in tables for row in t.rows]  # in column order (not sorted): a table
    atomic_write_bytes(metrics, (json.dumps(records, indent=1, ensure_ascii=False) + "\n").encode())
    log.info("wrote %s: tables %s, %d figures", report, ", ".join(t.number for t in tables), len(figures))
    return {"report": report, "metrics": metrics}


# ------------------------------------------------------------------------------------------ CLI


def _named_dir(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=DIR")
    return name, Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-dir", type=Path, required=True,
                        help="directory with knn.json / linear_probe.json / fewshot.json / fid.json / finetune.json "
                             "and grid PNGs")
    parser.add_argument("--eval-set", type=_named_dir, action="append", default=[], metavar="NAME=DIR",
                        help="an evaluation set's directory holding result.json (repeatable)")
    parser.add_argument("--condgen-dir", type=Path, default=None, help="directory with condgen.json and class grids")
    parser.add_argument("--metrics", type=Path, default=None, help="the trainer's metrics.jsonl")
    parser.add_argument("--stats", type=Path, default=None, help="the pack stage's stats.json")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--title", default="LEASE evaluation")
    parser.add_argument("--name", default="run", help="the run's name, shown in the title")
    parser.add_argument("--method", default=None, choices=list(get_args(Method)),
                        help="the pretraining method, named in the report")


def run(args: argparse.Namespace) -> int:
    stats = args.stats
    inputs = ReportInputs(eval_dir=args.eval_dir, eval_sets=dict(args.eval_set),
                          condgen=args.condgen_dir is not None, condgen_dir=args.condgen_dir,
                          metrics_jsonl=args.metrics, stats_json=stats,
                          token_usage_png=stats.parent / "token_usage.png" if stats else None)
    write_report(args.out, inputs, RunFacts(name=args.name, method=args.method), args.title)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval report", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
