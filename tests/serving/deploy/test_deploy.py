"""The production files in serving/deploy parse with TF Serving's messages and hang together."""

from __future__ import annotations

from pathlib import Path

import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from mnist_client.client import IMAGES_PER_CALL
from serving.protocol.tf_serving_protos import message_class
from serving.sync import model_config_text

DEPLOY = Path(__file__).resolve().parents[3] / "serving" / "deploy"


def test_models_config_parses_with_the_real_proto_and_labels_served_versions() -> None:
    config = text_format.Parse((DEPLOY / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    model = config.model_config_list.config[0]
    served = set(model.model_version_policy.specific.versions)
    assert model.name == "mnist" and model.base_path == "/models/mnist"
    assert dict(model.version_labels) == {"stable": 1, "canary": 2} and set(model.version_labels.values()) <= served


def test_sync_writes_what_the_real_proto_reads() -> None:
    text = model_config_text("mnist", "/models/mnist", [3, 4], {"stable": 3, "old": 1})
    model = text_format.Parse(text, model_server_config_pb2.ModelServerConfig()).model_config_list.config[0]
    assert list(model.model_version_policy.specific.versions) == [3, 4] and dict(model.version_labels) == {"stable": 3}


def test_batching_and_monitoring_configs_parse() -> None:
    batching_text = (DEPLOY / "batching_parameters.txt").read_text()
    batching = text_format.Parse(batching_text, message_class("BatchingParameters")())
    assert batching.max_batch_size.value == 256 and batching.batch_timeout_micros.value == 2000
    assert IMAGES_PER_CALL == batching.max_batch_size.value  # the client never sends a call TF Serving refuses
    monitoring = text_format.Parse((DEPLOY / "monitoring.config").read_text(), message_class("MonitoringConfig")())
    assert monitoring.prometheus_config.enable and monitoring.prometheus_config.path.startswith("/monitoring")


def test_compose_file_is_valid_and_refers_to_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"s3", "sync", "serving", "gateway"} <= set(services)
    gateway = services["gateway"]["command"]
    assert gateway[:2] == ["mnist", "gateway"] and gateway[gateway.index("--upstream") + 1] == "serving:8500"
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    build = services["sync"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    flags = services["serving"]["command"]
    for flag in flags:
        if flag.startswith(("--batching_parameters_file", "--monitoring_config_file")):
            mounted = flag.split("=")[1]
            assert any(v.split(":")[1] == mounted for v in services["serving"]["volumes"]), flag
