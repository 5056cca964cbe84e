"""Class-conditional generation from the frozen encoder (issue 27): CLIP class embeddings, the frozen
fine-tuning, the sampler's fixed conditioning, and class statistics learnt from planted tokens."""
import numpy as np
import pytest
import torch

from lease.checkpoints import load_checkpoint, model_from_checkpoint
from lease.clip_text import ClipNotFound, class_embeddings, save_class_embeddings
from lease.condgen import (DECODER_PREFIXES, class_condition, condgen_config, conditional_model, generate_class,
                           load_conditional_export, train_condgen)
from lease.configs import train_config
from lease.data import read_token_set
from lease.evaluate.generate import GenerateConfig, MaskGitSampler
from lease.masking import random_plan
from lease.synthetic import planted_codebook, planted_tokens
from lease.tokenizers.tiny import save_tiny_hf_clip
from lease.train import train
from planted import write_shards

CLASSES, CONCEPTS, SYNONYMS, GRID = 4, 16, 4, 4
NAMES = ["zero", "one", "two", "three"]
MODEL = {"vocab_gen": CONCEPTS * SYNONYMS, "grid_size": GRID}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_hf_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, clip_dir):
    """Planted shards (each class its own concept preferences), a short pretraining, the class embeddings."""
    root = tmp_path_factory.mktemp("condgen")
    vq, disc, labels = planted_tokens(768, CLASSES, GRID * GRID, CONCEPTS, SYNONYMS, seed=0, concentration=0.1)
    shards = write_shards(root / "shards", vq, disc, labels, per_shard=256)
    codebook = root / "centroids.npy"
    np.save(codebook, planted_codebook(CONCEPTS, 8, seed=0))
    data = {"shards": str(shards), "codebook": str(codebook), "gpu_resident": "on"}
    pretrain = train_config({"preset": "tiny", "model": MODEL, "batch_size": 64, "max_steps": 2, "log_every": 1,
                             "data": data})
    train(pretrain, root / "pretrain")  # the encoder's weights only need to be a real checkpoint's
    embeddings = class_embeddings(clip_dir, NAMES)
    save_class_embeddings(root / "classes.npy", embeddings.features, NAMES, embeddings.template, embeddings.key)
    return {"root": root, "data": data, "pretrained": str(root / "pretrain" / "checkpoint.pt"),
            "classes": str(root / "classes.npy"), "shards": shards}


def condgen_cfg(run, tail: str, steps: int):
    return condgen_config({"pretrained": run["pretrained"], "class_embeddings": run["classes"], "tail": tail,
                           "train": {"model": {**MODEL, "dropout": 0.0}, "batch_size": 32, "max_steps": steps,
                                     "log_every": 50, "optim": {"base_lr": 0.05, "warmup_epochs": 0.5},
                                     "data": run["data"]}})


def test_class_embeddings_have_one_row_per_class_and_are_cached_by_digest_names_template(clip_dir, tmp_path):
    first = class_embeddings(clip_dir, NAMES, cache_dir=tmp_path)
    assert tuple(first.features.shape) == (len(NAMES), 32) and not first.cached
    assert torch.allclose(first.features.norm(dim=-1), torch.ones(len(NAMES)))
    assert not torch.allclose(first.features[0], first.features[1])  # names make different prompts
    again = class_embeddings(clip_dir, NAMES, cache_dir=tmp_path)
    assert again.cached and again.key == first.key and torch.equal(again.features, first.features)
    other_template = class_embeddings(clip_dir, NAMES, "A photo of a {}", cache_dir=tmp_path)
    assert not other_template.cached and other_template.key != first.key
    assert not torch.allclose(other_template.features, first.features)
    other_names = class_embeddings(clip_dir, NAMES[:3], cache_dir=tmp_path)
    assert not other_names.cached and other_names.features.shape[0] == 3
    with pytest.raises(ClipNotFound, match="CLIPModel directory"):
        class_embeddings(tmp_path / "absent", NAMES)


