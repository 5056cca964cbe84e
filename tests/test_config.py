"""Pipeline config: presets load, overrides apply, bad keys and values fail naming the key."""
import pytest

from lease.typed_config import ConfigError
from pipeline.cli import main as lease_main
from pipeline.config import load_pipeline_config


def test_demo_preset_loads_with_its_trainer_preset():
    cfg = load_pipeline_config("demo")
    assert cfg.uses_demo_data and cfg.uses_demo_assets
    assert cfg.pretrain.preset == "tiny" and cfg.pretrain.model.embed_dim == 64  # preset filled the sizes
    assert cfg.pretrain.model.vocab_gen == cfg.tokenizers.demo.vqgan_codes


def test_overrides_reach_nested_sections():
    cfg = load_pipeline_config("demo", ["kmeans.k=32", "pretrain.model.dropout=0.5", "tokenizers.dinov2.layer=-2"])
    assert (cfg.kmeans.k, cfg.pretrain.model.dropout, cfg.tokenizers.dinov2.layer) == (32, 0.5, -2)


def test_on_off_words_reach_choice_settings_as_words():
    """YAML 1.1 reads a bare `off` as false; a setting whose choices are words still gets the word."""
    assert load_pipeline_config("demo", ["tokenize.compile=off"]).tokenize.compile == "off"
    assert load_pipeline_config("demo", ["tokenize.compile=on"]).tokenize.compile == "on"
    with pytest.raises(ConfigError, match="tokenize.compile"):
        load_pipeline_config("demo", ["tokenize.compile=maybe"])


def test_exponents_without_a_dot_read_as_numbers():
    """YAML 1.1 reads 1e-3 as a string; a float setting takes it as the number it means."""
    assert load_pipeline_config("demo", ["pretrain.optim.base_lr=1e-3"]).pretrain.optim.base_lr == 1e-3
    assert load_pipeline_config("demo", ["pretrain.optim.base_lr=-2.5E+2"]).pretrain.optim.base_lr == -250.0
    with pytest.raises(ConfigError, match="pretrain.optim.base_lr"):
        load_pipeline_config("demo", ["pretrain.optim.base_lr=1e-3x"])


@pytest.mark.parametrize("override, named", [
    ("kmeans.kk=3", "kmeans.kk"),
    ("nosuch=1", "nosuch"),
    ("kmeans.k=many", "kmeans.k"),
    ("kmeans.k=1", "kmeans.k"),
    ("tokenizers.vqgan.kind=jax", "tokenizers.vqgan.kind"),
    ("pretrain.model.depth=x", "pretrain.model.depth"),
    ("pretrain.optim.nope=1", "pretrain.optim.nope"),
    ("pretrain.batch_size=0", "pretrain.batch_size"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("data.source=/no/such/folder", "data.source"),
    ("kmeans.codebook=/no/such/km.npy", "kmeans.codebook"),
    ("pretrain.model.vocab_gen=1024", "pretrain.model.vocab_gen"),  # the demo VQGAN has 64 codes
    ("kmeans.k=100000", "kmeans.k"),  # more centroids than sampled features
    # values that once failed only when their stage started, after the upstream work
    ("tokenize.batch_size=-1", "tokenize.batch_size"),
    ("tokenize.images_per_shard=0", "tokenize.images_per_shard"),
    ("tokenize.num_workers=-1", "tokenize.num_workers"),
    ("features.batch_size=0", "features.batch_size"),
    ("pack.samples_per_shard=0", "pack.samples_per_shard"),
    ("evaluate.batch_size=0", "evaluate.batch_size"),
    ("kmeans.num_neighbours=-1", "kmeans.num_neighbours"),
    ("tokenizers.demo.dino_heads=3", "tokenizers.demo.dino_hidden"),
    ("device=cpux", "device"),
    ("device=cuda:99", "device"),  # no such GPU here
    ("pretrain.nnodes=2", "pretrain.rdzv_endpoint"),  # several machines need a rendezvous
    ("pretrain.nproc_per_node=-1", "pretrain.nproc_per_node"),
])
def test_bad_key_or_value_is_named(override, named):
    with pytest.raises(ConfigError) as err:
        load_pipeline_config("demo", [override])
    assert named in str(err.value)


def test_paper_preset_needs_its_files_and_loads_when_they_exist(tmp_path):
    with pytest.raises(ConfigError, match="data.source"):
        load_pipeline_config("in1k_vitb")
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "vqgan.ckpt").write_bytes(b"")
    (tmp_path / "dinov2").mkdir()
    cfg = load_pipeline_config("in1k_vitb", [f"data.source={tmp_path / 'imagenet'}",
                                             f"tokenizers.vqgan.checkpoint={tmp_path / 'vqgan.ckpt'}",
                                             f"tokenizers.dinov2.path={tmp_path / 'dinov2'}"])
    assert cfg.kmeans.k == 16384 and cfg.pretrain.epochs == 1600 and cfg.pretrain.batch_size == 4096
    assert cfg.pretrain.model.embed_dim == 768 and cfg.pretrain.model.depth == 12


def test_lease_run_rejects_a_bad_key_before_any_work(tmp_path, caplog):
    assert lease_main(["run", "--config", "demo", f"artifacts={tmp_path}", "pack.samples_per_shard=lots"]) == 2
    assert "pack.samples_per_shard" in caplog.text
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("samples, fits", [(26, 16), (31, 16), (8, 8)])
def test_pretrain_caps_the_batch_at_a_small_folder_and_says_so(samples, fits, caplog):
    from pipeline.stages import _batch_for_data

    assert _batch_for_data(32, {"samples": samples}) == fits
    assert f"pretrain.batch_size=32 is more than the {samples} train samples" in caplog.text
    assert f"training with batches of {fits}" in caplog.text
    assert _batch_for_data(fits, {"samples": samples}) == fits  # that one fits as it is
    with pytest.raises(ValueError, match="no train samples"):
        _batch_for_data(32, {})


def test_config_show_prints_the_resolved_config_and_names_a_bad_key(capsys, caplog):
    import yaml

    # in1k_vitb's data.source is not on this machine: show still prints it (no path or device checks)
    assert lease_main(["config", "show", "in1k_vitb", "kmeans.k=512", "pretrain.epochs=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["kmeans"]["k"] == 512 and shown["pretrain"]["epochs"] == 3
    assert shown["pretrain"]["model"]["embed_dim"] == 768  # the trainer preset is resolved, not just echoed
    assert lease_main(["config", "show", "demo", "kmeans.nosuch=1"]) == 2
    assert "kmeans.nosuch" in caplog.text
