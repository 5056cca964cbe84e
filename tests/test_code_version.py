"""Stage code versions come from the build functions' import graph: editing a module re-keys exactly the
stages that import it (and their dependents), and the graph misses nothing Python really imports."""
import json
import subprocess
import sys

import pytest

from pipeline import code_version
from pipeline.config import load_pipeline_config
from pipeline.stages import STAGES

REPO = code_version.REPO
CFG = load_pipeline_config("demo")
ENABLED = [name for name, stage in STAGES.items() if stage.enabled(CFG)]


def stage_keys() -> dict[str, str]:
    keys: dict[str, str] = {}
    for name in ENABLED:
        keys[name] = STAGES[name].spec(CFG, keys).key
    return keys


def closure(name: str) -> set[str]:
    return set(code_version.combined_identity(STAGES[name].functions)["modules"])


def with_dependents(names: set[str]) -> set[str]:
    out = set(names)
    for name in ENABLED:  # topological order
        if out & set(STAGES[name].upstream(CFG)):
            out.add(name)
    return out


@pytest.fixture(autouse=True)
def _fresh_graph():
    code_version.clear_caches()
    yield
    code_version.clear_caches()


def test_each_closure_holds_the_modules_that_shape_it_and_not_the_others():
    pretrain = closure("pretrain")
    # the modules a hand-written list once left out, so that edits to them were served stale
    assert {"lease.attention", "lease.dropout", "lease.typed_config", "lease.io", "lease.model"} <= pretrain
    assert "lease.model" not in closure("manifest") | closure("tokenize") | closure("pack")
    assert {"lease.evaluate.knn", "lease.evaluate.generate", "lease.checkpoints"} <= closure("evaluate")
    assert {"pipeline.tokenize", "lease.tokenizers.vqgan_maskgit", "pipeline.assign"} <= closure("tokenize")
    assert "pipeline.manifest" in closure("manifest") and "pipeline.pack" in closure("pack")
    identity = code_version.combined_identity(STAGES["kmeans"].functions)
    assert "faiss" in identity["packages"] and "transformers" not in identity["packages"]


MODULES = sorted(set().union(*(closure(name) for name in ENABLED)))


def test_editing_a_module_rekeys_exactly_the_stages_that_import_it(monkeypatch):
    """Every module of every enabled stage's closure, one edit at a time (one loop: the parsed graph is
    shared, since a comment changes a module's bytes, not its imports)."""
    before, real = stage_keys(), code_version.read_source
    for module in MODULES:
        edited = code_version.module_path(module)
        monkeypatch.setattr(code_version, "read_source",
                            lambda path, edited=edited: real(path) + (b"\n# edited\n" if path == edited else b""))
        code_version.code_identity.cache_clear()
        after = stage_keys()
        changed = {name for name in ENABLED if before[name] != after[name]}
        importers = {name for name in ENABLED if module in closure(name)}
        assert importers, f"{module} is in no stage's closure"
        assert changed == with_dependents(importers), module


def test_editing_a_build_function_rekeys_its_stage_and_dependents_only(monkeypatch):
    import inspect

    before = stage_keys()
    real = inspect.getsource
    build_pack = STAGES["pack"].build
    monkeypatch.setattr(inspect, "getsource",
                        lambda obj: real(obj) + ("    # edited\n" if obj is build_pack else ""))
    code_version.clear_caches()
    after = stage_keys()
    assert {name for name in ENABLED if before[name] != after[name]} == {"pack", "pretrain", "evaluate", "finetune",
                                                                         "report"}


def test_the_record_names_the_modules_and_package_versions(tmp_path):
    import torch

    spec = STAGES["pretrain"].spec(CFG, stage_keys())
    assert spec.code["packages"]["torch"] == torch.__version__.split("+")[0]  # the wheel's local tag aside
    assert "lease.model" in spec.code["modules"] and spec.config["device"] in ("cpu", "cuda")


DYNAMIC_IMPORTS = r"""
import json, os, sys
import numpy, torch, torchvision, PIL.Image, pyarrow, webdataset  # heavy third-party, shared by the forks
stages = json.loads(sys.argv[1])
found = {}
for name, modules in stages.items():
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        for module in modules:
            __import__(module)
        loaded = [m for m in sys.modules if m.split(".")[0] in ("lease", "pipeline", "flows")]
        os.write(write, json.dumps(loaded).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        found[name] = json.loads(fh.read())
    os.wait()
print(json.dumps(found))
"""


def test_the_static_graph_holds_every_module_python_imports_for_a_stage():
    """Import what each build function imports, in a fresh process per stage: every project module
    Python loads must be in the stage's closure (the graph may hold more, never less)."""
    entry = {}
    for name in ENABLED:
        named = set().union(*(code_version.function_dependencies(fn)[1] for fn in STAGES[name].functions))
        entry[name] = sorted(m for m in named if code_version.module_path(m) is not None)
    out = subprocess.run([sys.executable, "-c", DYNAMIC_IMPORTS, json.dumps(entry)], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    for name, loaded in json.loads(out.strip().splitlines()[-1]).items():
        missing = set(loaded) - closure(name)
        assert not missing, f"{name}: Python imported {sorted(missing)}, absent from its code version"
