"""MaskGIT decoding invariants, task masks, grids, and the sampler on a tiny real LEASE model."""
import math

import pytest
import torch
from PIL import Image

from benchmarks.generate import bench_generate
from lease.configs import model_config
from lease.evaluate.generate import (
    GENERATE_PRESETS,
    GenerateConfig,
    MaskGitSampler,
    decode_images,
    mask_schedule,
    maskgit_decode,
    maskgit_step,
    task_mask,
)
from lease.images import to_uint8
from lease.evaluate.grids import masked_preview, save_comparison_grid, save_image_grid
from lease.model import LeaseModel
from lease.typed_config import ConfigError, from_dict

V, GRID = 32, 4
L = GRID * GRID


def random_logits(seed: int = 0):
    """A stand-in for model.code_logits: fresh random logits for every call."""
    gen = torch.Generator().manual_seed(seed)
    return lambda tokens, masked: torch.randn(*tokens.shape, V, generator=gen) * 3


class Recorder:
    """Wraps maskgit_step to keep every step's inputs and outputs."""

    def __init__(self):
        self.steps = []

    def __call__(self, logits, tokens, masked, *rest):
        sampled, remask = maskgit_step(logits, tokens, masked, *rest)
        self.steps.append((tokens.clone(), masked.clone(), sampled.clone(), remask.clone()))
        return sampled, remask


def expected_masked_counts(initial: int, steps: int) -> list[int]:
    counts, still = [], initial
    for t in range(steps - 1):
        target = math.floor(initial * math.cos(math.pi / 2 * (t + 1) / steps))
        still = max(1, min(still - 1, target))
        counts.append(still)
    return counts + [0]


def test_schedule_unmasks_every_position_by_the_last_step():
    history = []
    empty = torch.zeros(3, L, dtype=torch.long)
    out = maskgit_decode(random_logits(), empty, torch.zeros_like(empty, dtype=torch.bool), 4, 4.5,
                         torch.Generator().manual_seed(0), history=history)
    counts = torch.stack(history)  # [steps, B]
    assert counts[:, 0].tolist() == expected_masked_counts(L, 4) == [14, 11, 6, 0]
    assert (counts == counts[:, :1]).all()  # every row follows the same schedule
    assert out.min() >= 0 and out.max() < V
    ratio, temperature = mask_schedule(4, 4.5, torch.device("cpu"))
    assert ratio[-1].abs() < 1e-6 and temperature.tolist() == pytest.approx([3.375, 2.25, 1.125, 0.0])


def test_many_steps_still_commit_at_least_one_token_per_step():
    history = []
    empty = torch.zeros(2, L, dtype=torch.long)
    maskgit_decode(random_logits(1), empty, torch.zeros_like(empty, dtype=torch.bool), 40, 4.5,
                   torch.Generator().manual_seed(0), history=history)
    counts = torch.stack(history)[:, 0].tolist()
    assert counts == expected_masked_counts(L, 40)
    assert all(b <= a for a, b in zip([L] + counts, counts)) and counts[-1] == 0


class LastLogits:
    """Random logits like `random_logits`, remembering the last call's inputs and output."""

    def __init__(self, seed: int):
        self.fn, self.calls = random_logits(seed), 0

    def __call__(self, tokens, masked):
        self.calls += 1
        self.tokens, self.masked, self.logits = tokens.clone(), masked.clone(), self.fn(tokens, masked)
        return self.logits


def test_mage_preset_unmasks_everything_and_its_last_step_is_greedy():
    cfg = GenerateConfig(preset="mage")
    assert (cfg.num_steps, cfg.choice_temperature, cfg.greedy_fill, cfg.dtype, cfg.uint8) == (
        20, 6.0, True, "fp32", "truncate")
    history, logits = [], LastLogits(4)
    empty = torch.zeros(3, L, dtype=torch.long)
    out = maskgit_decode(logits, empty, torch.zeros_like(empty, dtype=torch.bool), cfg.num_steps,
                         cfg.choice_temperature, torch.Generator().manual_seed(0), history=history,
                         greedy_last=cfg.greedy_fill)
    counts = torch.stack(history)[:, 0].tolist()
    # the 20 scheduled steps keep at least one position masked (MAGE's clamp); the extra pass fills it
    assert counts == expected_masked_counts(L, 20)[:-1] + [1, 0] and logits.calls == 21
    last = logits.masked
    assert last.sum(1).tolist() == [1, 1, 1]
    assert torch.equal(out[last], logits.logits.argmax(-1)[last])  # greedy: the arg-max code
    assert torch.equal(out[~last], logits.tokens[~last])  # everything else was committed before


