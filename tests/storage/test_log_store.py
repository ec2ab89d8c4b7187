"""The prediction log store on a real SeaweedFS: batches are GZIP TFRecord files, batches from
before compression still read, an index that lies about its file is refused in one line, and
``mnist logs`` reads it all back."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from mnist_client.protos import logging_pb2, predict_pb2, prediction_log_pb2
from mnist_client.tensors import to_tensor_proto
from serving.gateway.log_records import prediction_log
from storage import tfrecord
from storage.logs import LogEntry, PredictionLogStore
from storage.s3 import VerificationFailed
from storage.settings import TrafficSettings
from tasks.data import load_test_set
from tests.conftest import run_mnist


@pytest.fixture()
def logs(store_env) -> PredictionLogStore:
    store = PredictionLogStore(TrafficSettings())
    store.ensure_bucket()
    return store


@pytest.fixture(scope="module")
def logged_calls(prepared_path: Path) -> tuple[list[LogEntry], list[list[bytes]]]:
    """Three logged calls of 64 real digits each, as the gateway frames them: each record as its pieces."""
    digits = load_test_set(prepared_path)[0][:192]
    entries, records = [], []
    for number in range(3):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "mnist"
        request.inputs["image"].CopyFrom(to_tensor_proto(digits[number * 64:(number + 1) * 64]))
        entries.append(LogEntry(f"call-{number}", "2026-12-01T05:00:00.000+00:00", 1, "", "grpc", 64))
        records.append(prediction_log(b"", request.SerializeToString(), b""))
    return entries, records


def stored_index(logs: PredictionLogStore, key: str) -> dict:
    return json.loads(logs.get_bytes(key))


def rewrite_index(logs: PredictionLogStore, key: str, change) -> None:
    index = stored_index(logs, key)
    change(index["file"])
    logs.client.put_object(Bucket=logs.bucket, Key=key, Body=json.dumps(index).encode())


def test_a_batch_is_stored_gzipped_and_reads_back_record_for_record(logs: PredictionLogStore, logged_calls) -> None:
    entries, records = logged_calls
    key = logs.write_batch(entries, records)
    stored = logs.get_bytes(key.removesuffix(".json") + ".tfrecord.gz")
    framed = tfrecord.encode(records)
    assert gzip.decompress(stored) == framed  # one plain gzip member: what TFRecordDataset's GZIP reads
    assert len(stored) * 5 < len(framed)
    assert stored_index(logs, key)["file"] == {"sha256": hashlib.sha256(stored).hexdigest(), "size": len(stored),
                                               "compression": "GZIP", "records_size": len(framed)}
    assert logs.read_batch(key) == [(entry, b"".join(pieces)) for entry, pieces in zip(entries, records)]


def test_batches_list_oldest_first_within_a_second(logs: PredictionLogStore, logged_calls) -> None:
    entries, records = logged_calls
    times = [f"2026-12-01T05:00:00.{ms:03d}+00:00" for ms in (950, 800, 640, 320, 100, 5)]  # written newest first
    keys = [logs.write_batch([replace(entries[0], time=time)], records[:1]) for time in times]
    assert logs.batch_keys(["2026-12-01"]) == keys[::-1]  # random names would list so 1 time in 720


def test_a_batch_written_before_compression_still_reads(logs: PredictionLogStore, logged_calls) -> None:
    entries, records = logged_calls
    key = logs.write_batch(entries, records)
    framed = tfrecord.encode(records)
    logs.client.put_object(Bucket=logs.bucket, Key=key.removesuffix(".json") + ".tfrecord", Body=framed)
    rewrite_index(logs, key, lambda file: file.clear() or file.update(
        sha256=hashlib.sha256(framed).hexdigest(), size=len(framed)))
    assert logs.read_batch(key) == [(entry, b"".join(pieces)) for entry, pieces in zip(entries, records)]


@pytest.mark.parametrize("lie, message", [
    ({"records_size": 100}, "does not hold exactly the 100 bytes"),   # inflates past what the index says
    ({"records_size": (256 << 20) + 1}, "is not one this store reads"),  # more than any writer makes
    ({"records_size": "many"}, "is not one this store reads"),
    ({"compression": "ZSTD"}, "compression 'ZSTD'"),
])
def test_an_index_that_lies_about_its_file_is_refused_in_one_line(logs: PredictionLogStore, logged_calls,
                                                                  lie: dict, message: str) -> None:
    key = logs.write_batch(*logged_calls)
    rewrite_index(logs, key, lambda file: file.update(lie))
    with pytest.raises(VerificationFailed, match=message) as refused:
        logs.read_batch(key)
    assert key in str(refused.value) and "\n" not in str(refused.value)


def test_a_gzip_stream_that_is_not_one_is_refused() -> None:
    records = [[b"a rec", b"ord"], [b"", b"another", b""]]
    stored, size = tfrecord.encode_gzipped(records)
    framed = tfrecord.encode(records)
    assert size == len(framed) and tfrecord.gunzipped(stored, size) == framed
    assert list(tfrecord.decode(framed)) == [b"a record", b"another"]  # the pieces are framed as one
    assert stored[:2] == b"\x1f\x8b"  # gzip's magic, not zlib's header
    with pytest.raises(tfrecord.TFRecordError, match="not a gzip stream"):
        tfrecord.gunzipped(framed, size)
    with pytest.raises(tfrecord.TFRecordError, match="exactly"):  # a second member is left unread
        tfrecord.gunzipped(stored + stored, size)


def test_the_pieces_of_a_prediction_log_are_protobufs_own_serialization(logged_calls) -> None:
    request = predict_pb2.PredictRequest.FromString(logged_calls[1][0][1])
    response = predict_pb2.PredictResponse()
    response.model_spec.version.value = 7
    metadata = logging_pb2.LogMetadata()
    metadata.model_spec.version_label = "stable"
    expected = prediction_log_pb2.PredictionLog(log_metadata=metadata)
    expected.predict_log.request.CopyFrom(request)
    expected.predict_log.response.CopyFrom(response)
    pieces = prediction_log(metadata.SerializeToString(), request.SerializeToString(), response.SerializeToString())
    assert b"".join(pieces) == expected.SerializeToString()


def test_mnist_logs_lists_the_batches_and_shows_a_request_with_its_answers(logs: PredictionLogStore,
                                                                           logged_calls) -> None:
    second = datetime.now(timezone.utc).replace(microsecond=0)  # both batches today, in a set order
    sooner, later = (second.replace(microsecond=ms * 1000).isoformat(timespec="milliseconds") for ms in (100, 200))
    request = predict_pb2.PredictRequest.FromString(logged_calls[1][0][1])
    response = predict_pb2.PredictResponse()
    response.model_spec.version.value = 3
    answered = np.full((64, 10), 0.01, dtype=np.float32)
    answered[np.arange(64), np.arange(64) % 10] = 0.91
    response.outputs["probabilities"].CopyFrom(to_tensor_proto(answered))
    entry = LogEntry("answered-1", sooner, 3, "stable", "grpc", 64)
    logs.write_batch([entry], [prediction_log(b"", request.SerializeToString(), response.SerializeToString())])
    logs.write_batch([replace(e, time=later) for e in logged_calls[0]], logged_calls[1])

    listed = run_mnist("logs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    batches = json.loads(listed.stdout)["batches"]
    assert [(b["records"], b["images"], b["versions"]) for b in batches] == [(1, 64, [3]), (3, 192, [1])]
    assert all(b["stored_bytes"] * 5 < b["records_bytes"] for b in batches)

    shown = run_mnist("logs", "show", "answered-1")
    assert shown.returncode == 0, shown.stderr
    assert "answered by version 3 (label stable), 64 image(s)" in shown.stdout
    assert "  image 0: 0 (0.910)" in shown.stdout and "  image 17: 7 (0.910)" in shown.stdout

    missing = run_mnist("logs", "show", "never-logged")
    assert missing.returncode == 1 and "never-logged is not in the prediction logs" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    refused = run_mnist("logs", "list", "--hours", "0")
    assert refused.returncode == 2 and "--hours 0: must be above 0" in refused.stderr


def test_logs_windows_are_rolling_hours_across_midnight(logs: PredictionLogStore, logged_calls) -> None:
    """A call 25 hours old sits in an earlier day folder: out of the default 24 hours, in 26, as
    mnist drift's --window-hours counts; calendar days no longer decide."""
    from storage.logs import day_folders

    old = (datetime.now(timezone.utc) - timedelta(hours=25)).isoformat(timespec="milliseconds")
    logs.write_batch([replace(logged_calls[0][0], request_id="yesterday-1", time=old)], logged_calls[1][:1])
    assert run_mnist("logs", "show", "yesterday-1").returncode == 1
    shown = run_mnist("logs", "show", "yesterday-1", "--hours", "26")
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(run_mnist("logs", "list", "--hours", "26", "--json").stdout)["batches"]
    assert [batch["records"] for batch in listed] == [1]
    late, early = datetime(2026, 12, 6, 1, 0, tzinfo=timezone.utc), datetime(2026, 12, 5, 23, 0, tzinfo=timezone.utc)
    assert day_folders(early, late) == ["2026-12-06", "2026-12-05"] and day_folders(late, late) == ["2026-12-06"]


