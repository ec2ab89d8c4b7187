"""The model a REST path names, read as TF Serving's ``ParseModelInfo`` (http_rest_api_util.cc)
reads it: the name and label percent-decoded (``DecodeArg``: curl's unescape, so "+" stays "+"),
the version a number that fits an int64. The local server's REST API and the gateway's routes,
in one place. No TensorFlow: the gateway imports it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from storage.errors import MnistError

SPEC = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
# kPredictionApiGegex and kModelStatusApiRegex
PREDICTION_ROUTE = re.compile(rf"(?i)^{SPEC}:(?P<method>classify|regress|predict)$")
STATUS_ROUTE = re.compile(r"(?i)^/v1/models(?:/(?P<name>[^/:]+))?"
                          r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                          r"(?:/(?P<metadata>metadata))?$")
# ours: model-aware readiness, and the gateway's feedback
READY_ROUTE = re.compile(rf"^{SPEC}/ready$")
FEEDBACK_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)/feedback$")
INT64_LIMIT = 2**63


class PathError(MnistError, ValueError):
    """A path TF Serving refuses with INVALID_ARGUMENT."""

    status = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class ModelPath:
    name: str
    version: int | None = None
    label: str | None = None


def model_path(match: re.Match) -> ModelPath:
    """The model, version and label a route's match names."""
    version = match.groupdict().get("version")
    if version and int(version) >= INT64_LIMIT:
        raise PathError(f"Failed to convert version: {version} to numeric.")
    label = match.groupdict().get("label")
    return ModelPath(unquote(match["name"] or "", errors="replace"), int(version) if version else None,
                     unquote(label, errors="replace") if label else None)


def fill_spec(spec: Any, path: ModelPath) -> None:
    """A ModelSpec (TensorFlow's class or the client's) for ``path``."""
    spec.name = path.name
    if path.version is not None:
        spec.version.value = path.version
    elif path.label:
        spec.version_label = path.label
