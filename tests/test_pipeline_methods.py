"""`pretrain.method` through the pipeline: the baselines run the same stages as LEASE (straight through
the artifact store, as the flow's tasks do), `mage_online` reading the manifest's images and the run's
VQGAN instead of the packed codes, and each method is its own pretrain key over one shared tokenization."""
import json
from pathlib import Path

import pytest
import torch

from lease.checkpoints import model_from_checkpoint
from pipeline.config import load_pipeline_config
from pipeline.stages import STAGES, TOKENIZE_STAGES, TRAIN_STAGES, run_in_process

from lease_runs import TINY

pytestmark = pytest.mark.slow  # one tiny tokenization, three tiny pretrain + evaluate runs, one condgen (~40 s)

RUN = [*TINY, "pretrain.batch_size=8", "pretrain.max_steps=3", "pretrain.log_every=1", "evaluate.knn.k=3",
       "evaluate.linear_probe.epochs=1", "evaluate.linear_probe.batch_size=8", "evaluate.generate.num_images=2",
       "evaluate.generate.batch_size=2", "evaluate.generate.num_steps=1", "evaluate.grid_rows=1",
       "evaluate.fid.reference_images=2", "evaluate.fewshot.shots=[1]", "evaluate.datasets=[]",
       "pretrain.online.num_workers=0"]
CONDGEN = ["condgen.enabled=on", "condgen.train.batch_size=8", "condgen.train.max_steps=2", "condgen.classes=2",
           "condgen.samples_per_class=2", "condgen.grid_classes=1", "condgen.grid_rows=1",
           "condgen.generate.num_steps=1", "condgen.generate.batch_size=2"]
SORCEN = ["loss.echo_crop_min=3", "loss.echo_crop_max=6", "model.projector_hidden=64", "model.projector_dim=32",
          "model.predictor_hidden=64"]


def run_method(root: Path, method: str, *extra: str) -> dict:
    cfg = load_pipeline_config("demo", [*RUN, f"artifacts={root}", f"pretrain.method={method}", *extra])
    return {o.name: o for o in run_in_process(cfg, (*TOKENIZE_STAGES, *TRAIN_STAGES))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """LEASE with fine-tuning and class-conditional generation, then the baselines on the same artifacts root."""
    root = tmp_path_factory.mktemp("methods")
    return {"lease": run_method(root, "lease", *CONDGEN),
            "sorcen": run_method(root, "sorcen", "finetune.enabled=off", *(f"pretrain.{o}" for o in SORCEN)),
            "mage_online": run_method(root, "mage_online", "finetune.enabled=off")}


def test_every_method_pretrains_and_evaluates_over_one_tokenization(runs):
    for method, outcomes in runs.items():
        assert outcomes["pretrain"].status == "ran" and outcomes["evaluate"].status == "ran", method
        assert outcomes["pretrain"].result["steps"] == 3, method
        losses = [float(v) for v in outcomes["pretrain"].result["final"].values() if isinstance(v, (int, float))]
        assert losses and all(torch.isfinite(torch.tensor(losses))), (method, outcomes["pretrain"].result)
    tokenized = {method: outcomes["tokenize"].key for method, outcomes in runs.items()}
    assert len(set(tokenized.values())) == 1, tokenized  # the baselines reuse LEASE's tokens
    assert all(outcomes["tokenize"].status == "cached" for method, outcomes in runs.items() if method != "lease")
    assert len({outcomes["pretrain"].key for outcomes in runs.values()}) == 3


def test_the_checkpoint_is_the_method_s_model(runs):
    sorcen = model_from_checkpoint(Path(runs["sorcen"]["pretrain"].path) / "checkpoint.pt", "cpu")
    lease = model_from_checkpoint(Path(runs["lease"]["pretrain"].path) / "checkpoint.pt", "cpu")
    assert sorcen.cfg.echo_contrast and not lease.cfg.echo_contrast
    assert sorcen.cfg.vocab_size != lease.cfg.vocab_size  # Sorcen's own token layout (2025 ids)


def test_mage_online_reads_the_manifest_and_the_vqgan(runs):
    """Its key names the manifest and demo-assets stages (the images and the VQGAN it reads in the step);
    the packed-code methods' keys do not."""
    online, packed = runs["mage_online"]["pretrain"], runs["lease"]["pretrain"]
    cfg = load_pipeline_config("demo", [*RUN, "pretrain.method=mage_online"])
    assert set(STAGES["pretrain"].upstream(cfg)) >= {"manifest", "demo-assets", "pack"}
    assert "manifest" not in STAGES["pretrain"].upstream(load_pipeline_config("demo", RUN))
    assert online.key != packed.key


def test_condgen_stages_train_the_decoder_and_score_with_the_evaluate_stage_s_inception(runs):
    """condgen.enabled adds class-embeddings → condgen → condgen-eval; without condgen.fid.weights its
    FID / IS use the evaluate stage's Inception (the demo's random one here), so both tables have numbers."""
    lease, sorcen = runs["lease"], runs["sorcen"]
    assert [lease[n].status for n in ("class-embeddings", "condgen", "condgen-eval", "report")] == ["ran"] * 4
    assert lease["class-embeddings"].result["classes"] == 4 and lease["condgen"].result["steps"] == 2
    result = lease["condgen-eval"].result
    assert result["classes"] == 2 and result["grids"] == ["class-0.png"]
    assert result["fid"] is not None and result["isc"] is not None, result
    assert "condgen" not in sorcen and "class-embeddings" not in sorcen  # off by default


def test_the_finetune_stage_fills_table_3(runs):
    lease = runs["lease"]
    assert lease["finetune"].status == "ran" and lease["finetune"].result["epochs"] == 1
    finetuned = json.loads((Path(lease["finetune"].path) / "finetune.json").read_text())
    assert 0 <= finetuned["top1"] <= finetuned["top5"] <= 100 and finetuned["num_classes"] == 4
    report = (Path(lease["report"].path) / "report.md").read_text()
    table_3 = report.split("Full fine-tuning", 1)[1].split("\n#", 1)[0]
    assert f"{finetuned['top1']:.2f}" in table_3 and "did not run" not in table_3
    assert "finetune" not in runs["sorcen"]
