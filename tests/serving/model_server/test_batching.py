"""Server-side batching (`mnist serve --enable_batching`), as TF Serving's batching queue behaves:
one open batch, its timeout, its drain on unload, its refusals, its parameter checks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_client.client import ServingError, Target, predict, predict_probabilities
from storage.embedded import free_port
from tasks.export import saved_model_predict
from tests.conftest import metric_values, run_mnist, start_model_server


def test_batching_merges_concurrent_requests_and_answers_each_its_own(model_base: Path, saved_model_dir: Path,
                                                                      test_images) -> None:
    from serving.model_server.batching import BatchingOptions

    images, _ = test_images
    options = BatchingOptions(max_batch_size=32, batch_timeout_micros=200_000, num_batch_threads=1,
                              allowed_batch_sizes=(8, 32))
    server, address = start_model_server(model_base, batching=options)
    answers: dict[int, np.ndarray] = {}
    try:
        target = Target(address)

        def ask(index: int) -> None:
            answers[index] = predict_probabilities(images[index:index + 1], target)[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        batcher = server.manager.models["mnist"].versions[1].batchers["serving_default"]
        with pytest.raises(ServingError, match="INVALID_ARGUMENT.*Task size 33 is larger than maximum input batch "
                                               "size 32"):  # TF Serving's refusal, not a quiet bigger batch
            predict_probabilities(images[:33], target)
        split = predict(images[:70], address=address, images_per_call=32)  # three calls: 32, 32 and 6 images
        page = server.metrics.page().decode()
    finally:
        server.stop(grace=1)
    assert [r["digit"] for r in split] == saved_model_predict(saved_model_dir, images[:70]).argmax(axis=1).tolist()
    assert [r["input"] for r in split] == [str(i) for i in range(70)]
    offline = saved_model_predict(saved_model_dir, images[:8])
    assert sorted(answers) == list(range(8))
    assert all(np.allclose(answers[i][0], offline[i], atol=1e-5) for i in range(8))  # each its own row back
    assert batcher.batches < 8  # merged: 8 requests in fewer signature calls
    assert_batching_session_metrics(page, batcher.batches)


def assert_batching_session_metrics(page: str, signature_calls: int) -> None:
    """TF Serving's batching-session metrics for that traffic (batching_session.cc, batching_util.h):
    every request's input size, the 33-image one refused after it was counted (ComputeInputSize comes
    before Schedule); a batch's size after padding, so the lone 6-image call counts as 8 with 2 of
    padding; one wrapped run per signature call; a queuing time for every request that ran. Buckets
    hold values below their limit, as TensorFlow's Histogram::Add puts them: a 32 is not in le="32"."""
    prefix = ":tensorflow:serving:batching_session:"

    def value(name: str, **labels: str) -> float:
        return metric_values(page, f"{prefix}{name}")[tuple(sorted(labels.items()))]

    assert value("input_batch_size_count") == 8 + 1 + 3
    assert value("input_batch_size_sum") == 8 + 33 + 70
    buckets = ("1", "2", "8", "32", "64", "+Inf")
    assert [value("input_batch_size_bucket", le=le) for le in buckets] == [0, 8, 9, 9, 12, 12]
    assert value("wrapped_run_count") == signature_calls == value("processed_batch_size_count")
    padded = sum(metric_values(page, f"{prefix}padding_size_sum").values())
    assert value("processed_batch_size_sum") - padded == 8 + 70  # the rows that ran
    # every batch ran at an allowed size (8 or 32), the lone 6-image call too: none below 8, two or more of 32
    assert {dict(labels)["execution_batch_size"] for labels in metric_values(page, f"{prefix}padding_size_count")} \
        == {"8", "32"}
    assert value("processed_batch_size_bucket", le="8") == 0
    assert value("processed_batch_size_bucket", le="64") - value("processed_batch_size_bucket", le="16") >= 2
    assert metric_values(page, f"{prefix}queuing_latency_count") == {(("thread_pool_name", ""),): 8 + 3}


