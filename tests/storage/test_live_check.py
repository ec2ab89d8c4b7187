"""A publish's live check is told apart from served traffic by an id signed with a key only the
pipeline holds, never by a prefix a caller can send: the drift flow's own collection
(``flows.drift.collect_traffic``) over logged calls in a real SeaweedFS bucket, and feedback on a
logged call. Calls are written to the log as the gateway writes them; no model, no training."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from prefect.logging import disable_run_logger

from flows.drift import collect_traffic
from mnist_client.protos import predict_pb2
from mnist_client.tensors import to_tensor_proto
from serving.gateway.log_records import prediction_log
from storage.logs import FeedbackStore, LogEntry, PredictionLogStore
from storage.settings import TrafficSettings

Call = tuple[str, int, int]  # (client request id, version that answered, images)


def logged_record(images: int, seed: int) -> list[bytes]:
    """A Predict call of ``images`` digit-like images and its answer, as the gateway logs it."""
    rng = np.random.default_rng(seed)
    request, response = predict_pb2.PredictRequest(), predict_pb2.PredictResponse()
    request.model_spec.name = "mnist"
    request.inputs["image"].CopyFrom(to_tensor_proto(rng.uniform(0, 1, (images, 28, 28, 1)).astype(np.float32)))
    response.outputs["probabilities"].CopyFrom(to_tensor_proto(rng.dirichlet(np.ones(10), images).astype(np.float32)))
    return prediction_log(b"", request.SerializeToString(), response.SerializeToString())


def log_calls(calls: list[Call], logged_at: datetime | None = None) -> PredictionLogStore:
    """The calls as one log batch, in order, each under its own gateway request id ``call-<n>``."""
    logs = PredictionLogStore(TrafficSettings())
    logs.ensure_bucket()
    stamp = (logged_at or datetime.now(timezone.utc)).isoformat(timespec="milliseconds")
    entries = [LogEntry(f"call-{number}", stamp, version, "", "grpc", images, client)
               for number, (client, version, images) in enumerate(calls)]
    logs.write_batch(entries, [logged_record(images, number) for number, (_, _, images) in enumerate(calls)])
    return logs


def counted(tmp_path: Path) -> dict[int, int]:
    """The images per version the drift flow's collection counts as served traffic in the last hour."""
    with disable_run_logger():
        paths = collect_traffic.fn(1.0, str(tmp_path))
    counts = {}
    for version, path in paths.items():
        with np.load(path) as arrays:
            counts[version] = int(arrays["count"])
    return counts


def signed(version: int, now: float | None = None) -> str:
    """The id a publish's live check of ``version`` sends: signed with the key the store's
    credentials give (``store_env``'s S3 secret key), as ``tasks.publish.live_check`` makes it."""
    from storage.live_check import live_check_key

    key = live_check_key(TrafficSettings())
    assert key is not None and key.source == "the store's S3 secret key"
    return key.request_id(version, now)


def test_an_id_a_caller_chose_with_the_live_check_prefix_is_served_traffic(store_env, tmp_path: Path) -> None:
    """What let 1,000 inverted digits past drift: a caller's own ``x-request-id: live-check-...``."""
    log_calls([("", 1, 3), ("live-check-v1", 1, 5), ("live-check-v1-inverted-digits", 1, 7)])
    assert counted(tmp_path) == {1: 15}


def test_a_signed_live_check_is_left_out_once_and_a_replay_of_its_id_counts(store_env, tmp_path: Path) -> None:
    check = signed(2)
    assert len(check) <= 128 and check.startswith("live-check-v2-")
    log_calls([("", 2, 3), (check, 2, 64), (check, 2, 5), ("", 2, 2), (check, 2, 7)])
    assert counted(tmp_path) == {2: 3 + 5 + 2 + 7}  # the first call with the id only is left out


def test_a_signed_id_for_another_version_counts(store_env, tmp_path: Path) -> None:
    log_calls([(signed(3), 2, 64), (signed(2), 2, 5)])  # v3's id answered by v2 counts; v2's own does not
    assert counted(tmp_path) == {2: 64}


def test_a_forged_or_stale_signature_counts(store_env, tmp_path: Path) -> None:
    from storage.live_check import LiveCheckKey

    genuine = signed(1)
    prefix, _, mac = genuine.rpartition("-")
    forged = f"{prefix}-{secrets.token_hex(16)}"
    flipped = f"{prefix}-{mac[:-1]}{'0' if mac[-1] != '0' else '1'}"
    other_key = LiveCheckKey(secrets.token_bytes(32)).request_id(1)  # signed, but not with this store's key
    stale = signed(1, now=time.time() - 3600)  # made an hour before the call it came with
    log_calls([(forged, 1, 3), (flipped, 1, 5), (other_key, 1, 7), (stale, 1, 11)])
    assert counted(tmp_path) == {1: 3 + 5 + 7 + 11}


def test_feedback_is_refused_only_for_a_signed_live_check(store_env) -> None:
    from storage.feedback import FeedbackError, record_feedback
    from storage.live_check import live_check_key

    logs = log_calls([(signed(1), 1, 64), ("live-check-v1", 1, 1), (signed(2), 1, 1)])
    feedback = FeedbackStore(logs.settings)
    key = live_check_key(TrafficSettings())
    with pytest.raises(FeedbackError, match="publish's live check") as refused:
        record_feedback(logs, feedback, "call-0", 7, live_check_key=key)
    assert refused.value.http_status == 404
    for request_id in ("call-1", "call-2"):  # a caller's prefix; a signed id of a version that did not answer
        assert record_feedback(logs, feedback, request_id, 7, live_check_key=key)["request_id"] == request_id
    assert len(feedback.all()) == 2


def test_an_explicit_key_replaces_the_derived_one_and_is_never_shown(store_env) -> None:
    from storage.live_check import live_check_key

    chosen = "a-live-check-key-of-our-own-7f3e"
    explicit = live_check_key(TrafficSettings(live_check_key=chosen))
    derived = live_check_key(TrafficSettings())
    assert explicit is not None and derived is not None and explicit.source == "MNIST_LIVE_CHECK_KEY"
    entry = LogEntry("call-0", datetime.now(timezone.utc).isoformat(), 4, "", "grpc", 1, explicit.request_id(4))
    assert explicit.marks(entry) and not derived.marks(entry)
    assert chosen not in repr(explicit) and explicit.secret.hex() not in repr(explicit)
    with pytest.raises(ValueError, match="shorter than 16") as short:
        live_check_key(TrafficSettings(live_check_key="too-short"))
    assert "too-short" not in str(short.value)
    late = LogEntry("call-1", (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat(), 4, "", "grpc", 1,
                    explicit.request_id(4))
    assert not explicit.marks(late)  # an id found an hour after it was made is no live check
