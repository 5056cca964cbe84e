"""The Prefect flow end to end: a real local server, the served `lease/full-pipeline` deployment run
through the API on a tiny demo config, then cache behaviour of the in-process flows against that server."""
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real server, a served deployment and three pipeline runs (~50 s on 2 cores)

# Prefect's home (results, cache records) in a temp dir, set before Prefect is imported; no network.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lease-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
import flows  # noqa: E402,F401  (the project's Prefect defaults: analytics and telemetry off)

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.lease_flow import StageFailed, lease_flow, tokenize_flow  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = ["demo-data", "demo-assets", "manifest", "features", "kmeans", "vq-codes", "tokenize", "pack", "pretrain",
              "evaluate", "finetune", "eval-bank", *[stage for name in ("c", "t") for stage in
                                         [f"eval-{part}-{name}" for part in ("data", "manifest", "tokenize", "features")]
                                         + [f"eval-{name}"]], "report"]
# One robustness set in ImageNet-C's layout (4 classes x 1 image x 2 severities) and one transfer set
# (2 new classes, 4 train + 2 val each): the demo's branches at test sizes.
ROBUSTNESS = "{name: c, role: robustness, root: demo, layout: corruption, demo: {per_class: 1, corruptions: [noise], severities: [1, 2]}}"
TRANSFER = "{name: t, role: transfer, root: demo, fewshot_shots: [1, 2], demo: {num_classes: 2, per_class: 4, val_per_class: 2}}"
DATASETS = f"evaluate.datasets=[{ROBUSTNESS}, {TRANSFER}]"
TINY = [  # the demo preset at test sizes: 4 classes, 24 train + 8 val images, 4 training steps
    "demo_data.num_classes=4", "demo_data.train_per_class=6", "demo_data.val_per_class=2",
    "demo_data.image_size=32", "features.num_images=16", "features.patches_per_image=16",
    "features.num_workers=0", "kmeans.k=8", "kmeans.iters=3", "tokenize.num_workers=1",
    "tokenize.images_per_shard=16", "pack.samples_per_shard=16", "pretrain.batch_size=8", "pretrain.max_steps=4",
    "pretrain.log_every=2", "evaluate.knn.k=3", "evaluate.linear_probe.epochs=2",
    "evaluate.linear_probe.batch_size=8", "evaluate.generate.num_images=4", "evaluate.generate.batch_size=4",
    "evaluate.generate.num_steps=2", "evaluate.grid_rows=2", "evaluate.batch_size=16",
    "evaluate.fid.reference_images=4", "evaluate.fewshot.shots=[1]", DATASETS, "finetune.train.batch_size=8",
    "finetune.train.epochs=1", "finetune.augment.num_workers=0",
]


def statuses(artifacts: Path) -> dict[str, str]:
    record = json.loads((artifacts / "runs" / "latest.json").read_text())
    return {row["name"]: row["status"] for row in record["stages"]}