def test_only_the_decoder_gets_gradients_and_the_encoder_stays_bit_identical(run):
    cfg = condgen_cfg(run, "centroids", steps=6)
    model = conditional_model(cfg)
    tokens = read_token_set(run["shards"])
    plan = random_plan(8, GRID * GRID, 8, 12, torch.device("cpu"), torch.Generator().manual_seed(0))
    out = model(tokens.vq[:8].long(), tokens.disc[:8].long(), plan, tokens.labels[:8])
    out.loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.startswith(DECODER_PREFIXES), name
    assert model.tail_proj.weight.grad.abs().sum() > 0 and model.class_proj.weight.grad.abs().sum() > 0

    out_dir = run["root"] / "frozen"
    result = train_condgen(cfg, out_dir)
    assert result["completed"] and result["steps"] == 6
    before, after = load_checkpoint(run["pretrained"])["model"], load_checkpoint(out_dir / "checkpoint.pt")["model"]
    encoder = [k for k in after if k.startswith(("token_emb.", "blocks.", "norm."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(before["decoder_blocks.0.mlp.fc1.weight"], after["decoder_blocks.0.mlp.fc1.weight"])
    # the export (with the pretraining's encoder export) is the same sampler as the checkpoint
    trained = model_from_checkpoint(out_dir / "checkpoint.pt").eval()
    exported = load_conditional_export(out_dir / "export", run["root"] / "pretrain" / "export")
    condition = class_condition(trained, 1, 2, tokens.disc[:2], torch.device("cpu"))
    masked = torch.ones(2, GRID * GRID, dtype=torch.bool)
    ids = torch.zeros(2, GRID * GRID, dtype=torch.long)
    assert torch.equal(trained.code_logits(ids, masked, condition), exported.code_logits(ids, masked, condition))


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_the_sampler_never_changes_the_fixed_conditioning(run, guidance):
    model = conditional_model(condgen_cfg(run, "centroids", steps=1)).eval()
    tails = read_token_set(run["shards"]).disc[:4].long()
    condition = class_condition(model, 2, 4, tails, torch.device("cpu"))
    given = (condition.classes.clone(), condition.tail.clone())
    seen, code_logits = [], model.code_logits

    def recording(tokens, masked, cond):
        seen.append((cond.classes.clone(), cond.tail.clone()))
        return code_logits(tokens, masked, cond)

    model.code_logits = recording
    sampler = MaskGitSampler(model, GenerateConfig(preset="maskgit", num_steps=5, guidance=guidance), "cpu")
    sampler.sample(4, condition)
    assert len(seen) == 5
    assert torch.equal(condition.classes, given[0]) and torch.equal(condition.tail, given[1])
    for classes, tail in seen:  # guided: the class half then the null half, same tails
        assert torch.equal(classes[:4], given[0]) and torch.equal(tail[:4], given[1])
        if guidance:
            assert torch.equal(classes[4:], torch.full((4,), -1)) and torch.equal(tail[4:], given[1])
        else:
            assert classes.shape[0] == 4


def test_conditional_samples_follow_their_own_class_code_statistics(run):
    """Class token alone (tail none): each class's samples' concept histogram is nearest its own class's."""
    out_dir = run["root"] / "planted"
    train_condgen(condgen_cfg(run, "none", steps=250), out_dir)
    model = model_from_checkpoint(out_dir / "checkpoint.pt")
    tokens = read_token_set(run["shards"])
    sampler = MaskGitSampler(model, GenerateConfig(preset="maskgit", num_steps=6, batch_size=32, seed=1), "cpu")

    def histogram(codes: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(codes.long().flatten() // SYNONYMS, minlength=CONCEPTS).float()
        return counts / counts.sum()

    truth = torch.stack([histogram(tokens.vq[tokens.labels == c]) for c in range(CLASSES)])
    drawn = torch.stack([histogram(generate_class(sampler, c, 32, None, "exemplar")) for c in range(CLASSES)])
    distance = torch.cdist(drawn, truth, p=1)  # [sampled class, true class]
    assert torch.equal(distance.argmin(dim=1), torch.arange(CLASSES)), distance
