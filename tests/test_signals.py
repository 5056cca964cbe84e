"""Stopping: real Ctrl-C (SIGINT to the whole process group, as a terminal sends it) to real `lease run`
processes with Prefect's temporary server, and what they print; the stop policy and the trainer's
handlers in process; a 24-image folder of the user's, with the demo's random tokenizers, to the report.

One folder goes through four runs, each continuing the one before with the command it printed: stopped
in tokenize, stopped in pretrain, stopped at once by a second Ctrl-C, then to the end.
"""
import io
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lease import stopping
from lease.checkpoints import load_checkpoint
from lease.train import train
from lease.configs import train_config
from lease.synthetic import planted_tokens
from pipeline.artifacts import ArtifactStore, StageSpec
from pipeline.cli import build_parser, continue_command
from pipeline.demo_data import make_demo_dataset
from pipeline.stages import RANDOM_TOKENIZERS
from planted import write_shards
from lease_runs import wait_until
from test_store_faults import tokenize_shards_written

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 40
TINY = ["features.num_images=16", "features.patches_per_image=16", "features.num_workers=0", "kmeans.k=8",
        "kmeans.iters=3", "tokenize.num_workers=1", "tokenize.batch_size=2", "tokenize.images_per_shard=2",
        "pack.samples_per_shard=16",        f"pretrain.max_steps={MAX_STEPS}", "pretrain.log_every=1", "pretrain.ckpt_every=1000",
        "evaluate.knn.k=3", "evaluate.linear_probe.epochs=2", "evaluate.linear_probe.batch_size=8",
        "evaluate.fewshot.seeds=[0]", "evaluate.generate.num_images=4",
        "evaluate.generate.batch_size=4", "evaluate.generate.num_steps=2", "evaluate.grid_rows=2",
        "evaluate.batch_size=16"]  # pretrain.batch_size stays the demo's 32: more than the folder holds
STOP_BOUND = 60  # seconds from the Ctrl-C to the exit
CONTINUE = re.compile(r"to continue: (.+)$", re.M)


# ------------------------------------------------------------------------------ the stop policy


def test_the_first_signal_interrupts_a_deferred_block_waits_and_the_second_exits():
    class ExitedAtOnce(Exception):
        pass

    def exit_now(sig):
        raise ExitedAtOnce(sig)

    with stopping.stop_on_signals(exit_now):
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert stopping.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # raised again, as if the first had been dropped
            time.sleep(5 * stopping.REPEAT_SECONDS)
        stopping.interrupt_taken()
        time.sleep(3 * stopping.REPEAT_SECONDS)  # caught now: no more
        with pytest.raises(ExitedAtOnce):
            signal.raise_signal(signal.SIGINT)
    assert stopping.requested() is None
    with stopping.stop_on_signals(exit_now), stopping.deferred("finishing the step"):
        signal.raise_signal(signal.SIGTERM)  # only noted: the deferred code stops by itself
        assert stopping.requested() == signal.SIGTERM
        with pytest.raises(ExitedAtOnce):
            signal.raise_signal(signal.SIGINT)
    with stopping.deferred("finishing the step"):  # no program's policy (lease train, torchrun workers)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # torchrun's agent relays the terminal's: still only noted
        assert stopping.requested() == signal.SIGINT