def serve_deployment(api_url: str, artifacts: Path, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_RUNNER_POLL_FREQUENCY="1")
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "flows.deploy", "--config", "demo", *TINY,
                                 f"artifacts={artifacts}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_deployment(name: str, server: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"the deployment server exited:\n{log_path.read_text()[-3000:]}")
            try:
                client.read_deployment_by_name(name)
                return
            except Exception:  # not registered yet
                time.sleep(1)
    pytest.fail(f"deployment {name} was not registered within {timeout} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory):
    """Start a local server, serve lease/full-pipeline, run it once through the API; keep the server up."""
    root = tmp_path_factory.mktemp("flow")
    artifacts, log_path = root / "artifacts", root / "serve.log"
    with prefect_test_harness(server_startup_timeout=120):
        server = serve_deployment(PREFECT_API_URL.value(), artifacts, log_path)
        try:
            wait_for_deployment("lease/full-pipeline", server, log_path)
            flow_run = run_deployment("lease/full-pipeline", timeout=600)
            first = statuses(artifacts) if (artifacts / "runs" / "latest.json").is_file() else {}
            forced = run_deployment("lease/full-pipeline", parameters={"force": ["pretrain"]}, timeout=600)
            yield {"root": root, "artifacts": artifacts, "run": flow_run, "first": first, "forced": forced,
                   "after_force": statuses(artifacts), "log": log_path, "server": server}
        finally:
            server.terminate()
            server.wait(timeout=30)


def run_tokenize(artifacts: Path, *extra: str) -> dict[str, str]:
    tokenize_flow(config="demo", overrides=[*TINY, f"artifacts={artifacts}", *extra])
    return statuses(artifacts)


def test_deployment_runs_every_stage_through_the_api(deployed_run):
    state = deployed_run["run"].state
    assert state.is_completed(), f"{state}\n{deployed_run['log'].read_text()[-4000:]}"
    assert deployed_run["first"] == {name: "ran" for name in ALL_STAGES}
    record = json.loads((deployed_run["artifacts"] / "runs" / "latest.json").read_text())
    assert record["flow"] == "lease" and all(row["key"] and row["seconds"] >= 0 for row in record["stages"])
    assert (Path(record["artifacts"]["evaluate"]) / "knn.json").is_file()
    assert (Path(record["artifacts"]["report"]) / "report.md").is_file()


def test_a_served_run_ends_with_where_its_report_is(deployed_run):
    """The line `lease run` ends with, as the flow run's last own log line: in its logs on the server (the
    UI's) and in the serving process's output."""
    run_id = str(deployed_run["run"].id)  # the first run: its logs reached the server while the second ran
    record = json.loads(next((deployed_run["artifacts"] / "runs").glob(f"*-{run_id[:8]}.json")).read_text())
    line = f"report: {Path(record['artifacts']['report']) / 'report.md'}"
    with get_client(sync_client=True) as client:  # the newest first; a plain filter (see the artifacts test)
        response = client.request("POST", "/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 50, "offset": 0, "sort": "TIMESTAMP_DESC"})
    flow_lines = [log["message"] for log in response.json() if log["task_run_id"] is None][::-1]
    assert flow_lines[-2:] == [line, "Finished in state Completed()"], flow_lines[-5:]
    assert f" - {line}\n" in deployed_run["log"].read_text()  # the serving process's output


def test_forcing_pretrain_reruns_it_and_its_dependents_only(deployed_run):
    assert deployed_run["forced"].state.is_completed()
    downstream = ["pretrain", "evaluate", "finetune", "eval-bank", "eval-features-c", "eval-features-t", "eval-c", "eval-t",
                  "report"]
    expected = {name: "cached" for name in ALL_STAGES} | {name: "ran" for name in downstream}
    assert deployed_run["after_force"] == expected


def run_lease(artifacts: Path, *extra: str) -> dict[str, str]:
    lease_flow(config="demo", overrides=[*TINY, f"artifacts={artifacts}", *extra])
    return statuses(artifacts)


def test_adding_a_dataset_runs_only_its_branch_and_removing_one_reruns_nothing(deployed_run):
    artifacts = deployed_run["artifacts"]  # in-process flows below talk to the fixture's server
    extra = "{name: t2, role: transfer, root: demo, fewshot_shots: [1], demo: {num_classes: 2, per_class: 2, val_per_class: 1, seed: 5}}"
    added = run_lease(artifacts, f"evaluate.datasets=[{ROBUSTNESS}, {TRANSFER}, {extra}]")
    branch = {f"eval-{part}-t2" for part in ("data", "manifest", "tokenize", "features")} | {"eval-t2"}
    # the report lists the evaluation sets: it is written again, reading the others' cached results
    assert {name for name, status in added.items() if status == "ran"} == branch | {"report"}
    assert set(added) == set(ALL_STAGES) | branch

    removed = run_lease(artifacts, f"evaluate.datasets=[{TRANSFER}]")
    assert {name for name, status in removed.items() if status == "ran"} == {"report"}
    assert set(removed) == set(ALL_STAGES) - {"eval-bank"} - {s for s in ALL_STAGES if s.endswith("-c")}


def test_evaluation_results_have_the_shared_shapes(deployed_run):
    """fid.json and each branch's result.json as INTERFACES.md fixes them; FID / IS through the demo's
    random-weight Inception (torch-fidelity's real extractor and loader)."""
    artifacts = deployed_run["artifacts"]
    result = lambda stage, name: json.loads(next((artifacts / stage).glob(f"*/{name}")).read_text())  # noqa: E731
    fid = result("evaluate", "fid.json")
    assert fid["extractor"] == "demo (random weights)" and fid["missing"] is None and fid["protocol"] == "mage"
    assert fid["samples"] == 4 and fid["reference_images"] == 4 and fid["isc"] >= 1.0
    assert all(isinstance(fid[k], float) and fid[k] == fid[k] for k in ("fid", "isc", "isc_std"))  # numbers, no NaN
    shared = {"name", "role", "protocol", "images", "knn_top1", "linear_probe_top1", "fewshot", "note"}
    robust = result("eval-c", "result.json")
    assert shared <= set(robust) and robust["role"] == "robustness" and robust["images"] == 8
    assert 0 <= robust["knn_top1"] <= 100 and robust["linear_probe_top1"] is None and robust["fewshot"] is None
    assert robust["knn"]["num_train"] == 24 and set(robust["groups"]) == {"noise/1", "noise/2"}
    assert all(row["images"] == 4 for row in robust["groups"].values()) and set(robust["by_severity"]) == {"1", "2"}
    transfer = result("eval-t", "result.json")
    assert shared <= set(transfer) and transfer["role"] == "transfer" and transfer["protocol"] == "fast"
    assert transfer["images"] == 12 and transfer["knn"]["num_train"] == 8 and transfer["knn"]["num_classes"] == 2
    assert set(transfer["fewshot"]) == {"1", "2"} and all(0 <= v <= 100 for v in transfer["fewshot"].values())
    assert 0 <= transfer["linear_probe_top1"] <= 100


def test_the_run_posts_its_report_metrics_and_stage_table_as_prefect_artifacts(deployed_run):
    from prefect.client.schemas.objects import Artifact

    # The API's artifact filter of this flow run. (The client's read_artifacts sends null for the filters it is
    # not given, which this server version rejects with 422, and empty run filters join away the flow-level ones.)
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [str(deployed_run["run"].id)]}}, "limit": 50, "offset": 0,
            "sort": "CREATED_DESC"})
    by_key = {artifact.key: artifact for artifact in Artifact.model_validate_list(response.json())}
    assert {"demo-report", "demo-metrics", "demo-stages"} <= set(by_key), sorted(by_key)

    def table(key: str) -> list[dict]:  # a table artifact's rows (the API returns them as JSON text)
        data = by_key[key].data
        return data if isinstance(data, list) else json.loads(data)

    report = by_key["demo-report"]
    assert report.type == "markdown" and report.data.startswith("Report file: ") and "## Table 1:" in report.data
    figure = re.search(r"\*figure: `([^`]+)`\*", report.data)  # figures by path: the UI cannot load relative links
    assert figure and Path(figure[1]).is_file() and "![" not in report.data
    assert by_key["demo-stages"].type == "table" and [row["name"] for row in table("demo-stages")] == ALL_STAGES
    metrics = table("demo-metrics")
    assert by_key["demo-metrics"].type == "table"
    assert {"table": "1", "metric": "linear probe top-1"}.items() <= metrics[0].items()


