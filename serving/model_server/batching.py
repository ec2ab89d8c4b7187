"""Server-side batching, as ``tensorflow_model_server --enable_batching --batching_parameters_file``:
concurrent requests for a version's signature are merged into one call of up to ``max_batch_size``
rows, waiting at most ``batch_timeout_micros`` for the batch to fill, on ``num_batch_threads``
threads, padded up to the next of ``allowed_batch_sizes`` (with copies of the first row, as TF
Serving's batching session pads); a full queue of ``max_enqueued_batches`` answers UNAVAILABLE.
Defaults and checks follow TF Serving (``BasicBatchScheduler::QueueOptions``,
``bundle_factory_util.cc``).

Our own few dozen lines: TensorFlow's in-graph ``batch_function`` merges nothing when eager
calls come from separate threads (measured: mean batch 1.0), and no batching library of the
Python field fits a server that is not its own framework.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import grpc
import numpy as np

from serving.model_server.errors import RequestError

if TYPE_CHECKING:
    from serving.protocol.monitoring import BatchingMetrics

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()


def read_batching_parameters(path: Path | None) -> BatchingOptions:
    """TF Serving's BatchingParameters text file (None: its defaults); ValueError naming the problem."""
    if path is None:
        return BatchingOptions()
    from serving.protocol.tf_serving_protos import message_class, read_text_proto

    params = read_text_proto(path, message_class("BatchingParameters")())
    defaults = BatchingOptions()
    options = BatchingOptions(
        max_batch_size=params.max_batch_size.value if params.HasField("max_batch_size") else defaults.max_batch_size,
        batch_timeout_micros=params.batch_timeout_micros.value if params.HasField("batch_timeout_micros") else 0,
        max_enqueued_batches=(params.max_enqueued_batches.value if params.HasField("max_enqueued_batches")
                              else defaults.max_enqueued_batches),
        num_batch_threads=(params.num_batch_threads.value if params.HasField("num_batch_threads")
                           else defaults.num_batch_threads),
        allowed_batch_sizes=tuple(params.allowed_batch_sizes))
    sizes = options.allowed_batch_sizes
    if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != options.max_batch_size):
        raise ValueError(f"{path}: allowed_batch_sizes must increase and end at max_batch_size "
                         f"({options.max_batch_size}); got {list(sizes)}")
    if min(options.max_batch_size, options.num_batch_threads, options.max_enqueued_batches) < 1:
        raise ValueError(f"{path}: max_batch_size, num_batch_threads and max_enqueued_batches must be >= 1")
    return options


def refusal(code: grpc.StatusCode, message: str) -> Exception:
    """The request's status, as the server answers it."""
    return RequestError(code, message)


@dataclass
class Task:
    inputs: Arrays
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    outputs: Arrays | None = None
    error: Exception | None = None
    enqueued: float = field(default_factory=time.monotonic)

    def shape_key(self) -> tuple:
        """Tasks whose inputs differ past the batch dimension cannot share a batch."""
        return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(self.inputs.items()))


