"""The serving-truth check: does the server serve what the registry says it should?

TF Serving keeps serving the old version, silently, when a new one fails to load
(tensorflow/serving#1738), and has no call that lists its labels. This compares what the
server reports (``GetModelStatus``; each registry label resolved through ``GetModelMetadata``,
which answers with the version a label points to) with the registry: every label must resolve
to the registry's version, and every version the sync serves (``serving.sync.wanted_versions``: the
labelled ones, or the newest while none is labelled) must be AVAILABLE. A disagreement
counts only once it has lasted ``grace_seconds``: a sync round and a load take time.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from mnist_client.client import ServingError, Target, model_status, open_channel, signature_io
from serving.sync import wanted_versions


def label_version(target: Target, label: str) -> int | str:
    """The version the server serves under ``label``, or why it serves none."""
    with open_channel(target) as channel:
        try:
            return signature_io(channel, replace(target, label=label, version=None))[2]
        except ServingError as error:
            return str(error)


def disagreements(store: Any, target: Target) -> list[str]:
    """What the server and the registry (``store``) disagree on now, one line each."""
    labels, published = store.labels(), store.complete_versions()
    try:
        statuses = dict(model_status(target))
    except ServingError as error:
        return [f"the server at {target.address} does not answer for {target.model_name}: {error}"]
    problems = []
    for version in sorted(wanted_versions(published, labels)):
        if statuses.get(version) == "AVAILABLE":
            continue
        state = statuses.get(version)
        why = (f"is {state}" + (f" ({failed_load(target, version)})" if state == "END" else "") if state
               else "is unknown to the server (not synced yet, or refused by the sync: see its log)")
        named = [label for label, labelled in sorted(labels.items()) if labelled == version]
        role = f"labelled {', '.join(named)}" if named else "the newest published"
        problems.append(f"version {version}, {role}, {why}")
    for label, version in sorted(labels.items()):
        served = label_version(target, label)
        if served != version:
            problems.append(f"label {label}: the registry says version {version}, the server "
                            + (f"serves version {served}" if isinstance(served, int) else f"refuses it ({served})"))
    return problems


def failed_load(target: Target, version: int) -> str:
    """The error GetModelStatus reports for a version that ended, if it failed to load."""
    from mnist_client.protos import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = target.model_name
    request.model_spec.version.value = version
    with open_channel(target) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=target.timeout)
    message = response.model_version_status[0].status.error_message if response.model_version_status else ""
    return f"failed to load: {message}" if message else "unloaded"


def check_serving(store: Any, target: Target, grace_seconds: float, interval: float = 2.0) -> list[str]:
    """The disagreements that lasted ``grace_seconds`` (empty: the server serves the registry's truth)."""
    deadline = time.monotonic() + grace_seconds
    while True:
        problems = disagreements(store, target)
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