def test_prefect_cache_and_artifact_records_agree(deployed_run):
    artifacts = deployed_run["artifacts"]  # in-process flows below talk to the fixture's server
    assert set(run_tokenize(artifacts).values()) == {"cached"}

    # Prefect holds a cache record for k-means, but its artifact is gone: it must recompute.
    kmeans_dirs = [p for p in (artifacts / "kmeans").iterdir() if not p.name.startswith(".")]  # not .locks
    shutil.rmtree(kmeans_dirs[0])
    after_delete = run_tokenize(artifacts)
    assert after_delete["kmeans"] == "ran"
    assert {s for n, s in after_delete.items() if n != "kmeans"} == {"cached"}

    # A damaged shard (same size, other bytes) is caught by the digest of small outputs.
    shard = next((artifacts / "pack").glob("*/train/shard-*.tar"))
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run_tokenize(artifacts)["pack"] == "ran"

    # A changed config recomputes that stage and what depends on it, nothing upstream.
    changed = run_tokenize(artifacts, "kmeans.iters=4")
    assert [n for n, s in changed.items() if s == "ran"] == ["kmeans", "tokenize", "pack"]

    # A failing stage is reported as failed in the table, and the run fails: 1000 images x 16 patches
    # would allow 1000 centroids, but only 24 train images exist, so k-means gets 384 vectors.
    with pytest.raises(StageFailed, match="kmeans"):
        tokenize_flow(config="demo", overrides=[*TINY, f"artifacts={artifacts}", "features.num_images=1000",
                                                "kmeans.k=1000"])
    assert statuses(artifacts)["kmeans"] == "failed"


