"""Feedback stage: a correct label for a logged prediction, and accumulated feedback turned into
labelled digits for the normal ingest path (``tasks/ingest.py``).

Feedback names a request by the id the gateway returned (and, for a request of several images,
the image's index). It is accepted only for a request that was logged: an id that was not
sampled, not yet uploaded or is unknown gets a clear error, since there is no image to learn from.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client._generated.tensorflow_serving.apis import prediction_log_pb2
from mnist_client.images import InputError, as_digit_batch
from mnist_client.tensors import TensorError, from_tensor_proto
from storage.feedback import FeedbackError, checked_label
from storage.logs import FeedbackStore, PredictionLogStore
from storage.s3 import VerificationFailed


def read_feedback_csv(path: Path) -> list[tuple[str, str, int]]:
    """``request_id,label[,index]`` rows (a header row is allowed): (request id, label, index)."""
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as error:
        raise FeedbackError(f"{path}: not a readable CSV ({error})") from None
    if rows and rows[0][0].strip().lower() == "request_id":
        rows = rows[1:]
    parsed = []
    for number, row in enumerate(rows, start=1):
        if len(row) not in (2, 3):
            raise FeedbackError(f"{path}:{number}: expected 'request_id,label[,index]', got {row}")
        index = row[2].strip() if len(row) == 3 else "0"
        if not index.isdigit():
            raise FeedbackError(f"{path}:{number}: index {index!r} is not a non-negative integer")
        parsed.append((row[0].strip(), row[1].strip(), int(index)))
    return parsed


# --- accumulated feedback -> labelled digits --------------------------------------------
def pending_feedback(feedback: FeedbackStore) -> list[dict[str, Any]]:
    """Feedback not yet turned into a batch (a corrected label counts as new)."""
    done = feedback.ingested()
    return sorted((item for item in feedback.all()
                   if isinstance(item, dict) and (item.get("request_id"), item.get("index"), item.get("label"))
                   not in done), key=lambda item: (item["time"], item["request_id"], item["index"]))


def logged_digits(record: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """The request's images (float [N,28,28,1]) and, when logged, the answered probabilities [N,10]."""
    log = prediction_log_pb2.PredictionLog.FromString(record)
    inputs = list(log.predict_log.request.inputs.values())
    if len(inputs) != 1:
        raise InputError(f"the logged request has {len(inputs)} inputs, expected one image tensor")
    images = as_digit_batch(from_tensor_proto(inputs[0]), "logged request")
    outputs = list(log.predict_log.response.outputs.values())
    return images, (from_tensor_proto(outputs[0]) if len(outputs) == 1 else None)


def feedback_examples(logs: PredictionLogStore, items: list[dict[str, Any]]
                      ) -> tuple[list[str], list[np.ndarray], list[int], list[dict[str, Any]], list[str], int]:
    """(names, float digits [28,28,1], labels, the feedback used, problems, corrections): the logged
    image of every feedback item, read once per log batch. ``corrections`` counts labels that differ
    from what the model answered."""
    by_batch: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        by_batch[str(item.get("log"))].append(item)
    names, images, labels, used, problems, corrections = [], [], [], [], [], 0
    for key, batch_items in sorted(by_batch.items()):
        try:
            records = logs.read_batch(key)
        except VerificationFailed as error:
            problems.append(f"{len(batch_items)} feedback item(s) skipped: {error}")
            continue
        for item in batch_items:
            position, index = item.get("position"), item.get("index")
            if type(position) is not int or not 0 <= position < len(records) or type(index) is not int \
                    or records[position][0].request_id != item.get("request_id"):
                problems.append(f"feedback on {str(item.get('request_id'))[:64]} does not match its log record")
                continue
            try:
                digits, probabilities = logged_digits(records[position][1])
            except (InputError, TensorError, ValueError) as error:
                problems.append(f"request {item['request_id']}: {error}")
                continue
            if index >= len(digits):
                problems.append(f"request {item['request_id']}: no image {index}")
                continue
            label = checked_label(item.get("label"))
            if probabilities is not None and len(probabilities) > index:
                corrections += int(int(np.argmax(probabilities[index])) != label)
            names.append(f"feedback:{item['request_id']}#{index}")
            images.append(digits[index])
            labels.append(label)
            used.append(item)
    return names, images, labels, used, problems, corrections


def ingest_feedback(datasets: Any, logs: PredictionLogStore, feedback: FeedbackStore, reference: Any,
                    source: str = "feedback") -> dict[str, Any] | None:
    """Pending feedback as one batch through the normal ingest (validation, split; exact repeats
    left out, not refused), then marked as ingested. None when there is no new feedback; the
    result's ``batch`` is None when every image was a known one."""
    from tasks.ingest import Candidates, ingest_candidates, to_uint8

    items = pending_feedback(feedback)
    if not items:
        return None
    names, images, labels, used, problems, corrections = feedback_examples(logs, items)
    found = Candidates(names, [to_uint8(image) for image in images], labels)
    details = {"origin": f"feedback on logged predictions ({logs.uri()})",
               "feedback": {"items": len(used), "corrections": corrections}}
    result = ingest_candidates(datasets, found, source, reference, details, skip_duplicates=True)
    feedback.mark_ingested(used, result["batch"]["sha256"] if result["batch"] else None)
    return {**result, "feedback_items": len(used), "corrections": corrections, "problems": problems}