def test_histograms_count_as_tensorflow_samplers_do() -> None:
    """The exported buckets against TensorFlow's own monitoring Sampler fed the same values: the
    same limits (Buckets::Exponential, then DBL_MAX as +Inf), and each value below its limit."""
    from tensorflow.python.eager import monitoring

    from serving.protocol.monitoring import TfSampler, tf_exponential_buckets

    values = [0.5, 1, 1, 2, 3.5, 4, 31, 32, 33, 8192, 10_000, 99.9, 100, 1e6]
    for scale, growth, count in ((1, 2, 14), (100, 1.2, 52), (10, 1.8, 33)):
        reference = monitoring.Sampler(f"/test/sampler_{scale}_{count}",
                                       monitoring.ExponentialBuckets(scale, growth, count), "values", "label")
        ours = TfSampler(":test:sampler", "values", ("label",), tf_exponential_buckets(scale, growth, count))
        for value in values:
            reference.get_cell("a").add(value)
            ours.observe(value, "a")
        expected = reference.get_cell("a").value()
        family = next(iter(ours.collect()))
        buckets = [(sample.labels["le"], sample.value) for sample in family.samples if sample.name.endswith("_bucket")]
        assert [le for le, _ in buckets] == [f"{limit:.6g}" for limit in expected.bucket_limit[:-1]] + ["+Inf"]
        assert [count for _, count in buckets] == np.cumsum(expected.bucket).tolist()
        assert family.samples[-2].value == expected.sum and family.samples[-1].value == len(values)


def batched_calls(answering: int, arrivals: list[float], timeout_micros: int
                  ) -> tuple[list[int], list[np.ndarray], float]:
    """Calls of a Batcher at ``arrivals`` seconds from now, each with its own row; the sizes of
    the merged calls, each caller's answer, and when the last answer came."""
    from serving.model_server.batching import Batcher, BatchingOptions

    sizes: list[int] = []

    def run(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes.append(len(arrays["x"]))
        return {"y": arrays["x"] * 2}

    batcher = Batcher(run, BatchingOptions(max_batch_size=32, batch_timeout_micros=timeout_micros,
                                           num_batch_threads=2), lambda: answering)
    answers: list[np.ndarray] = [np.empty(0)] * len(arrivals)
    began = time.monotonic()

    def call(index: int) -> None:
        time.sleep(arrivals[index])
        answers[index] = batcher({"x": np.full((1, 3), float(index))})["y"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(arrivals))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    batcher.stop()
    return sizes, answers, time.monotonic() - began


def test_batching_keeps_one_batch_open_until_its_timeout_while_others_are_in_the_server() -> None:
    """TF Serving's queue has one open batch, closed when full or timed out: four requests 50 ms
    apart join one batch though two batch threads are idle, since the server answers eight."""
    sizes, answers, _ = batched_calls(8, [0.0, 0.05, 0.1, 0.15], timeout_micros=600_000)
    assert sizes == [4]
    assert [answer.tolist() for answer in answers] == [[[2.0 * i] * 3] for i in range(4)]


def test_batching_closes_a_batch_that_holds_every_request_in_the_server() -> None:
    """Nobody but a new arrival could join, so the batch does not wait out its (long) timeout."""
    sizes, answers, elapsed = batched_calls(3, [0.0, 0.0, 0.0], timeout_micros=20_000_000)
    assert sum(sizes) == 3 and elapsed < 10
    assert sorted(float(answer[0, 0]) for answer in answers) == [0.0, 2.0, 4.0]


def test_a_stopped_batcher_answers_what_it_had_queued() -> None:
    """A version unloads while requests wait in its queue: each still gets its answer, as TF
    Serving's queue drains before it goes, and none arriving afterwards waits forever."""
    from serving.model_server.batching import Batcher, BatchingOptions

    def slow_double(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.3)
        return {"y": arrays["x"] * 2}

    batcher = Batcher(slow_double, BatchingOptions(max_batch_size=1, num_batch_threads=2), lambda: 8)
    answers: dict[int, float] = {}

    def call(index: int) -> None:
        answers[index] = float(batcher({"x": np.full((1, 1), float(index))})["y"][0, 0])

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)  # two batches running, three queued
    batcher.stop()
    late = threading.Thread(target=call, args=(5,), daemon=True)
    late.start()
    threads.append(late)
    for thread in threads:
        thread.join(timeout=10)
    assert answers == {i: 2.0 * i for i in range(6)}


def test_batching_parameters_are_checked_as_tf_serving_checks_them(tmp_path: Path, model_base: Path) -> None:
    bad = tmp_path / "batching.txt"
    bad.write_text("max_batch_size { value: 64 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 32\n")
    result = run_mnist("serve", "--port", str(free_port()), "--model-base-path", str(model_base),
                       "--enable_batching", "--batching_parameters_file", str(bad))
    assert result.returncode == 2 and "must increase and end at max_batch_size (64)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
