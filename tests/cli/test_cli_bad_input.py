"""Bad input, as a new user gives it, gets one clear line and a non-zero exit, before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from storage.embedded import free_port
from tests.conftest import REPO, run_mnist


def test_train_refuses_a_missing_data_dir_before_any_work() -> None:
    result = run_mnist("train", "--data-dir", "/nonexistent")
    assert result.returncode == 2 and "--data-dir /nonexistent: no such folder" in result.stderr
    assert "temporary server" not in result.stderr and "Traceback" not in result.stderr
    from_env = run_mnist("train", env={"MNIST_DATA_DIR": "/nonexistent"})
    assert from_env.returncode == 2 and "MNIST_DATA_DIR /nonexistent" in from_env.stderr


def test_an_unreachable_store_is_said_at_once_and_a_read_gives_up_soon() -> None:
    env = {"MNIST_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y"}
    env = {**{k: v for k, v in os.environ.items() if k != "MNIST_RETRY_SECONDS"}, **env}
    result = subprocess.run([sys.executable, "-m", "cli", "registry", "list"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "retrying for up to 10 s (MNIST_RETRY_SECONDS)" in lines[-2]
    assert lines[-1].startswith("mnist registry: S3 unreachable")


def test_serve_names_a_missing_base_path_at_start_and_when_it_appears(tmp_path: Path) -> None:
    base = tmp_path / "not-yet"
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(free_port()),
                                "--model-base-path", str(base), "--file-system-poll-wait-seconds", "0.2"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        seen = []
        deadline = time.monotonic() + 60
        while not any("listening on" in line for line in seen) and time.monotonic() < deadline:
            seen.append(process.stdout.readline())
        assert any(f"base path {base} does not exist" in line for line in seen), seen
        base.mkdir()
        while not any(f"base path {base} is there now" in line for line in seen) and time.monotonic() < deadline:
            seen.append(process.stdout.readline())
        assert any("is there now" in line for line in seen)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        process.stdout.close()


def test_tensorflow_start_up_lines_show_only_with_verbose(tmp_path: Path) -> None:
    """A normal command's terminal holds none of TensorFlow's C++ lines; ``mnist -v`` keeps them."""
    seen = {}
    for flags in ((), ("-v",)):
        process = subprocess.Popen([sys.executable, "-m", "cli", *flags, "serve", "--port", str(free_port()),
                                    "--model-base-path", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            lines = []
            while not any("listening on" in line for line in lines):
                line = process.stdout.readline()
                assert line, lines
                lines.append(line)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            finally:
                if process.poll() is None:  # it ignored SIGTERM: the test fails, and leaves nothing running
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                lines += process.stdout.readlines()
                process.stdout.close()
        seen[flags] = "".join(lines)
    assert "listening on" in seen[()] and "does not exist" not in seen[()]  # an empty base path is fine
    for native in ("I0000", "E0000", "oneDNN", "cuda", "absl::InitializeLog", "rebuild TensorFlow"):
        assert native not in seen[()], seen[()]
    # which native lines TensorFlow prints depends on the machine (oneDNN's only where it is on by
    # default, CUDA's only without a GPU): -v keeps whichever it printed, glog-prefixed
    assert any(prefix in seen[("-v",)] for prefix in ("I0000", "W0000", "E0000")), seen[("-v",)]


def test_the_served_traffic_commands_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    cases = [(("drift", "--alpha", "2"), "--alpha: Input should be less than 1"),
             (("gateway", "--upstream", "127.0.0.1:1", "--log-sample-rate", "2"),
              "--log-sample-rate 2.0: must be within 0-1"),
             (("gateway", "--upstream", "127.0.0.1:1", "--log-queue-mib", "0"),
              "--log-queue-mib 0: must be at least 1"),
             (("gateway", "--upstream", "127.0.0.1:1", "--log-queue-size", "0"),
              "--log-queue-size 0: must be at least 1"),
             (("gateway", "--upstream", "127.0.0.1:1", "--rest-idle-timeout-seconds", "0"),
              "--rest-idle-timeout-seconds 0: must be above 0"),
             (("serve", "--model-base-path", str(tmp_path), "--rest-max-connections", "0"),
              "--rest-max-connections 0: must be at least 1"),
             (("serve", "--model-base-path", str(tmp_path), "--rest_api_num_threads=0"),
              "--rest-api-num-threads 0: must be at least 1"),
             (("feedback",), "give REQUEST_ID LABEL"),
             (("feedback", "some-id", "\u00b2"), "label '\u00b2' is not a digit 0-9"),
             (("feedback", "--csv", "/dev/null"), "no rows of request_id,label"),
             (("feedback", "--csv", str(tmp_path / "missing.csv")), "not a readable CSV"),
             (("data", "add", "--from-feedback", str(tmp_path)), "give no PATH"),
             (("train", "--candidates", "2", "--validation-size", "0"), "chosen by validation accuracy")]
    for args, expected in cases:
        result = run_mnist(*args, env={"MNIST_STATE_DIR": str(tmp_path / "state")})
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


ENTRY_WITH = """
import sys
import cli.app as app
def main(argv=None):
    print("answer on a piped stdout")  # block-buffered on a pipe
    print("a last error line", file=sys.stderr)
    {outcome}
app.main = main
app.run()
"""


def test_the_entry_point_keeps_every_exit_code_and_every_line() -> None:
    outcomes = {"return 3": 3, "return 0": 0, "raise SystemExit('refused')": 1, "raise SystemExit(None)": 0,
                "raise RuntimeError('a bug')": 1}
    results = {outcome: subprocess.run([sys.executable, "-c", ENTRY_WITH.format(outcome=outcome)], cwd=REPO,
                                       capture_output=True, text=True, timeout=60) for outcome in outcomes}
    for outcome, result in results.items():
        assert result.returncode == outcomes[outcome], outcome
        assert result.stdout == "answer on a piped stdout\n", outcome
        assert "a last error line" in result.stderr, outcome
    assert "RuntimeError: a bug" in results["raise RuntimeError('a bug')"].stderr.splitlines()[-1]


def test_deploy_and_worker_wait_for_the_prefect_api_and_name_it_when_they_give_up() -> None:
    api_url = f"http://127.0.0.1:{free_port()}/api"
    for command in ("deploy", "worker"):
        started = time.monotonic()
        result = run_mnist(command, "--wait", "2", env={"PREFECT_API_URL": api_url})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[-1] == (f"mnist {command}: the Prefect API at {api_url} did not answer within 2 s "
                             "(Connection refused); start it with make prefect, or set PREFECT_API_URL"), lines
        assert f"waiting up to 2 s for the Prefect API at {api_url}" in result.stdout
        assert 2 <= time.monotonic() - started < 60


def test_the_wait_for_the_prefect_api_ends_when_a_late_server_answers() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from flows.prefect_api import wait_for_api

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    port, said = free_port(), []
    server: list[HTTPServer] = []
    late = threading.Timer(1.5, lambda: (server.append(HTTPServer(("127.0.0.1", port), Health)),
                                         threading.Thread(target=server[0].serve_forever, daemon=True).start()))
    late.start()
    try:
        started = time.monotonic()
        wait_for_api(f"http://127.0.0.1:{port}/api", 30, said.append)
        assert 1.5 <= time.monotonic() - started < 10 and len(said) == 1 and "waiting up to 30 s" in said[0]
    finally:
        late.join()
        server[0].shutdown()
        server[0].server_close()