def test_flow_rejects_a_bad_config_before_any_stage(deployed_run, tmp_path):
    from lease.typed_config import ConfigError

    with pytest.raises(ConfigError, match="kmeans.kk"):
        lease_flow(config="demo", overrides=[f"artifacts={tmp_path}", "kmeans.kk=3"])
    assert not any(tmp_path.iterdir())


def stops_serving_cleanly(server: subprocess.Popen, log_path: Path, sig: signal.Signals) -> None:
    """`sig` ends serving within 30 s, with exit status 0 and one line saying so, and nothing else."""
    before = len(log_path.read_text())
    server.send_signal(sig)
    try:
        code = server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        pytest.fail(f"still serving 30 s after {sig.name}:\n{log_path.read_text()[-3000:]}")
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert text.count("stopped serving lease/full-pipeline") == 1, text[-3000:]
    assert "never awaited" not in text and "Traceback" not in text, text[before:]


def test_sigterm_and_ctrl_c_stop_serving_the_deployment_cleanly(deployed_run, tmp_path):
    """`make serve` blocks, says so and how to stop it; SIGTERM (`kill`, a service manager) ends it as one
    Ctrl-C does."""
    server, log_path = deployed_run["server"], deployed_run["log"]
    assert "Ctrl-C (or SIGTERM) stops serving" in log_path.read_text()
    stops_serving_cleanly(server, log_path, signal.SIGTERM)  # the process that served the runs above
    log_path = tmp_path / "serve.log"
    server = serve_deployment(PREFECT_API_URL.value(), tmp_path / "artifacts", log_path)
    deadline = time.monotonic() + 120
    while "lease/full-pipeline is served" not in log_path.read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"not served:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    # at once: the runner is still entering its services, where asyncio's own Ctrl-C handling (a
    # cancelled main task) can leave it serving
    stops_serving_cleanly(server, log_path, signal.SIGINT)


def test_left_out_images_are_named_on_cached_runs_too():
    from flows.lease_flow import left_out_note
    from pipeline.artifacts import StageOutcome

    bad = [[f"/data/c/{i}.jpg", "empty file"] for i in range(25)]
    cached = StageOutcome("manifest", "cached", "k", 0.0, "/a/manifest/k", {"bad": bad})
    note = left_out_note([cached])
    assert note.startswith("25 image(s)") and "manifest cached" in note and "/a/manifest/k/record.json" in note
    assert "/data/c/0.jpg: empty file" in note and "... and 5 more" in note
    assert left_out_note([StageOutcome("manifest", "ran", "k", 0.0, "/a", {"bad": []})]) == ""
