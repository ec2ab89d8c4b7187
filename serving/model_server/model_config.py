"""TF Serving's ``models.config``: reading it, applying a version policy, and the checks
TF Serving makes before it accepts one (``model_servers/server_core.cc``:
``ValidateModelConfigList``, ``GetPlatform``, ``CreateStoragePathRoutes``)."""

from __future__ import annotations

from pathlib import Path

import grpc
from tensorflow_serving.config import model_server_config_pb2

from serving.protocol.tf_serving_protos import read_text_proto
from storage.errors import MnistError

SUPPORTED_PLATFORM = "tensorflow"


class ConfigRefused(MnistError, ValueError):
    """A config TF Serving would refuse, with the status code it answers."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message, status=code.name)
        self.code = code


def single_model_config(name: str, base_path: Path) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = name, str(base_path), SUPPORTED_PLATFORM
    return config


def read_model_config_file(path: Path) -> model_server_config_pb2.ModelServerConfig:
    return read_text_proto(path, model_server_config_pb2.ModelServerConfig())


def versions_to_serve(config: model_server_config_pb2.ModelConfig, available: list[int]) -> set[int]:
    """Apply the model_version_policy: latest N (default 1), all, or specific."""
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(available)
    if choice == "specific":
        return set(policy.specific.versions) & set(available)
    count = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions else 1
    return set(sorted(available)[-count:])


def is_relative_path(uri: str) -> bool:
    """TF Serving's ``UriIsRelativePath``: no scheme, no host, not an absolute path."""
    return "://" not in uri and not uri.startswith("/")


def validate_model_config_list(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Raise ConfigRefused for what TF Serving refuses; checked before anything changes."""
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigRefused(grpc.StatusCode.INVALID_ARGUMENT,
                            "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                            "Only ModelConfigList is currently supported")
    names: set[str] = set()
    for model in config.model_config_list.config:
        if model.name in names:
            raise ConfigRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
    for model in config.model_config_list.config:
        if is_relative_path(model.base_path):
            raise ConfigRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Expected model {model.name} to have an absolute path or URI; "
                                f"got base_path()={model.base_path}")
        validate_platform(model)


def validate_platform(model: model_server_config_pb2.ModelConfig) -> None:
    """TF Serving's ``GetPlatform``: the deprecated ``model_type`` or ``model_platform``, not both."""
    if model.model_type:
        if model.model_platform:
            raise ConfigRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                "Illegal setting both ModelServerConfig::model_type (deprecated) and "
                                f"ModelServerConfig::model_platform, model name is {model.name}")
        if model.model_type != model_server_config_pb2.TENSORFLOW:
            raise ConfigRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"ModelServerConfig::model_type choice {model.model_type} not supported.")
        return
    if not model.model_platform:
        raise ConfigRefused(grpc.StatusCode.INVALID_ARGUMENT,
                            "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                            f"ModelServerConfig::model_platform, model name is {model.name}")
    if model.model_platform != SUPPORTED_PLATFORM:
        raise ConfigRefused(grpc.StatusCode.INVALID_ARGUMENT,
                            f"Model {model.name} requests unsupported platform {model.model_platform}")
