"""prefect.yaml on a real Prefect server: schedule, concurrency, redeploys, worker runs, the UI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from storage.embedded import free_port, stop_process
from storage.models import ModelStore
from tests.conftest import REPO

TRAINING = "mnist-training/weekly-retrain"
# force: both runs train (two identical runs would otherwise end in "skipped: nothing changed")
FAST_PARAMS = {"params": {"preset": "smoke", "threshold": 0.5, "accuracy_margin": 1.0, "class_margin": 1.0,
                               "moved_margin": 1.0, "shortcut_follow": 0.0,
                          "force": True}}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server


@contextmanager
def running_prefect_server(home: Path):
    """``prefect server start`` on a free port and its own SQLite home; stopped by its pid."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    with (home / "server.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        stop_process(process.pid)
        pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
    try:
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "home": home}
    finally:
        stop_process(process.pid)
        process.wait(timeout=30)


def client_env(server: dict[str, Any], **extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": server["api"], "PREFECT_HOME": str(server["home"]),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def mnist_deploy(server: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "cli", "deploy"], cwd=REPO, env=client_env(server),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def api(server: dict[str, Any], method: str, path: str, **kwargs: Any) -> Any:
    """One API call through Prefect's own HTTP client: it retries what the server answers as retryable
    (503 when SQLite is busy with the worker's and the scheduler's writes), and raises on any other error."""
    from prefect.client.base import PrefectHttpxSyncClient

    with PrefectHttpxSyncClient(base_url=server["api"], timeout=30) as client:
        response = client.request(method, path, **kwargs)
    return response.json() if response.content else None


def deployment(server: dict[str, Any], name: str = TRAINING) -> dict[str, Any]:
    return api(server, "GET", f"/deployments/name/{name}")


def scheduled_runs(server: dict[str, Any], deployment_id: str) -> list[dict[str, Any]]:
    return api(server, "POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [deployment_id]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}, "limit": 200})


@pytest.fixture(scope="module")
def deployed(prefect_server: dict[str, Any]) -> dict[str, Any]:
    mnist_deploy(prefect_server)
    return prefect_server


def test_deploy_registers_schedule_concurrency_pool_and_automations(deployed: dict[str, Any]) -> None:
    training = deployment(deployed)
    [schedule] = training["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * 1" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["active"] is True and schedule["slug"] == "Mondays 03:00 Europe/Berlin (cron 0 3 * * 1)"
    # one run at a time through the work queue's limit, not the deployment's (which reorders the queue)
    assert training["global_concurrency_limit"] is None and training["work_queue_name"] == "training"
    queue = api(deployed, "GET", "/work_pools/mnist-process/queues/training")
    assert queue["concurrency_limit"] == 1
    assert training["work_pool_name"] == "mnist-process" and "training" in training["tags"]
    assert "scheduled" not in training["tags"]  # a run by hand is not scheduled; Prefect tags its own auto-scheduled
    assert deployment(deployed, "mnist-rollback/rollback")["schedules"] == []
    assert api(deployed, "GET", "/work_pools/mnist-process")["type"] == "process"
    created = {a["name"]: a for a in api(deployed, "POST", "/automations/filter", json={})}
    assert {"mnist: training run failed", "mnist: weekly retrain missed", "mnist: retrain on new data"} <= set(created)
    assert all(a["description"] for a in created.values())  # the UI shows a custom trigger's description only
    failed = created["mnist: training run failed"]
    assert failed["actions"][0]["type"] == "do-nothing" and "Notifies nobody yet" in failed["description"]
    assert failed["trigger"]["match"]["prefect.state-type"] == ["FAILED", "CRASHED"]  # a rejection alerts once
    retrain = created["mnist: retrain on new data"]
    assert retrain["trigger"]["expect"] == ["mnist.data.added"]
    [action] = retrain["actions"]
    assert action["type"] == "run-deployment" and action["deployment_id"] == training["id"]
    assert action["parameters"] == {"params": {"min_new_examples": 500}}
    on_drift = created["mnist: retrain on drift"]
    assert on_drift["trigger"]["expect"] == ["mnist.drift.detected"] and on_drift["trigger"]["within"] == 12 * 3600
    [action] = on_drift["actions"]
    assert action["deployment_id"] == training["id"] and action["parameters"] == {"params": {"ingest_feedback": True}}
    drift = deployment(deployed, "mnist-drift/daily")
    assert drift["schedules"][0]["schedule"]["cron"] == "0 4 * * *" and drift["work_pool_name"] == "mnist-process"


def test_runs_beat_as_often_as_the_zombie_automation_expects(deployed: dict[str, Any]) -> None:
    """A run beating slower than the window would be crashed alive: the deployments' beat is the one
    the automation was made for, and only this project's flows are watched."""
    from flows.deploy import HEARTBEAT_SECONDS, ZOMBIE_AFTER

    created = {a["name"]: a for a in api(deployed, "POST", "/automations/filter", json={})}
    zombie = created["mnist: crash runs whose heartbeats stopped"]["trigger"]
    assert zombie["posture"] == "Proactive" and zombie["within"] == ZOMBIE_AFTER.seconds
    assert zombie["after"] == ["prefect.flow-run.heartbeat"] and "prefect.flow-run.heartbeat" in zombie["expect"]
    assert "mnist-training" in zombie["match_related"]["prefect.resource.name"]
    assert created["mnist: finish cancelling runs no worker ends"]["actions"][0]["state"] == "CANCELLED"
    for name in (TRAINING, "mnist-rollback/rollback", "mnist-drift/daily"):
        beat = deployment(deployed, name)["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]
        assert 2 * int(beat) < ZOMBIE_AFTER.seconds and int(beat) == HEARTBEAT_SECONDS


def wait_for_scheduled(server: dict[str, Any], deployment_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = scheduled_runs(server, deployment_id)
        if runs:
            time.sleep(3)  # let the scheduler finish its round
            return scheduled_runs(server, deployment_id)
        time.sleep(1)
    pytest.fail("the scheduler created no scheduled runs")


def test_forcing_a_scheduled_retrain_is_one_parameter(deployed: dict[str, Any]) -> None:
    """force is a parameter of its own (a checkbox in the run form, --param force=true on the CLI),
    not a key inside the params object that --param would replace whole."""
    training = deployment(deployed)
    schema = training["parameter_openapi_schema"]["properties"]
    assert schema["force"]["type"] == "boolean" and training["parameters"]["force"] is False
    assert "force" in training["parameters"] and "params" in training["parameters"]


def test_redeploy_neither_duplicates_runs_nor_resumes_a_paused_schedule(deployed: dict[str, Any]) -> None:
    training = deployment(deployed)
    before = wait_for_scheduled(deployed, training["id"])
    mnist_deploy(deployed)
    time.sleep(5)  # two scheduler rounds
    after = scheduled_runs(deployed, training["id"])
    starts = Counter(run["expected_start_time"] for run in after)
    assert starts and max(starts.values()) == 1, "a start time got two scheduled runs"
    assert set(starts) == {run["expected_start_time"] for run in before}
    assert deployment(deployed)["schedules"][0]["id"] == training["schedules"][0]["id"]

    schedule_id = training["schedules"][0]["id"]
    api(deployed, "PATCH", f"/deployments/{training['id']}/schedules/{schedule_id}", json={"active": False})
    mnist_deploy(deployed)
    assert deployment(deployed)["schedules"][0]["active"] is False
    time.sleep(5)
    assert scheduled_runs(deployed, training["id"]) == []
    api(deployed, "PATCH", f"/deployments/{training['id']}/schedules/{schedule_id}", json={"active": True})


def test_a_schedule_renamed_in_the_file_replaces_its_old_self(deployed: dict[str, Any]) -> None:
    """A server deployed when the weekly schedule's slug was weekly-monday-0300 (paused there): the
    redeploy renames it (the slug is what the UI shows of a schedule, so it now says its cron), keeps
    it paused, and schedules nothing twice."""
    training = deployment(deployed)
    [schedule] = training["schedules"]
    api(deployed, "PATCH", f"/deployments/{training['id']}/schedules/{schedule['id']}",
        json={"slug": "weekly-monday-0300", "active": False})
    try:
        mnist_deploy(deployed)
        [renamed] = deployment(deployed)["schedules"]
        assert renamed["id"] == schedule["id"] and renamed["slug"] == schedule["slug"], renamed
        assert renamed["active"] is False
    finally:
        api(deployed, "PATCH", f"/deployments/{training['id']}/schedules/{schedule['id']}",
            json={"slug": schedule["slug"], "active": True})


# The runs the UI screenshots show (docs/): the deployment's own recipe and gate (>= 0.99, every
# comparison with stable), forced so that the second trains a new seed rather than skip. The
# rejection is real too: a one-epoch smoke model under that gate. The skip finds stable unchanged.
REAL_PARAMS = {"params": {"preset": "default", "threshold": 0.99, "publish": True, "publish_label": "stable",
                          "force": True}}
REJECTED_PARAMS = {"params": {**REAL_PARAMS["params"], "preset": "smoke"}}
SKIPPED_PARAMS = {"params": {**REAL_PARAMS["params"], "force": False}}  # the data, code and recipe of stable


@pytest.fixture(scope="module")
def worker_runs(deployed: dict[str, Any], s3_server, mnist_dir: Path, cache_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """With make serve's stack up, four runs triggered at once through the deployment and executed
    one after another by a real process worker: two publish, one is rejected, one is skipped."""
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    work = tmp_path_factory.mktemp("worker")
    store_env = {"MNIST_S3_ENDPOINT": s3_server.endpoint, "MNIST_S3_BUCKET": "deployment-runs",
                 "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": "us-east-1"}
    env = client_env(deployed, MNIST_DATA_DIR=str(mnist_dir), MNIST_CACHE_DIR=str(cache_dir),
                     MNIST_OUTPUT_DIR=str(work / "outputs"), MNIST_STATE_DIR=str(work / "state"), **store_env)
    with (work / "stack.log").open("w") as log:
        stack = subprocess.Popen([sys.executable, "-m", "cli", "up", "--port", "0", "--rest-api-port", "0"],
                                 cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with (work / "worker.log").open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "export MNIST_SERVING_ADDRESS=" not in (work / "stack.log").read_text():
            assert stack.poll() is None and time.monotonic() < deadline, (work / "stack.log").read_text()
            time.sleep(0.5)
        training = deployment(deployed)
        # three at once (their order is the queue's), then the one that finds nothing new since stable
        runs = finished(deployed, [api(deployed, "POST", f"/deployments/{training['id']}/create_flow_run",
                                       json={"parameters": params})
                                   for params in (REAL_PARAMS, REAL_PARAMS, REJECTED_PARAMS)])
        runs = sorted(runs[:2], key=lambda run: run["start_time"] or "") + runs[2:]  # publishing runs, as they ran
        runs += finished(deployed, [api(deployed, "POST", f"/deployments/{training['id']}/create_flow_run",
                                        json={"parameters": SKIPPED_PARAMS})])
        # the scheduled serving check, as its schedule runs it: it finds make serve's stack too
        check = deployment(deployed, "mnist-serving-check/every-15-minutes")
        [checked] = finished(deployed, [api(deployed, "POST", f"/deployments/{check['id']}/create_flow_run",
                                            json={"parameters": {"grace_seconds": 60}})])
    finally:
        for process in (worker, stack):
            stop_process(process.pid)
            process.wait(timeout=60)
    return {"runs": runs, "store_env": store_env, "log": work / "worker.log", "stack_log": work / "stack.log",
            "serving_check": checked}


def finished(server: dict[str, Any], runs: list[dict[str, Any]], timeout: float = 480) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [api(server, "GET", f"/flow_runs/{run['id']}") for run in runs]
        if all(run["state_type"] in TERMINAL for run in runs):
            break
        time.sleep(2)
    return runs


def run_logs(server: dict[str, Any], run_id: str) -> list[str]:
    return [log["message"] for log in api(server, "POST", "/logs/filter", json={
        "logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})]


def test_runs_through_the_worker_publish_and_live_check_on_the_stack(worker_runs: dict[str, Any],
                                                                     deployed: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    published = worker_runs["runs"][:2]
    assert [run["state_type"] for run in published] == ["COMPLETED", "COMPLETED"], \
        worker_runs["log"].read_text()[-3000:]
    for name, value in worker_runs["store_env"].items():
        monkeypatch.setenv(name, value)
    from storage.settings import StoreSettings

    store = ModelStore(StoreSettings())
    assert store.complete_versions() == [1, 2]
    assert {store.manifest(v)["flow_run_id"] for v in (1, 2)} == {run["id"] for run in published}
    for run in published:  # make worker found make serve's stack: each run checked what it published
        logs = run_logs(deployed, run["id"])
        assert any("live check passed" in message for message in logs), run["name"]
        [gate] = [line.splitlines() for line in logs if line.startswith("gate passed:")]
        checks = int(re.match(r"gate passed: all (\d+) checks$", gate[0])[1])  # then a row per check
        assert checks == len(gate) - 1 and all(row.lstrip().startswith("pass ") for row in gate[1:]), gate
    assert api(deployed, "GET", "/variables/name/mnist_labels")["value"] == {"stable": 2}


def test_the_scheduled_serving_check_finds_the_stack_and_checks_it(worker_runs: dict[str, Any]) -> None:
    checked = worker_runs["serving_check"]
    assert checked["state_type"] == "COMPLETED", checked["state"]["message"]
    assert "serves what the registry says" in checked["state"]["message"]


def test_a_rejection_ends_rejected_in_one_line_without_a_traceback(worker_runs: dict[str, Any],
                                                                    deployed: dict[str, Any]) -> None:
    # a rejection ends COMPLETED for the engine (no traceback) and FAILED on the server (a red badge),
    # which its completion hook sets a moment after the engine's final state
    rejected = worker_runs["runs"][2]
    deadline = time.monotonic() + 30
    while rejected["state_type"] != "FAILED" and time.monotonic() < deadline:
        time.sleep(1)
        rejected = api(deployed, "GET", f"/flow_runs/{rejected['id']}")
    assert (rejected["state_type"], rejected["state_name"]) == ("FAILED", "Rejected"), rejected["state"]
    message = rejected["state"]["message"]
    assert message.startswith("accuracy gate") and "0.9900" in message and "\n" not in message
    logs = run_logs(deployed, rejected["id"])
    assert logs and not [line for line in logs if "Traceback" in line or "Engine execution exited" in line]
    # the gate reads in the log: a count, then a line per failing check (not ~18 checks in one line)
    [said] = [line.splitlines() for line in logs if line.startswith("gate rejected:")]
    failed = int(re.match(r"gate rejected: (\d+) of \d+ checks failed$", said[0])[1])
    assert failed == len(said) - 1 >= 1 and all(" failed: " in line for line in said[1:]), said
    tasks = api(deployed, "POST", "/task_runs/filter", json={"task_runs": {"name": {"like_": "gate"}},
                                                             "flow_runs": {"id": {"any_": [rejected["id"]]}}})
    assert [task["state_name"] for task in tasks] == ["Rejected"]  # the gate task says what its log says
    failed_automation = next(a for a in api(deployed, "POST", "/automations/filter", json={})
                             if a["name"] == "mnist: training run failed")
    assert "prefect.flow-run.Rejected" in failed_automation["trigger"]["expect"]


def test_runs_say_their_outcome_in_tags(worker_runs: dict[str, Any]) -> None:
    first, second, rejected, skipped = worker_runs["runs"]
    assert "published:v1" in first["tags"] and "published:v2" in second["tags"]
    assert any(tag.startswith("accuracy:0.") for tag in first["tags"])
    assert "rejected" in rejected["tags"] and "skipped" in skipped["tags"]
    # what happened and nothing that did not: no forced retrain, just stable's training unchanged
    assert "unchanged-since-v2" in skipped["tags"] and not any("force" in tag for tag in skipped["tags"])
    assert skipped["state_name"] == "Completed" and skipped["state"]["message"].startswith("skipped: nothing changed")


def test_triggered_runs_never_overlap_and_start_in_the_order_queued(worker_runs: dict[str, Any]) -> None:
    ordered = sorted(worker_runs["runs"], key=lambda run: run["start_time"])
    for first, second in zip(ordered, ordered[1:]):
        assert first["end_time"] <= second["start_time"], (first["end_time"], second["start_time"])
    assert [run["id"] for run in ordered] == [run["id"] for run in sorted(ordered, key=lambda run: run["created"])]
    log = worker_runs["log"].read_text()  # a run that only waits costs no submission attempt, no line
    assert "Aborted submission" not in log, log[-3000:]
    # the hooks say what they did, without Prefect's routine lines about them, and never fail
    assert "while running hook" not in log and "Running hook '" not in log, log[-3000:]


def test_the_first_run_names_the_runs_queued_behind_it(worker_runs: dict[str, Any], deployed: dict[str, Any]) -> None:
    first = worker_runs["runs"][0]
    said = [line for line in run_logs(deployed, first["id"]) if line.startswith("queued behind this run, in order:")]
    assert said and len(said[0].split(": ", 1)[1].split(", ")) == 2, said  # the two triggered with it
    rejected = worker_runs["runs"][2]
    assert "the run's state shows as Failed (Rejected) in the UI" in run_logs(deployed, rejected["id"])


@pytest.mark.browser
def test_run_page_shows_the_report_and_plots(worker_runs: dict[str, Any], deployed: dict[str, Any]) -> None:
    from tests.ui_screenshot import open_links, screenshot_report

    run = worker_runs["runs"][1]
    shot = REPO / "outputs" / "screenshots" / "flow-run-report.png"
    seen = screenshot_report(deployed["ui"], run["id"], shot)
    assert shot.stat().st_size > 20_000
    assert "MNIST training run" in seen["text"] and "Publication" in seen["text"]
    assert seen["plots_loaded"] == 3, seen
    # every link in the report opens something while the stack runs: here, the registry overview
    [report] = api(deployed, "POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": ["mnist-report"]},
                                                                              "flow_run_id": {"any_": [run["id"]]}}})
    links = re.findall(r"\]\((http[^)\s]+)\)", report["data"])
    assert links and all(link.startswith(deployed["ui"]) for link in links), links
    opened = open_links(links, "Model registry")
    assert all("Serving: stable -> version 2" in text for text in opened.values()), opened


@pytest.mark.browser
def test_the_runs_list_shows_each_outcome_at_a_glance(worker_runs: dict[str, Any], deployed: dict[str, Any]) -> None:
    from tests.ui_screenshot import screenshot_runs_list

    shot = REPO / "outputs" / "screenshots" / "runs-list.png"
    text, badges = screenshot_runs_list(deployed["ui"], [run["name"] for run in worker_runs["runs"]], shot)
    assert shot.stat().st_size > 20_000
    for shown in ("published:v1", "published:v2", "rejected", "skipped", "Rejected"):
        assert shown in text, (shown, text[:3000])
    # told apart by colour too: the rejected run's badge is the failure's, not success's
    assert ["Rejected", "state--failed"] in badges and ["Completed", "state--completed"] in badges, badges
    assert ["Rejected", "state--completed"] not in badges, badges


@pytest.mark.browser
def test_a_rejection_and_the_registry_read_at_a_glance(worker_runs: dict[str, Any], deployed: dict[str, Any]) -> None:
    """The rejected run's report opens with its short reason and the failing checks as a table;
    the registry artifact shows every label and the accuracy trend. Both screenshots go to the docs."""
    from tests.ui_screenshot import screenshot_artifact, screenshot_report

    shots = REPO / "outputs" / "screenshots"
    seen = screenshot_report(deployed["ui"], worker_runs["runs"][2]["id"], shots / "rejected-run-report.png")
    text = seen["text"]
    assert "Verdict: rejected: accuracy gate" in text, text[:3000]
    assert text.index("failing check") < text.index("Per-class accuracy") < text.index("Gate"), text[:3000]
    registry = screenshot_artifact(deployed["ui"], "mnist-registry", "Serving:", shots / "registry.png")
    assert "Serving: stable -> version 2" in registry["text"] and registry["plots_loaded"] == 1, registry
    assert "rejected" in registry["text"].split("Last events:")[1], registry["text"][-2000:]


@pytest.mark.parametrize("stop, started_in_background", [("SIGTERM", False), ("SIGINT", False), ("SIGINT", True)])
def test_the_worker_stops_on_request_and_leaves_no_process(deployed: dict[str, Any], s3_server, tmp_path: Path,
                                                           stop: str, started_in_background: bool) -> None:
    """mnist worker (make worker) stopped as a supervisor (SIGTERM) or a person (Ctrl-C) stops it:
    exit 0 within its grace period, no traceback, and Prefect's worker under it gone too."""
    import signal

    import psutil

    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    env = client_env(deployed, MNIST_S3_ENDPOINT=s3_server.endpoint, MNIST_S3_BUCKET="worker-stop",
                     AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY, AWS_REGION="us-east-1",
                     MNIST_STATE_DIR=str(tmp_path / "state"))
    # started_in_background: as `make worker &` in a script starts it, with SIGINT ignored
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if started_in_background else None
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--grace-seconds", "20"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=ignore_sigint)
    try:
        deadline = time.monotonic() + 120
        while not [child for child in psutil.Process(worker.pid).children(recursive=True)
                   if "worker" in " ".join(child.cmdline())]:
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(5)  # Prefect's worker up and polling its pool
        family = psutil.Process(worker.pid).children(recursive=True)
        started = time.monotonic()
        worker.send_signal(getattr(signal, stop))
        output, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert worker.returncode == 0 and time.monotonic() - started < 25, output[-2000:]
    assert "Traceback" not in output and "mnist worker: stopped" in output, output[-2000:]
    assert not [process.pid for process in family if process.is_running() and process.status() != "zombie"]


def test_prefects_own_cli_deploys_prefect_yaml_on_a_fresh_server(tmp_path: Path) -> None:
    """What a Prefect user would type, on a server that has nothing yet: the pool, then
    prefect deploy --all. It schedules the process deployments only, each once."""
    import yaml

    expected = {f"{flow}/{name}" for flow, name in [
        ("mnist-training", "weekly-retrain"), ("mnist-rollback", "rollback"), ("mnist-data-ingest", "ingest"),
        ("mnist-drift", "daily"), ("mnist-serving-check", "every-15-minutes")]}
    assert len(yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]) == len(expected)
    with running_prefect_server(tmp_path / "home") as server:
        env = client_env(server)
        for command in (["work-pool", "create", "mnist-process", "--type", "process"], ["deploy", "--all"]):
            done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *command], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        deployments = api(server, "POST", "/deployments/filter", json={"limit": 50})
        flows = {flow["id"]: flow["name"] for flow in api(server, "POST", "/flows/filter", json={"limit": 50})}
        assert {f"{flows[d['flow_id']]}/{d['name']}" for d in deployments} == expected
        assert {d["work_pool_name"] for d in deployments} == {"mnist-process"}


def test_a_label_moved_from_the_command_line_shows_in_the_ui(worker_runs: dict[str, Any],
                                                             deployed: dict[str, Any]) -> None:
    """mnist registry rollback / label rewrite the registry artifact and move the serving:<label>
    tag between runs at once, as a flow's move does: the UI never says a version serves that does not."""
    first, second = worker_runs["runs"][:2]
    env = client_env(deployed, **worker_runs["store_env"])

    def registry(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "cli", "registry", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout + done.stderr  # the registry view's line is a side note, on stderr

    def shown() -> tuple[str, list[str], list[str]]:
        [latest] = api(deployed, "POST", "/artifacts/latest/filter",
                       json={"artifacts": {"key": {"any_": ["mnist-registry"]}}})
        tags = [api(deployed, "GET", f"/flow_runs/{run['id']}")["tags"] for run in (first, second)]
        return latest["data"], tags[0], tags[1]

    text, first_tags, second_tags = shown()  # as the flows left it: the second run's version serves
    assert "serving:stable" in second_tags and "serving:stable" not in first_tags
    try:
        printed = registry("rollback")
        assert "stable: 2 -> 1" in printed and "registry view is updated" in printed, printed
        text, first_tags, second_tags = shown()
        assert "Serving: `stable` -> version 1" in text, text[:500]
        assert "serving:stable" in first_tags and "serving:stable" not in second_tags, (first_tags, second_tags)
        assert "published:v1" in first_tags  # what the run did stays said
    finally:
        registry("label", "stable", "2")
    text, first_tags, second_tags = shown()
    assert "Serving: `stable` -> version 2" in text and "serving:stable" in second_tags
    assert not any(tag.startswith("serving:") for tag in first_tags), first_tags
