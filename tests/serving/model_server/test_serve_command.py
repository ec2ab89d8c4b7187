"""`mnist serve` as a process: the command line production gives TF Serving, its flags, and a
process that never imports Keras."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mnist_client.client import Target, predict_probabilities
from storage.embedded import free_port
from tasks.export import saved_model_predict
from tests.conftest import REPO, run_mnist


def test_model_server_answers_without_importing_keras(model_base: Path, saved_model_dir: Path, test_images,
                                                      tmp_path: Path) -> None:
    """`mnist serve` keeps TensorFlow from importing Keras (a second of its start); the SavedModel
    must still load and answer as offline, as it would in TF Serving, which has no Keras."""
    images = test_images[0][:16]
    np.save(tmp_path / "images.npy", images)
    code = f"""
import json, sys
from pathlib import Path
import numpy as np
from cli.serve import without_keras_at_tensorflow_import
without_keras_at_tensorflow_import()
from mnist_client.client import predict
from tests.conftest import start_model_server
server, address = start_model_server(Path({str(model_base)!r}))
answers = predict(np.load({str(tmp_path / "images.npy")!r}), address=address)
server.stop(grace=1)
print(json.dumps({{"digits": [a["digit"] for a in answers], "keras": "keras" in sys.modules,
                   "matplotlib": "matplotlib" in sys.modules}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["digits"] == saved_model_predict(saved_model_dir, images).argmax(axis=1).tolist()
    assert answer == {**answer, "keras": False, "matplotlib": False}


def serve_in_process_group(*flags: str) -> tuple[subprocess.Popen, list[str]]:
    """``mnist serve FLAGS`` in its own process group; its output lines up to "listening on"."""
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", *flags], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lines and "listening on" in lines[-1]) and process.poll() is None:
        lines.append(process.stdout.readline())
    return process, lines


def stop_served(process: subprocess.Popen) -> None:
    from storage.embedded import stop_process

    stop_process(process.pid)
    process.wait(timeout=30)
    process.stdout.close()


def test_production_tf_serving_command_line_runs_unchanged(model_base: Path, saved_model_dir: Path, test_images,
                                                          tmp_path: Path) -> None:
    """The compose file's `serving` command, as tensorflow_model_server takes it (--flag=value,
    bools as =true), with only its paths and ports made local."""
    import httpx
    import yaml

    from serving.protocol.monitoring import metrics_path
    from serving.sync import model_config_text
    from tasks.export import write_warmup_requests

    images = test_images[0][:8]
    write_warmup_requests(model_base / "1", images)
    config_file = model_base.parent / "models.config"
    config_file.write_text(model_config_text("mnist", str(model_base), [1], {"stable": 1}))
    deploy = REPO / "serving" / "deploy"
    command = yaml.safe_load((deploy / "docker-compose.yml").read_text())["services"]["serving"]["command"]
    grpc_port, rest_port = free_port(), free_port()
    local = {"--port": str(grpc_port), "--rest_api_port": str(rest_port), "--model_config_file": str(config_file)}
    flags = []
    for flag in command:
        name, _, value = flag.partition("=")
        value = local.get(name, value.replace("/config/", f"{deploy}/"))
        flags.append(f"{name}={value}")
    assert len(flags) == len(command) >= 10 and "--enable_batching=true" in flags
    process, lines = serve_in_process_group(*flags)
    try:
        assert "listening on" in lines[-1], lines
        assert any("(3 warmup requests)" in line for line in lines), lines  # --enable_model_warmup=true
        probabilities, version = predict_probabilities(images, Target(f"127.0.0.1:{grpc_port}", label="stable"))
        assert version == 1 and np.allclose(probabilities, saved_model_predict(saved_model_dir, images), atol=1e-5)
        path = metrics_path(deploy / "monitoring.config")
        metrics = httpx.get(f"http://127.0.0.1:{rest_port}{path}", timeout=10)
        assert metrics.status_code == 200 and ":tensorflow:serving:request_count" in metrics.text
    finally:
        stop_served(process)


def test_warmup_and_tensorflow_threads_follow_tf_serving_flags(model_base: Path, test_images) -> None:
    from tasks.export import write_warmup_requests

    write_warmup_requests(model_base / "1", test_images[0][:8])
    process, lines = serve_in_process_group("--port", str(free_port()), "--model_base_path", str(model_base),
                                            "--enable_model_warmup=false", "--tensorflow_intra_op_parallelism=1")
    try:
        assert "listening on" in lines[-1], lines
        assert any("(0 warmup requests)" in line for line in lines), lines
        assert any("TensorFlow threads: intra-op 1, inter-op 0" in line for line in lines), lines
    finally:
        stop_served(process)
    refused = run_mnist("serve", "--model_base_path", str(model_base), "--tensorflow_session_parallelism=2",
                        "--tensorflow_intra_op_parallelism=2", "--tensorflow_inter_op_parallelism=2")
    assert refused.returncode == 2 and "not all three" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    bad_bool = run_mnist("serve", "--model_base_path", str(model_base), "--enable_batching=yes")
    assert bad_bool.returncode == 2 and "expected true or false, got 'yes'" in bad_bool.stderr


def test_load_retries_follow_tf_serving_flags(tmp_path: Path) -> None:
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    process, lines = serve_in_process_group("--port", str(free_port()), "--model_base_path", str(broken.parent),
                                            "--max_num_load_retries=0", "--load_retry_interval_micros=-1")
    try:
        assert "listening on" in lines[-1], lines
        assert any("loading mnist version 1 failed (try 1 of 1)" in line for line in lines), lines
        assert any("gave up loading mnist version 1" in line for line in lines), lines  # the default retries 5 times
    finally:
        stop_served(process)
    refused = run_mnist("serve", "--model_base_path", str(broken.parent), "--max_num_load_retries=-1")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "mnist serve: --max_num_load_retries must be 0 or more, not -1"


# Every flag of tensorflow_model_server (tensorflow_serving/model_servers/main.cc, 2.21), so any
# production command line parses here.
TF_SERVING_FLAGS = (
    "port grpc_socket_path rest_api_port rest_api_num_threads rest_api_timeout_in_ms rest_api_enable_cors_support "
    "enable_batching allow_version_labels_for_unavailable_models batching_parameters_file "
    "enable_per_model_batching_parameters model_config_file model_config_file_poll_wait_seconds model_name "
    "model_base_path num_load_threads num_unload_threads max_num_load_retries load_retry_interval_micros "
    "file_system_poll_wait_seconds flush_filesystem_caches tensorflow_session_parallelism "
    "tensorflow_session_config_file tensorflow_intra_op_parallelism tensorflow_inter_op_parallelism "
    "use_alts_credentials ssl_config_file platform_config_file per_process_gpu_memory_fraction saved_model_tags "
    "grpc_channel_arguments grpc_max_threads enable_model_warmup num_request_iterations_for_warmup version "
    "monitoring_config_file remove_unused_fields_from_bundle_metagraph prefer_tflite_model num_tflite_pools "
    "num_tflite_interpreters_per_pool enable_signature_method_name_check xla_cpu_compilation_enabled "
    "xla_gpu_compilation_enabled enable_profiler thread_pool_factory_config_file mixed_precision "
    "skip_initialize_tpu enable_grpc_healthcheck_service enable_serialization_as_tensor_content"
).split()


def test_every_tensorflow_model_server_flag_is_taken() -> None:
    from cli.app import build_parser

    commands = next(action for action in build_parser()._actions if action.dest == "command")
    taken = {option for action in commands.choices["serve"]._actions for option in action.option_strings}
    assert [name for name in TF_SERVING_FLAGS if f"--{name}" not in taken] == []
    version = run_mnist("serve", "--version=true")  # a bool, as main.cc declares it
    assert version.returncode == 0 and version.stdout.splitlines()[1].startswith("TensorFlow Library: 2.")
    refused = run_mnist("serve", "--model_base_path=/nowhere", "--prefer_tflite_model=true")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("mnist serve: --prefer_tflite_model=true is not supported here "
                                      "(no TensorFlow Lite models)")


def test_grpc_and_rest_flags_behave_as_tf_serving(model_base: Path, test_images, tmp_path: Path) -> None:
    """server.cc BuildAndStart: a UNIX socket beside the port, channel arguments, the standard
    health service (SERVING for "", ModelService and PredictionService; an unknown service is
    NOT_FOUND); http_server.cc: CORS headers and the OPTIONS preflight."""
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    socket_path, rest_port, port = tmp_path / "grpc.sock", free_port(), free_port()
    process, lines = serve_in_process_group(
        f"--port={port}", f"--model_base_path={model_base}", f"--rest_api_port={rest_port}",
        f"--grpc_socket_path={socket_path}", "--enable_grpc_healthcheck_service=true",
        "--grpc_channel_arguments=grpc.max_connection_age_ms=600000,grpc.primary_user_agent=mnist-test",
        "--grpc_max_threads=4", "--rest_api_enable_cors_support", "--num_load_threads=2", "--saved_model_tags=serve")
    try:
        assert "listening on" in lines[-1], lines
        assert any("--num_load_threads=2 has no effect here" in line for line in lines), lines
        images = test_images[0][:4]
        by_socket = predict_probabilities(images, Target(f"unix:{socket_path}"))
        assert by_socket[1] == 1 and by_socket[0].shape == (4, 10)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        for service in ("", "ModelService", "PredictionService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        try:
            health.Check(health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService"), timeout=10)
            raise AssertionError("an unknown service answered")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        rest = f"http://127.0.0.1:{rest_port}/v1/models/mnist"
        status = httpx.get(rest, timeout=30)
        assert status.status_code == 200 and status.headers["access-control-allow-origin"] == "*"
        assert status.headers["access-control-allow-methods"] == "POST, GET"
        preflight = httpx.options(f"{rest}:predict", headers={"Origin": "https://app.example"}, timeout=30)
        assert preflight.status_code == 200 and preflight.content == b""
        assert preflight.headers["access-control-allow-headers"] == "Content-Type"
        assert httpx.options(f"{rest}:predict", timeout=30).status_code == 400  # no Origin
    finally:
        stop_served(process)


def test_the_drop_in_name_takes_tf_servings_command_line() -> None:
    """tensorflow_model_server (a console script of this project) is mnist serve under TF Serving's
    name: what TF Serving's own test harness and launch scripts start."""
    binary = Path(sys.executable).parent / "tensorflow_model_server"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("TensorFlow ModelServer: mnist serve")
    refused = subprocess.run([str(binary), "--port", "1", "--no_such_flag"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "no_such_flag" in refused.stderr
