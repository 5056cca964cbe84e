"""`lease bench authors`: the authors' MAGE is read from a clone the user names, their `taming/` wins over
an installed taming-transformers while it is built, and the record reaches the benchmark table."""
import json
import sys

import pytest

from benchmarks.authors import check_repo, inside
from benchmarks.cli import main as bench_main
from benchmarks.train import results_table


def fake_clone(root):
    """The files `check_repo` looks for; `taming/` without `__init__.py`, as in LTH14/mage."""
    (root / "taming" / "models").mkdir(parents=True)
    (root / "taming" / "models" / "vqgan.py").write_text("WHERE = 'the clone'\n")
    (root / "config").mkdir()
    (root / "config" / "vqgan.yaml").write_text("model: {}\n")
    (root / "util").mkdir()
    (root / "util" / "pos_embed.py").write_text("")
    (root / "models_mage.py").write_text("")
    return root


def test_a_folder_that_is_not_their_clone_is_named_before_any_gpu_work(tmp_path):
    (tmp_path / "models_mage.py").write_text("")
    with pytest.raises(SystemExit, match=r"config/vqgan.yaml, taming/models/vqgan.py, util/pos_embed.py not "
                                         r"there; give a clone of github.com/LTH14/mage"):
        bench_main(["authors", "--repo", str(tmp_path)])
    check_repo(fake_clone(tmp_path / "clone"))  # complete: no error


def test_their_taming_shadows_the_installed_one_only_while_their_model_is_built(tmp_path, monkeypatch):
    import importlib.util
    assert importlib.util.find_spec("taming") is not None, "the pinned taming-transformers is installed"
    import taming  # the installed package, already imported, as our own VQGAN loader may have done
    installed = sys.modules["taming"]
    clone = fake_clone(tmp_path / "clone")
    with inside(clone):
        from taming.models import vqgan
        assert vqgan.WHERE == "the clone"
        assert (clone / "config" / "vqgan.yaml").samefile("config/vqgan.yaml")  # their relative path resolves
    assert sys.modules["taming"] is installed is taming and "taming.models.vqgan" not in sys.modules
    assert str(clone) not in sys.path


def test_the_authors_record_reaches_the_table(tmp_path):
    record = {"name": "authors-mage-vit_base-b256-ours_compile", "machine": {"gpu": "GPU", "torch": "2"},
              "results": {"authors": {"dtype": "fp16 autocast", "batch_size": 256, "images_per_s": 400.0,
                                      "median_ms_per_step": 640.0, "peak_memory_gib": 50.0},
                          "ours": {"dtype": "bf16", "compile": True, "images_per_s": 1000.0},
                          "ours_over_authors": 2.5}}
    (tmp_path / "authors-mage-vit_base-b256-ours_compile.json").write_text(json.dumps(record))
    rows = [line for line in results_table(tmp_path).splitlines() if "authors' MAGE" in line]
    assert len(rows) == 1 and "| 400 img/s |" in rows[0] and "1000 img/s in the same job: 2.50×" in rows[0]
