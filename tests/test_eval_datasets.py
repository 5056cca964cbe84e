"""Evaluation datasets as branches (their keys, labels and layouts) and fid.json's missing-file line.

The branches run end to end, concurrently through Prefect, in tests/test_flow.py (with the demo's FID on
the random-weight Inception); these are the fast checks beside it.
"""
import argparse
import json

import pytest
import torch

from lease.io import CheckpointFileError
from lease.typed_config import ConfigError
from pipeline import evalsets
from pipeline.config import EvalDatasetConfig, load_pipeline_config
from pipeline.demo_data import class_styles, make_demo_corruptions
from pipeline.stages import BRANCHES, STAGES, _fid_result, all_stages, with_dependents

ROBUST = {"name": "c", "role": "robustness", "root": "demo", "layout": "corruption"}
TRANSFER = {"name": "t", "role": "transfer", "root": "demo"}


def config(*datasets: dict, **evaluate):
    overrides = [f"evaluate.datasets={json.dumps(list(datasets))}",
                 *[f"evaluate.{key}={value}" for key, value in evaluate.items()]]
    return load_pipeline_config("demo", overrides)


def keys(cfg) -> dict[str, str]:
    """Every enabled stage's key, computed in DAG order as the flow does (nothing runs)."""
    done = {}
    for stage in all_stages(cfg).values():
        if stage.enabled(cfg):
            done[stage.name] = stage.spec(cfg, done).key
    return done


def test_adding_a_dataset_adds_its_branch_and_changes_no_other_key():
    base = keys(config(ROBUST))
    added = keys(config(ROBUST, TRANSFER, {**ROBUST, "name": "c2", "layout": "imagefolder"}))
    new = {name: key for name, key in added.items() if name not in base}
    assert set(new) == {f"eval-{part}-{name}" for part in ("data", "manifest", "tokenize", "features")
                        for name in ("t", "c2")} | {"eval-t", "eval-c2"}
    # evaluate, eval-bank and branch c keep their keys; only the report, which lists the sets, moves
    assert {name for name in base if added[name] != base[name]} == {"report"}
    removed = keys(config())
    assert {name for name in removed if removed[name] != base[name]} == {"report"}
    assert set(removed) == {name for name in base if name in STAGES}


def test_a_dataset_change_moves_only_its_branch_and_pretrain_reaches_every_branch():
    cfg = config(ROBUST, TRANSFER)
    before = keys(cfg)
    after = keys(config(ROBUST, {**TRANSFER, "val_fraction": 0.5}))
    assert {name for name in before if before[name] != after[name]} == {"eval-manifest-t", "eval-tokenize-t",
                                                                         "eval-features-t", "eval-t", "report"}
    forced = with_dependents(cfg, ["pretrain"])
    assert {"eval-bank", "eval-features-c", "eval-features-t", "eval-c", "eval-t"} <= forced
    assert not forced & {"eval-tokenize-c", "eval-manifest-t"}
    assert BRANCHES not in forced


def test_dataset_names_and_layouts_are_checked_naming_the_key():
    with pytest.raises(ConfigError, match=r"evaluate\.datasets\[1\]\.name"):
        config(ROBUST, {**TRANSFER, "name": "Bad-Name"})
    with pytest.raises(ConfigError, match="names must differ"):
        config(ROBUST, ROBUST)
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.layout"):
        config({**TRANSFER, "layout": "corruption"})
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.root.*does not exist"):
        config({**TRANSFER, "root": "/nowhere/at/all"})


def test_robustness_images_get_pretraining_indices_by_folder_name_or_class_map(tmp_path):
    make_demo_corruptions(tmp_path, 3, 1, ["noise", "blur"], [1, 2], image_size=16, seed=0)
    classes = [f"c{i:03d}_{s.name}" for i, s in enumerate(class_styles(3))]
    cfg = EvalDatasetConfig(name="c", role="robustness", root=str(tmp_path), layout="corruption")
    lines = evalsets.robustness_listing(cfg, tmp_path, ["other", *classes], "evaluate.datasets[0]")
    assert len(lines) == 3 * 2 * 2
    by_class = {line.rsplit(" ", 1)[0].split("/")[-2]: int(line.rsplit(" ", 1)[1]) for line in lines}
    assert by_class == {name: i + 1 for i, name in enumerate(classes)}  # indices of the pretraining classes
    groups = sorted({evalsets.group_of(line.rsplit(" ", 1)[0], tmp_path, "corruption") for line in lines})
    assert groups == ["blur/1", "blur/2", "noise/1", "noise/2"]

    with pytest.raises(ConfigError, match=r"evaluate\.datasets\[0\]\.class_map: .*c001_"):
        evalsets.robustness_listing(cfg, tmp_path, [classes[0], classes[2]], "evaluate.datasets[0]")
    mapped = EvalDatasetConfig(name="c", role="robustness", root=str(tmp_path), layout="corruption",
                               class_map={classes[1]: "renamed"})
    lines = evalsets.robustness_listing(mapped, tmp_path, [classes[0], classes[2], "renamed"], "k")
    assert {int(line.rsplit(" ", 1)[1]) for line in lines} == {0, 1, 2}


def test_severity_means_average_the_corruptions():
    groups = {"blur/1": {"knn_top1": 50.0}, "noise/1": {"knn_top1": 30.0}, "noise/3": {"knn_top1": 10.0}}
    assert evalsets.by_severity(groups) == {"1": 40.0, "3": 10.0}


def test_a_missing_inception_file_is_one_line_in_fid_json_and_keys_still_compute(tmp_path):
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    cfg = config(**{"fid.inception": str(missing)})
    STAGES["evaluate"].spec(cfg, {})  # the key does not need the file
    result = _fid_result(cfg, {}, torch.zeros(3, 4, dtype=torch.uint16), None, "cpu")
    assert result["fid"] is None and result["isc"] is None and result["samples"] == 3
    assert "\n" not in result["missing"] and str(missing) in result["missing"]
    assert "weights-inception-2015-12-05-6726825d.pth" in result["missing"]
    assert "evaluate.fid.inception" in result["missing"] and result["extractor"] == str(missing)
    unset = _fid_result(config(**{"fid.inception": '""'}), {}, torch.zeros(1, 4), None, "cpu")
    assert unset["missing"].startswith("FID/IS not computed: provide torch-fidelity's Inception weights")


def test_an_inception_file_that_pickles_code_is_refused_before_torch_fidelity_reads_it(tmp_path):
    from lease.evaluate.fid import FidConfig, check_weights

    unsafe = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1), "meta": argparse.Namespace(a=1)}, unsafe)  # a pickled object
    with pytest.raises(CheckpointFileError, match="refusing|weights"):
        check_weights(FidConfig(weights=str(unsafe)))