def test_one_large_call_and_one_bad_entry_leave_the_days_logs_readable(logs: PredictionLogStore,
                                                                        logged_calls) -> None:
    """A call of 10,000 images is an entry the reader takes (writer and reader share the bound); an
    entry the index holds malformed is skipped and counted, and the rest of its batch still reads."""
    from storage.logs import MAX_LOGGED_EXAMPLES

    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    entries = [replace(entry, time=now) for entry in logged_calls[0]]
    entries[0] = replace(entries[0], examples=10_000)
    key = logs.write_batch(entries, logged_calls[1])
    assert [entry.examples for entry, _ in logs.read_batch(key)] == [10_000, 64, 64] and MAX_LOGGED_EXAMPLES > 10_000
    index = stored_index(logs, key)
    index["records"][1]["examples"] = MAX_LOGGED_EXAMPLES + 1  # what no writer writes
    logs.client.put_object(Bucket=logs.bucket, Key=key, Body=json.dumps(index).encode())
    assert [entry and entry.request_id for entry, _ in logs.read_batch(key)] == ["call-0", None, "call-2"]
    assert logs.find("call-2", 1)[1] == 2  # its position in the batch, as feedback names it
    listed = run_mnist("logs", "list", "--json")
    assert listed.returncode == 0 and "1 malformed entries skipped" in listed.stderr
    assert [batch["records"] for batch in json.loads(listed.stdout)["batches"]] == [2]
    shown = run_mnist("logs", "show", "call-2")
    assert shown.returncode == 0, shown.stderr
