"""evaluate.protocol: online-tokenized probes (authors: warm-up, best epoch; paper: last epoch), labelled results."""
from __future__ import annotations

import json

import pytest
import torch

from lease.configs import model_config
from lease.evaluate import report
from lease.evaluate.fewshot import FewShotConfig
from lease.evaluate.linear_probe import ProbeConfig
from lease.evaluate.online import AugmentConfig, AugmentedImages, OnlineTokenizer, view_transform
from lease.evaluate.protocols import ONLINE, OnlineViews, chosen_epoch, embedding_dropout, labelled, online_probes
from lease.model import LeaseModel
from lease.tokenizers import load_vqgan
from lease.images import decode_location
from pipeline.manifest import read_manifest
from test_eval_online import SIZE, assets  # noqa: F401  (the module fixture)


@pytest.fixture(scope="module")
def setup(assets):  # noqa: F811
    torch.manual_seed(0)
    model = LeaseModel(model_config("tiny", grid_size=16, vocab_gen=32, embed_dim=32, num_heads=2,
                                    decoder_embed_dim=32, decoder_num_heads=2, contrast_on="none"))
    aug = AugmentConfig(image_size=SIZE, val_resize=72, batch_size=4, num_workers=0)
    views = {}
    for split, view in (("train", "train"), ("val", "val")):
        rows = read_manifest(assets / "manifest.parquet", split=split)
        views[split] = AugmentedImages(rows["location"].to_pylist(), rows["label"].to_pylist(),
                                       view_transform(aug, view), decode_location)
    tokenizer = OnlineTokenizer(load_vqgan("maskgit", assets / "vqgan.ckpt", device="cpu"), aug.batch_size)
    return model, OnlineViews(views["train"], views["val"], tokenizer), aug


def test_online_protocols_select_the_best_or_the_last_epoch(setup):
    model, views, aug = setup
    probe = ProbeConfig(batch_size=3, epochs=4, base_lr=2.0, warmup_epochs=0)
    fewshot = FewShotConfig(shots=[2], seeds=[0], epochs=2, batch_size=2)
    authors = online_probes("authors", model, views, probe, fewshot, aug)
    paper = online_probes("paper", model, views, probe, fewshot, aug)
    for result, protocol in ((authors, "authors"), (paper, "paper")):
        lp = result["linear_probe"]
        assert len(lp["top1_per_epoch"]) == 4 and lp["num_train"] == 6 and lp["num_val"] == 6
        assert lp["warmup_epochs"] == {"authors": 4, "paper": 0}[protocol]  # authors: 10, capped at the epochs
        assert result["fewshot"]["shots"]["2"]["num_train"] == 4
    lp = authors["linear_probe"]
    assert lp["top1"] == max(lp["top1_per_epoch"]) == lp["top1_per_epoch"][lp["epoch"] - 1]
    assert paper["linear_probe"]["epoch"] == 4
    assert paper["linear_probe"]["top1"] == paper["linear_probe"]["top1_per_epoch"][-1]
    # authors' few-shot scales lr 1.0 by batch / 256; paper's keeps the config's reading (unscaled)
    assert authors["fewshot"]["scale_lr"] is True and paper["fewshot"]["scale_lr"] is False
    assert model.training  # the protocol gave the model back in the mode it found it


def test_authors_report_the_best_epoch_and_paper_the_last():
    assert chosen_epoch([10.0, 30.0, 20.0, 30.0], ONLINE["authors"].select) == 1
    assert chosen_epoch([10.0, 30.0, 20.0], ONLINE["paper"].select) == 2


def test_embedding_dropout_is_on_only_in_the_token_embedding(setup):
    model = setup[0]
    with embedding_dropout(model, True):
        assert model.token_emb.training and not model.blocks.training
        ids = torch.randint(0, 32, (2, 256))
        a, b = model.token_emb.dropout(torch.ones(4, 64)), model.token_emb.dropout(torch.ones(4, 64))
        assert not torch.equal(a, b)
    with embedding_dropout(model, False):
        assert not model.token_emb.training
        assert torch.equal(model.features(ids), model.features(ids))


def test_every_result_and_the_report_name_their_protocol(tmp_path):
    results = labelled({"knn": {"top1": 1.0, "top5": 2.0, "k": 20, "temperature": 0.07},
                        "linear_probe": {"top1": 3.0, "top5": 4.0},
                        "fewshot": {"shots": {"5": {"top1": 5.0, "std": 0.0}}, "average": 5.0}}, "authors")
    assert [r["eval_protocol"] for r in results.values()] == ["fast", "authors", "authors"]
    for name, result in results.items():
        (tmp_path / report.RESULT_FILES[name]).write_text(json.dumps(result))
    protocols = {row.metric: row.protocol for table in report.build_tables(report.ReportInputs(eval_dir=tmp_path),
                                                                           report.RunFacts()) for row in table.rows}
    assert protocols["linear probe top-1"].startswith("authors (")
    assert "fast (cached centre-crop tokens)" in protocols["this run's val split: k-NN top-1"]
    assert protocols["5-shot top-1 (mean ± std over seeds)"].startswith("authors (")