"""Monitoring for the local server and the gateway: Prometheus metrics (prometheus-client)
and a model-aware readiness endpoint.

Served at TF Serving's path, ``/monitoring/prometheus/metrics``, on the REST port. Where
TF Serving has a metric, ours has its name, labels and unit (``servables/tensorflow/util.cc``,
``model_servers/prediction_service_impl.cc``, ``http_server.cc``):

- ``:tensorflow:serving:request_count{model_name,status}``: every Predict, Classify and Regress;
- ``:tensorflow:serving:request_latency{model_name,API,entrypoint}``: microseconds, successful
  requests only, TF Serving's buckets (10 us x 1.8^i); API ``Predict`` for gRPC, ``predict`` for REST.

TF Serving has no per-version figures (tensorflow/serving#1970); these are ours:

- ``mnist_serving_requests_total{model,version,label,api,entrypoint,code}``;
- ``mnist_serving_request_latency_seconds{model,version,api,entrypoint}``.

Readiness (TF Serving has none that knows the model, tensorflow/serving#1754):
``GET /v1/models/NAME[/versions/N | /labels/L]/ready`` answers 200 ``{"ready": true, "version": N}``
only when a request for that model (version, label) would be served now, else 503 with the reason.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
TF_SERVING_LATENCY_BUCKETS = tuple(10 * 1.8 ** i for i in range(32)) + (float("inf"),)
MAX_SERIES = 1000  # per-version series; past it, new (model, version, label) combinations count as OTHER
OTHER = "(other)"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, float("inf"))

prometheus_client.disable_created_metrics()  # TF Serving has no *_created series


class ExactNameCounter:
    """A counter exposed under exactly TF Serving's name: prometheus-client's Counter would
    append ``_total``, and dashboards built for TF Serving query the bare name."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.values: dict[tuple[str, ...], int] = defaultdict(int)
        self.lock = threading.Lock()

    def inc(self, *labels: str) -> None:
        with self.lock:
            self.values[labels] += 1

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "unknown")
        with self.lock:
            for labels, value in sorted(self.values.items()):
                metric.add_sample(self.name, dict(zip(self.labelnames, labels)), value)
        yield metric


class ServingMetrics:
    """One registry per server, so servers in one process (tests) keep their own counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tf_request_count = ExactNameCounter(":tensorflow:serving:request_count", "The total number of requests.",
                                                 ("model_name", "status"))
        self.registry.register(self.tf_request_count)
        self.tf_request_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ("model_name", "API", "entrypoint"), buckets=TF_SERVING_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("mnist_serving_requests", "Requests by model version and label.",
                                ("model", "version", "label", "api", "entrypoint", "code"), registry=self.registry)
        self.latency = Histogram("mnist_serving_request_latency_seconds", "Request latency by model version.",
                                 ("model", "version", "api", "entrypoint"), buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.children: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def observe(self, model: str, version: int | None, label: str, api: str, entrypoint: str, code: str,
                seconds: float) -> None:
        """One Predict, Classify or Regress: ``api`` as TF Serving names it (``Predict`` on gRPC,
        ``predict`` on REST), ``entrypoint`` ``GRPC`` or ``REST``, ``code`` the status name."""
        shown = "" if version is None else str(version)
        key = (model, shown, label, api, entrypoint, code)
        if key not in self.children and len(self.children) >= MAX_SERIES:
            # names and labels come from requests: a caller inventing them must not grow memory without end
            model = shown = label = OTHER
            key = (model, shown, label, api, entrypoint, code)
        self.tf_request_count.inc(model, code)
        if code == "OK":
            self.tf_request_latency.labels(model, api, entrypoint).observe(seconds * 1e6)
        children = self.children.get(key)
        if children is None:  # labels() takes a lock and builds a key each call: once per series instead
            children = self.children[key] = (self.requests.labels(*key), self.latency.labels(model, shown, api,
                                                                                              entrypoint))
        children[0].inc()
        children[1].observe(seconds)

    def page(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def readiness(version: int | None, reason: str = "") -> tuple[int, dict[str, object]]:
    """The readiness answer: the version that would serve, or why none would."""
    if version is None:
        return 503, {"ready": False, "reason": reason}
    return 200, {"ready": True, "version": version}


def metrics_path(monitoring_config_file: Path) -> str | None:
    """The Prometheus path a TF Serving ``--monitoring_config_file`` enables (None: metrics off).
    Raises ValueError naming the file when it is not a MonitoringConfig text proto."""
    from serving.tf_serving_protos import message_class, read_text_proto

    config = read_text_proto(monitoring_config_file, message_class("MonitoringConfig")())
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or PROMETHEUS_PATH
