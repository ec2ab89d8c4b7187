"""Monitoring for the local server and the gateway: Prometheus metrics (prometheus-client)
and a model-aware readiness endpoint.

Served at TF Serving's path, ``/monitoring/prometheus/metrics``, on the REST port. Where
TF Serving has a metric, ours has its name, labels and unit (``servables/tensorflow/util.cc``,
``model_servers/prediction_service_impl.cc``, ``http_server.cc``):

- ``:tensorflow:serving:request_count{model_name,status}``: every Predict, Classify and Regress;
- ``:tensorflow:serving:request_latency{model_name,API,entrypoint}``: microseconds, successful
  requests only, TF Serving's buckets (10 us x 1.8^i); API ``Predict`` for gRPC, ``predict`` for REST;
- with ``--enable_batching``, its batching session's (``batching/batching_session.cc``,
  ``batching_util.h``): ``:tensorflow:serving:batching_session:queuing_latency{thread_pool_name}``
  (microseconds), ``...:input_batch_size``, ``...:processed_batch_size``,
  ``...:padding_size{execution_batch_size}`` and ``...:wrapped_run_count``.

Histograms follow TensorFlow's own rule, not Prometheus's: a value counts in the first bucket whose
limit is above it, so ``le="2"`` holds a batch of 1 (``TfSampler``).

TF Serving has no per-version figures (tensorflow/serving#1970); these are ours:

- ``mnist_serving_requests_total{model,version,label,api,entrypoint,code}``;
- ``mnist_serving_request_latency_seconds{model,version,api,entrypoint}``.

Readiness (TF Serving has none that knows the model, tensorflow/serving#1754):
``GET /v1/models/NAME[/versions/N | /labels/L]/ready`` answers 200 ``{"ready": true, "version": N}``
only when a request for that model (version, label) would be served now, else 503 with the reason.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
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


def tf_exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TensorFlow's ``monitoring::Buckets::Exponential``: ``count`` limits multiplied up from ``scale``
    (as it computes them), then DBL_MAX, which TF Serving's exporter prints as +Inf."""
    limits, bound = [], scale
    for _ in range(count):
        limits.append(bound)
        bound *= growth
    return (*limits, sys.float_info.max)


class TfSampler:
    """A histogram as TF Serving exports a ``monitoring::Sampler`` (``util/prometheus_exporter.cc``).

    Our own few lines, as prometheus-client's Histogram counts a value at or below ``le`` while
    TensorFlow's ``Histogram::Add`` puts it in the first bucket whose limit is above it: batch sizes
    are whole numbers, so every one would land a bucket lower than TF Serving shows it. Limits are
    printed as absl prints a double (six significant digits), the last as +Inf."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], limits: tuple[float, ...]):
        self.name, self.documentation, self.labelnames, self.limits = name, documentation, labelnames, limits
        self.cells: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # labels -> (bucket counts, [sum])
        self.lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        bucket = min(bisect.bisect_right(self.limits, value), len(self.limits) - 1)
        with self.lock:
            counts, total = self.cells.setdefault(labels, ([0] * len(self.limits), [0.0]))
            counts[bucket] += 1
            total[0] += value

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "histogram")
        shown = [f"{limit:.6g}" for limit in self.limits[:-1]] + ["+Inf"]
        with self.lock:
            for labels, (counts, total) in sorted(self.cells.items()):
                named, cumulative = dict(zip(self.labelnames, labels)), 0
                for le, count in zip(shown, counts):
                    cumulative += count
                    metric.add_sample(f"{self.name}_bucket", {**named, "le": le}, cumulative)
                metric.add_sample(f"{self.name}_sum", named, total[0])
                metric.add_sample(f"{self.name}_count", named, cumulative)
        yield metric


class BatchingMetrics:
    """TF Serving's batching-session metrics, under its names and buckets. A request is counted by
    the size of each input (``ComputeInputSize``, before the queue may refuse it), a batch by its
    size after padding, its padding and each request's wait from queue to batch (``ProcessBatch``).
    The model server's batching session has an empty ``thread_pool_name``."""

    def __init__(self) -> None:
        prefix = ":tensorflow:serving:batching_session:"
        sizes = tf_exponential_buckets(1, 2, 14)
        self.queuing_latency = TfSampler(f"{prefix}queuing_latency",
                                         "Distribution of wall time spent (in microseconds) in queuing",
                                         ("thread_pool_name",), tf_exponential_buckets(100, 1.2, 52))
        self.input_batch_size = TfSampler(f"{prefix}input_batch_size",
                                          "Tracks the batch size distribution on the inputs.", (), sizes)
        self.processed_batch_size = TfSampler(f"{prefix}processed_batch_size",
                                              "Tracks the batch size distribution on processing.", (), sizes)
        self.padding_size = TfSampler(f"{prefix}padding_size", "Tracks the padding size distribution on batches.",
                                      ("execution_batch_size",), sizes)
        self.wrapped_run_count = ExactNameCounter(f"{prefix}wrapped_run_count",
                                                  "Total count of run calls on the wrapped session", ())

    def collectors(self) -> tuple[Any, ...]:
        return (self.queuing_latency, self.input_batch_size, self.processed_batch_size, self.padding_size,
                self.wrapped_run_count)

    def request(self, inputs: int, rows: int) -> None:
        for _ in range(inputs):
            self.input_batch_size.observe(rows)

    def batch(self, rows: int, padding: int, queued_seconds: list[float]) -> None:
        """A batch about to run: ``rows`` asked for, ``padding`` added, each request's time in the queue."""
        self.padding_size.observe(padding, str(rows + padding))
        self.processed_batch_size.observe(rows + padding)
        for seconds in queued_seconds:
            self.queuing_latency.observe(seconds * 1e6, "")

    def ran(self) -> None:
        self.wrapped_run_count.inc()


class ServingMetrics:
    """One registry per server, so servers in one process (tests) keep their own counts."""

    def __init__(self, batching: BatchingMetrics | None = None) -> None:
        self.registry = CollectorRegistry()
        self.tf_request_count = ExactNameCounter(":tensorflow:serving:request_count", "The total number of requests.",
                                                 ("model_name", "status"))
        self.registry.register(self.tf_request_count)
        self.tf_request_latency = TfSampler(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ("model_name", "API", "entrypoint"), tf_exponential_buckets(10, 1.8, 33))
        self.registry.register(self.tf_request_latency)
        for collector in batching.collectors() if batching else ():
            self.registry.register(collector)
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
            self.tf_request_latency.observe(seconds * 1e6, model, api, entrypoint)
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
    from serving.protocol.tf_serving_protos import message_class, read_text_proto

    config = read_text_proto(monitoring_config_file, message_class("MonitoringConfig")())
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or PROMETHEUS_PATH
