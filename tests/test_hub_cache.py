"""Checkpoints by name from the machine's own caches (HF id, timm name): found offline, or a clear error."""
import pytest
from huggingface_hub import constants

from lease.tokenizers.dinov2 import load_dinov2
from lease.tokenizers.hub_cache import NotCachedError, resolve_checkpoint
from lease.tokenizers.tiny import save_tiny_hf_dinov2, save_tiny_timm_dinov2
from lease.typed_config import ConfigError
from pipeline.config import load_pipeline_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache, repo_id: str):
    """The HF cache's own layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: a network call would fail the test
    return cache


def test_an_hf_id_resolves_to_its_cached_snapshot_and_loads(hf_cache):
    snapshot = save_tiny_hf_dinov2(cached_repo(hf_cache, "facebook/dinov2-base"))
    assert resolve_checkpoint("facebook/dinov2-base") == snapshot
    cfg = load_pipeline_config("demo", ["tokenizers.dinov2.path=facebook/dinov2-base"])
    assert cfg.tokenizers.dinov2.path == str(snapshot)  # the stage keys and loads the local copy
    assert load_dinov2("hf", cfg.tokenizers.dinov2.path).embed_dim > 0


def test_a_timm_name_resolves_to_its_cached_weights_file(hf_cache):
    weights = cached_repo(hf_cache, "timm/vit_small_patch14_dinov2.lvd142m") / "model.safetensors"
    weights.parent.mkdir(parents=True)
    save_tiny_timm_dinov2(weights, layout="timm")
    assert resolve_checkpoint("timm:vit_small_patch14_dinov2.lvd142m") == weights
    cfg = load_pipeline_config("demo", ["tokenizers.dinov2.kind=timm",
                                        "tokenizers.dinov2.path=timm:vit_small_patch14_dinov2.lvd142m"])
    assert cfg.tokenizers.dinov2.path == str(weights)


def test_an_uncached_name_fails_the_config_saying_how_to_bring_it(hf_cache):
    with pytest.raises(ConfigError, match=r"tokenizers\.dinov2\.path: facebook/dinov2-large is neither a directory "
                                          r"here nor in the local Hugging Face cache.*huggingface-cli download facebook/dinov2-large"):
        load_pipeline_config("demo", ["tokenizers.dinov2.path=facebook/dinov2-large"])
    with pytest.raises(NotCachedError, match="not cached here"):
        resolve_checkpoint("timm:vit_base_patch14_dinov2.lvd142m")
    with pytest.raises(ConfigError, match="tokenizers.dinov2.kind"):  # an HF id read as a timm file
        load_pipeline_config("demo", ["tokenizers.dinov2.kind=timm", "tokenizers.dinov2.path=facebook/dinov2-base"])
