"""Evaluation datasets (`evaluate.datasets`): what their branch stages compute beyond the shared stage code.

A robustness set's images are labelled with the pretraining classes: its class folders are pretraining
class names, or `class_map` maps them to one. The manifest stage writes them as a list file
`<absolute path> <pretraining class index>`, so the branch's manifest labels are pretraining indices and
the k-NN against the pretraining train bank (paper table 5 / A.6: ImageNet-V2, -Sketch, -R, -A, ObjectNet,
ImageNet-C) needs no remapping. The `corruption` layout (ImageNet-C) is
root/<corruption>/<severity>/<class>/<image>; its images are also scored per corruption and severity.
A transfer set (table 4, C.8/C.9) keeps its own classes and splits and is probed like the pretraining set.

`result.json` (INTERFACES.md) is assembled here from `lease.evaluate`'s k-NN, probe and few-shot results.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from lease.typed_config import ConfigError
from pipeline.config import EvalDatasetConfig

LISTING = "images.txt"
RESULT = "result.json"


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    """Every visible file: the manifest checks each, and names the ones that are not images."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def class_folders(root: Path, layout: str) -> list[tuple[str, Path]]:
    """(group, class folder) pairs: group "" for an ImageFolder, "<corruption>/<severity>" for ImageNet-C."""
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation dataset root {root} does not exist")
    if layout == "imagefolder":
        return [("", folder) for folder in _class_dirs(root)]
    return [(f"{corruption.name}/{severity.name}", folder) for corruption in _class_dirs(root)
            for severity in _class_dirs(corruption) for folder in _class_dirs(severity)]


def robustness_listing(cfg: EvalDatasetConfig, root: Path, pretrain_classes: list[str], key: str) -> list[str]:
    """The list file's lines: every image of the set with the index of its pretraining class. A class
    folder that is neither a pretraining class nor mapped to one fails naming it (`key`: the config entry)."""
    index = {name: i for i, name in enumerate(pretrain_classes)}
    lines, unknown = [], set()
    for _, folder in class_folders(root, cfg.layout):
        target = cfg.class_map.get(folder.name, folder.name)
        if target not in index:
            unknown.add(folder.name)
            continue
        lines += [f"{path.absolute()} {index[target]}" for path in _files(folder)]
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ConfigError(f"{key}.class_map: class folder(s) {shown} of {root} are not pretraining classes "
                          f"(e.g. {', '.join(pretrain_classes[:3])}): map each to one")
    if not lines:
        raise ConfigError(f"{key}.root: no images under {root} in the {cfg.layout} layout")
    return lines


def group_of(location: str, root: Path, layout: str) -> str:
    """The corruption/severity of an image of the corruption layout ("" otherwise)."""
    if layout != "corruption":
        return ""
    corruption, severity = Path(location).relative_to(root.absolute()).parts[:2]
    return f"{corruption}/{severity}"


def by_severity(groups: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean top-1 over corruptions for each severity (how table A.6 reports ImageNet-C)."""
    per: dict[str, list[float]] = defaultdict(list)
    for group, row in groups.items():
        per[group.split("/")[1]].append(row["knn_top1"])
    return {severity: statistics.fmean(values) for severity, values in sorted(per.items())}


def robustness_result(name: str, bank: tuple[torch.Tensor, torch.Tensor], queries: tuple[torch.Tensor, torch.Tensor],
                      groups: list[str], knn_cfg, device) -> dict[str, Any]:
    """k-NN of the set's images against the pretraining train bank, overall and per corruption/severity
    (`groups`, one per query row; all "" for an ImageFolder)."""
    from lease.evaluate.knn import knn_classify

    knn = knn_classify(*bank, *queries, knn_cfg, device)
    result = base_result(name, "robustness", "fast", len(groups))
    result.update(knn_top1=knn["top1"], knn=knn,
                  note="k-NN against the pretraining train bank (cached centre-crop tokens)")
    if any(groups):
        rows: dict[str, list[int]] = defaultdict(list)
        for i, group in enumerate(groups):
            rows[group].append(i)
        result["groups"] = {}
        for group, idx in sorted(rows.items()):
            index = torch.tensor(idx, device=queries[0].device)
            top1 = knn_classify(*bank, queries[0][index], queries[1][index], knn_cfg, device)["top1"]
            result["groups"][group] = {"knn_top1": top1, "images": len(idx)}
        result["by_severity"] = by_severity(result["groups"])
    return result


def base_result(name: str, role: str, protocol: str, images: int) -> dict[str, Any]:
    """result.json's fields (INTERFACES.md), unmeasured ones null."""
    return {"name": name, "role": role, "protocol": protocol, "images": images, "knn_top1": None,
            "linear_probe_top1": None, "fewshot": None, "note": None}


def transfer_result(name: str, protocol: str, images: int, knn: dict, probe: dict, fewshot: dict) -> dict[str, Any]:
    """k-NN (train bank → val), linear probe and few-shot of a transfer set."""
    result = base_result(name, "transfer", protocol, images)
    result.update(knn_top1=knn["top1"], linear_probe_top1=probe["top1"],
                  fewshot={shots: row["top1"] for shots, row in fewshot["shots"].items()},
                  knn=knn, linear_probe=probe, fewshot_detail=fewshot,
                  note=None if protocol != "fast" else "probes on cached centre-crop tokens (evaluate.protocol fast)")
    return result