class Batcher:
    """One signature of one loaded version: calls from any number of threads, batched.

    As TF Serving's queue, it keeps one batch open at a time, which closes when full or when
    ``batch_timeout_micros`` have passed since its first request; the batch threads take turns
    filling it. ``answering`` says how many requests the server is answering, which adds two early
    exits TF Serving does not have: a request alone in the server runs at once in its own thread (a
    batch of its own, padded and counted as any), and a batch that holds every request the server is
    answering closes at once, since nobody could join it but a new arrival. The answers are the
    same, the wait is not (make bench). ``metrics``: TF Serving's batching-session metrics."""

    def __init__(self, run: Callable[[Arrays], Arrays], options: BatchingOptions,
                 answering: Callable[[], int] = lambda: 0, metrics: BatchingMetrics | None = None):
        self.run, self.options, self.answering, self.metrics = run, options, answering, metrics
        self.busy = 0  # tasks queued or being run
        self.lock = threading.Lock()
        self.queue: queue.Queue[Task] = queue.Queue(maxsize=options.max_enqueued_batches * options.max_batch_size)
        self.stopping = threading.Event()
        self.filling = threading.Lock()  # held by the batch thread filling the one open batch
        self.carried: list[Task] = []  # a task that did not fit the last batch: the next one starts with it
        self.batches = 0  # signature calls made, for a look at how well requests merged
        self.threads = [threading.Thread(target=self.serve, name=f"batch-{i}", daemon=True)
                        for i in range(options.num_batch_threads)]
        for thread in self.threads:
            thread.start()

    def __call__(self, inputs: Arrays) -> Arrays:
        rows = {len(array) for array in inputs.values() if array.ndim}
        if len(rows) != 1 or len(inputs) != sum(1 for a in inputs.values() if a.ndim) or rows == {0}:
            return self.run(inputs)  # nothing to merge (no batch dimension, or empty)
        size = rows.pop()
        if self.metrics:
            self.metrics.request(len(inputs), size)
        if size > self.options.max_batch_size:  # TF Serving's Queue::ValidateBatchTaskQueueCapacity
            raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"Task size {size} is larger than "
                                                           f"maximum input batch size {self.options.max_batch_size}")
        with self.lock:
            # alone: nothing to wait for, so no thread handoff; stopping: no thread may be left to take it
            direct = self.stopping.is_set() or (self.answering() <= 1 and self.busy == 0)
            self.busy += 1
        task = Task(inputs, size)
        if direct:  # a batch of its own, in this thread: padded and counted as any other
            self.process([task])
        else:
            try:
                self.queue.put_nowait(task)
            except queue.Full:
                with self.lock:
                    self.busy -= 1
                raise refusal(grpc.StatusCode.UNAVAILABLE,
                              "The batch scheduling queue to which this task was submitted is full") from None
            task.done.wait()
        if task.error is not None:
            raise task.error
        if task.outputs is None:  # a batch gives every task its rows or its error
            raise RuntimeError("a batched task ended without outputs or an error")
        return task.outputs

    def collect(self, first: Task) -> list[Task]:
        """``first`` and what arrives within the timeout that fits beside it."""
        batch, rows, key = [first], first.rows, first.shape_key()
        deadline = time.monotonic() + self.options.batch_timeout_micros / 1e6
        while rows < self.options.max_batch_size and len(batch) < self.answering():
            remaining = deadline - time.monotonic()
            try:
                task = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if task.shape_key() != key or rows + task.rows > self.options.max_batch_size:
                self.carried.append(task)
                break
            batch.append(task)
            rows += task.rows
        return batch

    def next_batch(self) -> list[Task] | None:
        with self.filling:
            if self.carried:
                return self.collect(self.carried.pop(0))
            try:
                return self.collect(self.queue.get(timeout=0.2))
            except queue.Empty:
                return None

    def serve(self) -> None:
        while True:
            with self.lock:
                if self.stopping.is_set() and self.busy == 0:
                    return  # stopped, and every task it took is answered
            batch = self.next_batch()
            if batch:
                self.process(batch)

    def run_observed(self, inputs: Arrays, rows: int, padding: int, queued_seconds: list[float]) -> Arrays:
        """One signature call, counted as TF Serving's batching session counts its wrapped runs."""
        if not self.metrics:
            return self.run(inputs)
        self.metrics.batch(rows, padding, queued_seconds)
        try:
            return self.run(inputs)
        finally:
            self.metrics.ran()

    def padded_size(self, rows: int) -> int:
        return next((size for size in self.options.allowed_batch_sizes if size >= rows), rows)

    def process(self, batch: list[Task]) -> None:
        rows = sum(task.rows for task in batch)
        pad = self.padded_size(rows) - rows
        merged = batch[0].inputs if len(batch) == 1 and not pad else {  # a lone request is not copied
            name: np.concatenate([task.inputs[name] for task in batch]
                                 + ([np.repeat(batch[0].inputs[name][:1], pad, axis=0)] if pad else []))
            for name in batch[0].inputs}
        try:
            outputs = self.run_observed(merged, rows, pad, [time.monotonic() - task.enqueued for task in batch])
        except Exception as error:  # noqa: BLE001  every task of the batch gets the error
            outputs = None
            for task in batch:
                task.error = error
        start = 0
        with self.lock:
            self.busy -= len(batch)
            self.batches += 1
        for task in batch:
            if outputs is not None:
                task.outputs = {name: value[start:start + task.rows] if value.ndim else value
                                for name, value in outputs.items()}
                start += task.rows
            task.done.set()

    def stop(self) -> None:
        """Answer every task already taken, then let the threads end, as TF Serving's queue drains
        before it goes: a request that reached an unloading version still gets its answer."""
        with self.lock:
            self.stopping.set()