def test_generation_presets_and_overrides():
    maskgit = from_dict(GenerateConfig, {"preset": "maskgit"})
    assert (maskgit.num_steps, maskgit.choice_temperature, maskgit.greedy_fill) == (12, 4.5, False)
    assert from_dict(GenerateConfig, {"preset": "mage", "dtype": "bf16", "num_steps": 8}).dtype == "bf16"
    assert set(GENERATE_PRESETS) == {"mage", "maskgit"}
    with pytest.raises(ConfigError, match="preset"):
        from_dict(GenerateConfig, {"preset": "magvit"})
    images = torch.tensor([0.0, 0.5, 0.999, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert to_uint8(images, "truncate")[0, 0].flatten().tolist() == [0, 127, 254, 255]
    assert to_uint8(images, "round")[0, 0].flatten().tolist() == [0, 128, 255, 255]


def test_fixed_tokens_never_change_and_committed_tokens_are_never_remasked():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (4, L), generator=gen)
    fixed = torch.rand(4, L, generator=gen) < 0.4
    fixed[3] = True  # a row with nothing to decode
    recorder = Recorder()
    out = maskgit_decode(random_logits(2), tokens, fixed, 6, 4.5, torch.Generator().manual_seed(1), recorder)
    assert torch.equal(out[fixed], tokens[fixed])
    assert torch.equal(out[3], tokens[3])
    for before, masked, sampled, remask in recorder.steps:
        assert not (remask & ~masked).any()  # only still-masked positions can be masked again
        assert torch.equal(sampled[~masked], before[~masked])  # known positions keep their code
        assert not (masked & fixed).any()
    committed = ~recorder.steps[0][1]
    for _, masked, sampled, remask in recorder.steps:
        assert torch.equal(sampled[committed], out[committed])  # once committed, a token stays
        committed = committed | (masked & ~remask)


def test_decoding_is_reproducible_from_the_seed():
    empty = torch.zeros(2, L, dtype=torch.long)
    free = torch.zeros_like(empty, dtype=torch.bool)
    runs = [maskgit_decode(random_logits(5), empty, free, 5, 4.5, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_step_traces_into_one_graph():
    torch._dynamo.reset()
    compiled = torch.compile(maskgit_step, backend="eager", fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, L, V, generator=gen)
    tokens = torch.randint(0, V, (2, L), generator=gen)
    masked = torch.rand(2, L, generator=gen) < 0.7
    args = (logits, tokens, masked, masked.sum(1, keepdim=True), torch.tensor(0.5), torch.tensor(2.0),
            torch.rand(2, L, V, generator=gen), torch.rand(2, L, generator=gen))
    for got, want in zip(compiled(*args), maskgit_step(*args)):
        assert torch.equal(got, want)


def test_task_masks():
    gen = torch.Generator().manual_seed(0)
    rec = task_mask("reconstruction", 3, 8, gen, torch.device("cpu"), ratio=0.3)
    assert rec.sum(1).tolist() == [math.ceil(64 * 0.3)] * 3
    inpaint = task_mask("inpainting", 2, 8, gen, torch.device("cpu"), box=0.5)
    outpaint = task_mask("outpainting", 2, 8, gen, torch.device("cpu"), box=0.5)
    assert inpaint.view(2, 8, 8)[0, 2:6, 2:6].all() and inpaint.sum(1).tolist() == [16, 16]
    assert torch.equal(outpaint, ~inpaint)
    with pytest.raises(ValueError, match="inpainting"):
        task_mask("colourise", 1, 8, gen, torch.device("cpu"))


class FakeVQGAN:
    """Stand-in decoder: each code becomes a flat 4×4 colour patch."""

    def __init__(self):
        self.palette = torch.rand(V, 3, generator=torch.Generator().manual_seed(0))

    def decode(self, codes):
        img = self.palette[codes].permute(0, 3, 1, 2)  # [B, 3, h, w]
        return torch.nn.functional.interpolate(img, scale_factor=4, mode="nearest") * 1.2 - 0.1  # overshoots [0, 1]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LeaseModel(model_config("tiny", grid_size=GRID, vocab_gen=V, embed_dim=32, num_heads=2,
                                   decoder_embed_dim=32, decoder_num_heads=2, contrast_on="none"))


def test_sampler_with_tiny_model(tiny_model):
    sampler = MaskGitSampler(tiny_model, GenerateConfig(num_steps=4, batch_size=3, num_images=5), "cpu")
    samples = sampler.generate()
    assert samples.shape == (5, L) and samples.dtype == torch.uint16
    assert int(samples.long().max()) < V
    real = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(9))
    regen = task_mask("outpainting", 2, GRID, sampler.generator, sampler.device)
    out = sampler.complete(real, regen)
    assert torch.equal(out[~regen], real[~regen])
    images = decode_images(FakeVQGAN(), out, GRID)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert to_uint8(images).dtype == torch.uint8


def test_bench_generate_reports_throughput(tiny_model):
    result = bench_generate(tiny_model, FakeVQGAN(), batch_size=2, steps=3, dtype="fp32", device="cpu",
                            warmup=1, repeats=2, preset="maskgit")
    # timings on a shared CPU are noise; check the record's shape and its internal consistency
    assert min(result["images_per_s"], result["maskgit_images_per_s"], result["vqgan_decode_images_per_s"]) > 0
    assert result["seconds_for_50k"] == pytest.approx(50000 / result["images_per_s"], rel=0.01)
    assert result["steps"] == 3 and result["batch_size"] == 2


def test_grids_are_written(tmp_path):
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    path = save_image_grid(images, tmp_path / "samples.png", nrow=3, padding=2)
    with Image.open(path) as img:
        assert img.size == (3 * 18 + 2, 2 * 18 + 2)
    regen = task_mask("inpainting", 6, GRID, torch.Generator(), torch.device("cpu"))
    preview = masked_preview(images, regen, GRID)
    assert torch.allclose(preview[:, :, 4:12, 4:12], torch.full((6, 3, 8, 8), 0.5))
    assert torch.equal(preview[:, :, :4], images[:, :, :4])
    path = save_comparison_grid([images, preview, images.flip(0)], tmp_path / "inpainting.png")
    with Image.open(path) as img:
        assert img.size == (3 * 18 + 2, 6 * 18 + 2)
    with pytest.raises(ValueError, match="one shape"):
        save_comparison_grid([images, images[:2]], tmp_path / "bad.png")