def test_a_training_run_gives_the_signal_handlers_back(tmp_path):
    vq, disc, labels = planted_tokens(64, 4, 16, 8, 4, seed=0)
    write_shards(tmp_path / "train", vq, disc, labels, per_shard=64)
    cfg = train_config({"preset": "tiny", "batch_size": 16, "max_steps": 2, "log_every": 1, "model": {
        "vocab_gen": 32, "grid_size": 4, "embed_dim": 16, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_num_heads": 2, "contrast_on": "none"}, "data": {"shards": str(tmp_path / "train")}})

    def before(signum, frame):
        raise AssertionError("not called")

    previous = {sig: signal.signal(sig, before) for sig in stopping.STOP_SIGNALS}
    try:
        assert train(cfg, tmp_path / "run")["completed"]
        assert {sig: signal.getsignal(sig) for sig in stopping.STOP_SIGNALS} == dict.fromkeys(previous, before)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_rerun_continues_an_interrupted_stage_even_when_forced_unless_restarted(tmp_path):
    """`make rerun STAGE=x` after a stopped `make rerun STAGE=x`: the complete artifact of before is still
    there, and the interrupted work must be continued, not thrown away; RESTART=1 throws it away."""
    store, spec = ArtifactStore(tmp_path), StageSpec(stage="pretrain", config={}, code_version="v")

    def build(stop: bool):
        def write(out: Path) -> dict:
            seen = sorted(p.name for p in out.iterdir())
            (out / f"work-{len(seen)}").write_text("done")
            if stop:
                raise KeyboardInterrupt
            return {"found": seen}
        return write

    assert store.run(spec, build(False)).result == {"found": []}
    assert store.run(spec, build(False), force=True).result == {"found": []}  # forced, complete: from nothing
    with pytest.raises(KeyboardInterrupt):
        store.run(spec, build(True), force=True)
    assert store.run(spec, build(False), force=True).result == {"found": ["work-0"]}  # continued
    with pytest.raises(KeyboardInterrupt):
        store.run(spec, build(True), force=True)
    assert store.run(spec, build(False), force=True, restart=True).result == {"found": []}


def test_the_command_that_continues_forces_only_the_interrupted_stage_and_never_restarts():
    args = build_parser().parse_args(["run", "--config", "demo", "--force", "kmeans", "--restart", "kmeans.k=8"])
    assert continue_command(args, "tokenize", forced=True).endswith("run --config demo --force tokenize kmeans.k=8")
    assert continue_command(args, "pretrain", forced=False).endswith("run --config demo kmeans.k=8")
    assert continue_command(args).endswith("run --config demo --force kmeans kmeans.k=8")  # stage not known


# ------------------------------------------------------------------- real runs, real signals


def start(command: list[str], log: Path, home: Path, api_url: str = "") -> subprocess.Popen:
    """A `lease run` command line in its own session (as a terminal's foreground job is its own
    process group), on the CPU, one thread per process; with `api_url`, on that server (`make server`),
    else on a temporary server of its own."""
    env = dict(os.environ, PREFECT_HOME=str(home), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    with log.open("w") as fh:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def ctrl_c(run: subprocess.Popen) -> float:
    """SIGINT to the run's whole process group; returns when it was sent."""
    os.killpg(run.pid, signal.SIGINT)
    return time.monotonic()


def exit_within(run: subprocess.Popen, seconds: float, since: float, log: Path) -> int:
    try:
        code = run.wait(timeout=seconds - (time.monotonic() - since))
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail(f"still running {seconds} s after Ctrl-C:\n{log.read_text()[-3000:]}")
    return code


def group_gone(pgid: int, within: float = 10.0) -> bool:
    """Whether every process of the group (the run's loader workers, its Prefect server) has exited."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def last_logged_step(log: Path) -> int:
    steps = re.findall(rf"step (\d+)/{MAX_STEPS}", log.read_text())
    return int(steps[-1]) if steps else 0


# The 4 bad files put among the user's 24 images, and the reason each must be left out with.
BAD_FILES = {"empty.jpg": "empty file", "notes.jpg": "not an image", "half.png": "truncated",
             "garbage.jpg": "corrupt"}


def user_folder(root: Path) -> Path:
    """24 photographs' worth of a user's ImageFolder (root/<class>/<image>, no split of its own) and 4 bad
    files among them: empty, text, a truncated PNG, garbage bytes behind a JPEG header."""
    generated = make_demo_dataset(root / "generated", num_classes=4, train_per_class=6, val_per_class=1,
                                  image_size=32, seed=5)
    class_dirs = sorted((generated / "train").iterdir())
    for class_dir in class_dirs:
        shutil.copytree(class_dir, root / "photos" / class_dir.name)
    bad = root / "photos" / class_dirs[0].name
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(png, "PNG")
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("not a photograph\n")
    (bad / "half.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (bad / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(4000))
    return root / "photos"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_server):
    """The four runs on one folder, the first two on their temporary Prefect servers, the last two on
    `make server`; returns their logs, exit codes and timings by name."""
    root = tmp_path_factory.mktemp("signals")
    home, artifacts = root / "prefect", root / "artifacts"
    first = [sys.executable, "-m", "pipeline.cli", "run", "--config", "demo", *TINY,
             f"data.source={user_folder(root)}", f"artifacts={artifacts}"]
    done: dict[str, dict] = {}

    def go(name: str, command: list[str], api_url: str = "") -> tuple[subprocess.Popen, Path]:
        log = root / f"{name}.log"
        done[name] = {"log": log, "command": command}
        return start(command, log, home, api_url), log

    run, log = go("tokenize", first)
    wait_until(lambda: tokenize_shards_written(artifacts) >= 3, "three tokenize shards", run, logs=(log,))
    sent = ctrl_c(run)
    done["tokenize"].update(code=exit_within(run, STOP_BOUND, sent, log), gone=group_gone(run.pid))

    run, log = go("pretrain", continued(done["tokenize"]))
    wait_until(lambda: last_logged_step(log) >= 4, "pretraining step 4", run, logs=(log,))
    sent = ctrl_c(run)
    done["pretrain"].update(code=exit_within(run, STOP_BOUND, sent, log), gone=group_gone(run.pid))

    run, log = go("twice", continued(done["pretrain"]), prefect_server)
    wait_until(lambda: "resumed from" in log.read_text() and last_logged_step(log) >= stopped_step(done) + 2,
               "two more pretraining steps", run, logs=(log,))
    ctrl_c(run)
    wait_until(lambda: "signal SIGINT: saving a checkpoint" in log.read_text(), "the first Ctrl-C noted", run,
               logs=(log,))
    sent = ctrl_c(run)  # while the first one's stop is under way
    done["twice"].update(code=exit_within(run, 5, sent, log), gone=group_gone(run.pid))

    done["twice"]["server_up"] = server_answers(prefect_server)
    run, log = go("end", continued(done["twice"]), prefect_server)
    done["end"].update(code=run.wait(300))
    return {"artifacts": artifacts, **{name: {**d, "text": d["log"].read_text()} for name, d in done.items()}}


def server_answers(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def continued(run: dict) -> list[str]:
    """The command the run printed to continue it."""
    found = CONTINUE.findall(run["log"].read_text())
    assert found, f"no command to continue in:\n{run['log'].read_text()[-3000:]}"
    return shlex.split(found[-1])


def stopped_step(done: dict) -> int:
    return int(re.search(r"stopped at step (\d+) of", done["pretrain"]["log"].read_text()).group(1))


def test_ctrl_c_during_tokenize_stops_it_and_its_command_continues_the_shards(runs):
    first = runs["tokenize"]
    assert first["code"] == 130, first["text"][-3000:]
    assert first["gone"], "a process of the run (its Prefect server?) outlived it"
    assert re.search(r"tokenize\s+interrupted", first["text"])  # the stage table
    assert "stopped by SIGINT during tokenize; to continue: " in first["text"]
    assert first["text"].count("signal SIGINT: stopping") == 1  # not its loader worker too
    assert "--force" not in first["text"].rsplit("to continue: ", 1)[1]  # nothing to force: nothing was forced
    assert "Traceback" not in first["text"] and "ConnectError" not in first["text"]
    second = runs["pretrain"]["text"]
    assert re.search(r"tokenize(-part)?: resuming from the partial work of an earlier run", second)
    resumed = re.search(r"tokenized .* shards \((\d+) written, (\d+) already done\)", second)
    assert resumed and int(resumed.group(2)) >= 3, second[-3000:]


def test_stopped_stages_print_no_empty_traceback(runs):
    """A stage stopped by Ctrl-C returns a Failed state; Prefect logs it with exc_info but no exception,
    which logging prints as `NoneType: None`."""
    for name in ("tokenize", "pretrain", "twice", "end"):
        assert "NoneType: None" not in runs[name]["text"], (name, runs[name]["text"][-3000:])
    assert "Task run failed with state: Failed(" in runs["pretrain"]["text"]  # the record it was on


def test_run_loggers_drop_only_empty_tracebacks():
    import flows  # noqa: F401  (importing it mends Prefect's run loggers)

    stream = io.StringIO()
    logger = logging.getLogger("prefect.task_runs")
    handlers, logger.handlers = logger.handlers, [logging.StreamHandler(stream)]  # not the API's: no flow run
    try:
        logger.error("returned a Failed state", exc_info=True)
        try:
            raise ValueError("a real failure")
        except ValueError:
            logger.error("raised", exc_info=True)
    finally:
        logger.handlers = handlers
    text = stream.getvalue()
    assert "NoneType: None" not in text and text.startswith("returned a Failed state\nraised\nTraceback")
    assert "ValueError: a real failure" in text


def test_logs_name_final_paths_not_work_directories(runs):
    lines = [line for run in ("tokenize", "pretrain", "end") for line in runs[run]["text"].splitlines()]
    assert any(str(runs["artifacts"] / "manifest") in line for line in lines)
    assert all("resuming from the partial work" in line for line in lines if ".partial-" in line)


def test_ctrl_c_during_pretrain_saves_its_checkpoint_and_its_command_resumes_it(runs):
    stopped = runs["pretrain"]
    assert stopped["code"] == 130, stopped["text"][-3000:]
    assert stopped["gone"]
    assert re.search(r"pretrain\s+interrupted", stopped["text"])
    assert "stopped by SIGINT during pretrain; to continue: " in stopped["text"]
    assert f"at step {stopped_step(runs)}\n" in runs["twice"]["text"]  # "resumed from <checkpoint> at step N"


def test_a_second_ctrl_c_exits_at_once_and_leaves_make_server_running(runs):
    twice = runs["twice"]
    assert twice["code"] == 130
    assert twice["gone"], "a process of the run outlived it"
    assert twice["server_up"], "`make server` stopped answering after the run's Ctrl-C"
    assert "signal SIGINT again: exiting at once; to continue: " in twice["text"]


def test_the_continued_run_ends_with_complete_weights_and_where_the_report_is(runs):
    end = runs["end"]
    assert end["code"] == 0, end["text"][-3000:]
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", end["text"]).group(1))
    assert resumed >= stopped_step(runs)
    report = Path(end["text"].rstrip().splitlines()[-1].removeprefix("report: "))
    assert report.is_file() and ".partial" not in str(report)
    # the flow logs that line too (for served runs); `lease run` says it once, as its last line
    assert [line for line in end["text"].splitlines() if line.endswith(f"report: {report}")] == [f"report: {report}"]
    pretrain = next((runs["artifacts"] / "pretrain").glob("*/checkpoint.pt")).parent
    assert load_checkpoint(pretrain / "checkpoint.pt")["step"] == MAX_STEPS
    assert (pretrain / "export" / "encoder.safetensors").is_file()


def test_a_small_folder_trains_with_a_capped_batch_and_says_its_tokenizers_are_random(runs):
    text = runs["tokenize"]["text"]
    for name, reason in BAD_FILES.items():  # the 4 bad files are named with their reasons, and the run goes on
        assert re.search(rf"{re.escape(name)}: {reason}", runs["end"]["text"]), (name, reason)
    assert RANDOM_TOKENIZERS.upper() in text  # the banner, at the start of the run
    assert RANDOM_TOKENIZERS.upper() in runs["end"]["text"].rsplit("stage table", 1)[1]  # and at its end
    # the demo preset's generated evaluation sets are of the demo's classes: left out for a user's folder
    assert "the generated set(s) demo_c, demo_transfer (root: demo) are left out" in text
    assert "eval-demo_c" not in runs["end"]["text"]
    assert re.search(r"pretrain.batch_size=32 is more than the \d+ train samples of this data: training with "
                     r"batches of 16", runs["pretrain"]["text"])
    report = Path(runs["end"]["text"].rstrip().splitlines()[-1].removeprefix("report: ")).read_text()
    title = report.splitlines()[0]
    assert title.startswith("# LEASE evaluation") and RANDOM_TOKENIZERS in title
    captions = re.findall(r"^### (.+)$", report, re.M)
    grids = [c for c in captions if c.split(" — ")[0] in ("Samples", "Reconstruction", "Inpainting", "Outpainting")]
    assert len(grids) == 4 and all(RANDOM_TOKENIZERS in c for c in grids), captions
    # the demo's few-shot counts (2, 5): 5 per class is more than this folder's train split holds
    assert re.search(r"5-shot skipped: \d of 4 classes have fewer than 5 training samples", report)
    assert re.search(r"\| 2-shot top-1 \(mean ± std over seeds\) \| \d", report)
    caveat = f"{RANDOM_TOKENIZERS[0].upper()}{RANDOM_TOKENIZERS[1:]} (VQGAN and DINOv2)."
    assert (f"\n\nColumns: input image | its VQGAN tokens decoded | centre box masked (grey) | the model's "
            f"completion. {caveat}\n\n") in report.split("### Inpainting", 1)[1]
