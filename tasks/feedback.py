"""Feedback stage: a correct label for a logged prediction, and accumulated feedback turned into
labelled digits for the normal ingest path (``tasks/ingest.py``), through a policy that trusts no
single caller.

Who labelled what is kept per caller. A trusted caller's label (an operator's, or a token marked
``trusted``) becomes data as it is. Any other label waits in quarantine until ``quorum`` different
callers give the same one, or an operator accepts it (``mnist feedback accept``); even then it only
trains, never lands in a validation or test slice, and no one untrusted caller makes up more than
``max_caller_share`` of the agreed labels a batch takes.

Feedback names a request by the id the gateway returned (and, for a request of several images,
the image's index). It is accepted only for a request that was logged: an id that was not
sampled, not yet uploaded or is unknown gets a clear error, since there is no image to learn from.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client._generated.tensorflow_serving.apis import prediction_log_pb2
from mnist_client.images import InputError, as_digit_batch
from mnist_client.tensors import TensorError, from_tensor_proto
from storage.feedback import FeedbackError, checked_label
from storage.logs import FeedbackStore, PredictionLogStore
from storage.s3 import VerificationFailed
from tasks.results import FeedbackIngested, PolicySummary


def read_feedback_csv(path: Path) -> list[tuple[str, str, int]]:
    """``request_id,label[,index]`` rows (a header row is allowed): (request id, label, index)."""
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__  # never the file's own bytes
        raise FeedbackError(f"{path}: not a readable CSV ({reason})") from None
    if rows and rows[0][0].strip().lower() == "request_id":
        rows = rows[1:]
    if not rows:
        raise FeedbackError(f"{path}: no rows of request_id,label[,index]")
    parsed = []
    for number, row in enumerate(rows, start=1):
        if len(row) not in (2, 3):
            raise FeedbackError(f"{path}:{number}: expected 'request_id,label[,index]', got {len(row)} columns")
        index = row[2].strip() if len(row) == 3 else "0"
        if not (index.isascii() and index.isdigit() and len(index) <= 6):
            raise FeedbackError(f"{path}:{number}: index is not a non-negative integer")
        parsed.append((row[0].strip(), row[1].strip(), int(index)))
    return parsed


# --- accumulated feedback -> labelled digits --------------------------------------------
Item = dict[str, Any]


@dataclass(frozen=True)
class FeedbackPolicy:
    quorum: int = 2  # untrusted callers that must give the same label before it becomes data
    max_caller_share: float = 0.25  # of a batch's agreed labels, what may rest on one untrusted caller


@dataclass
class FeedbackDecision:
    """Pending feedback sorted: labels that become data now (``basis`` trusted or agreed, with the
    callers it rests on), images still in quarantine with their votes, and agreed labels held back
    by the per-caller cap (they stay pending)."""

    accepted: list[Item] = field(default_factory=list)
    quarantined: list[Item] = field(default_factory=list)
    capped: list[Item] = field(default_factory=list)
    overruled: list[Item] = field(default_factory=list)  # other labels of an image a trusted caller labelled

    def summary(self) -> PolicySummary:
        callers: dict[str, int] = defaultdict(int)
        for item in self.accepted:
            for caller in item["callers"]:
                callers[caller] += 1
        return PolicySummary(trusted=sum(item["basis"] == "trusted" for item in self.accepted),
                             agreed=sum(item["basis"] == "agreed" for item in self.accepted),
                             quarantined=len(self.quarantined), capped=len(self.capped), callers=dict(callers))


def is_trusted(item: Item) -> bool:
    """Feedback written before callers were named: the gateway's was anyone's, the CLI's an operator's."""
    if "trusted" in item:
        return item["trusted"] is True
    return item.get("source") != "gateway"


def caller_of(item: Item) -> str:
    return str(item.get("caller") or ("gateway" if item.get("source") == "gateway" else "operator"))


def trusted_label(votes: list[Item]) -> tuple[Item, list[Item]]:
    """The latest trusted label of an image, and the other labels it overrules."""
    latest = max((vote for vote in votes if is_trusted(vote)), key=lambda vote: vote["time"])
    overruled = [{**vote, "basis": "overruled", "callers": [caller_of(vote)]}
                 for vote in votes if vote["label"] != latest["label"]]
    return {**latest, "basis": "trusted", "callers": [caller_of(latest)]}, overruled


def agreed_label(votes: list[Item], quorum: int) -> Item | None:
    """The label at least ``quorum`` untrusted callers gave and more than gave any other, or None."""
    callers_by_label: dict[int, set[str]] = defaultdict(set)
    for vote in votes:
        callers_by_label[vote["label"]].add(caller_of(vote))
    ranked = sorted(callers_by_label.items(), key=lambda pair: -len(pair[1]))
    label, callers = ranked[0]
    if len(callers) < quorum or (len(ranked) > 1 and len(ranked[1][1]) == len(callers)):
        return None
    first = min((vote for vote in votes if vote["label"] == label), key=lambda vote: vote["time"])
    return {**first, "basis": "agreed", "callers": sorted(callers)}


def waiting(request_id: str, index: int, votes: list[Item]) -> Item:
    """An image in quarantine: its votes by label, and when the first came."""
    callers_by_label: dict[int, set[str]] = defaultdict(set)
    for vote in votes:
        callers_by_label[vote["label"]].add(caller_of(vote))
    return {"request_id": request_id, "index": index,
            "votes": {str(k): sorted(v) for k, v in sorted(callers_by_label.items())},
            "first": min(vote["time"] for vote in votes)}


def share_limit(share: float, batch: int) -> int:
    """The most labels one caller may rest on in a batch of ``batch`` agreed labels: rounded down,
    at least 1 (a batch of one label rests wholly on its callers)."""
    return max(1, int(share * batch))


def taken_in_order(agreed: list[Item], limit: int, most: int) -> list[Item]:
    """Agreed labels in the given order, each taken unless a caller it rests on is at ``limit``;
    at most ``most``."""
    counts: Counter[str] = Counter()
    taken: list[Item] = []
    for item in agreed:
        if len(taken) >= most:
            break
        if all(counts[caller] < limit for caller in item["callers"]):
            counts.update(item["callers"])
            taken.append(item)
    return taken


def within_share(agreed: list[Item], share: float) -> list[Item]:
    """The agreed labels (given oldest first) one ingest takes, earliest first, with no caller on
    more than ``share`` of the batch taken.

    The share is of the batch that results, so its size is found, not assumed: take oldest first
    under the cap a batch of ``size`` allows; when fewer than ``size`` fit, the batch is smaller and
    its cap lower, so try again at that size. The size only shrinks; it stops at a batch of exactly
    ``size`` labels, none of whose callers is on more than share_limit(size) of them."""
    size = len(agreed)
    while True:
        taken = taken_in_order(agreed, share_limit(share, size), size)
        if len(taken) == size:
            return taken
        size = len(taken)


def decide(items: list[Item], policy: FeedbackPolicy = FeedbackPolicy()) -> FeedbackDecision:
    """Which pending labels become data now, which wait in quarantine (see the module's rules)."""
    by_image: dict[tuple[str, int], list[Item]] = defaultdict(list)
    for item in items:
        by_image[(item["request_id"], item["index"])].append(item)
    decision, agreed = FeedbackDecision(), []
    for (request_id, index), votes in by_image.items():
        if any(is_trusted(vote) for vote in votes):  # trusted labels: data as they come
            label, overruled = trusted_label(votes)
            decision.accepted.append(label)
            decision.overruled += overruled
        elif (candidate := agreed_label(votes, policy.quorum)) is not None:
            agreed.append(candidate)
        else:
            decision.quarantined.append(waiting(request_id, index, votes))
    agreed.sort(key=lambda item: item["time"])
    taken = within_share(agreed, policy.max_caller_share)
    decision.accepted += taken
    chosen = {id(item) for item in taken}
    decision.capped += [item for item in agreed if id(item) not in chosen]
    return decision


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
            position, index = item.get("position"), item.get("index")  # read back from the bucket: checked
            record = (records[position] if isinstance(position, int) and not isinstance(position, bool)
                      and 0 <= position < len(records) else None)
            if record is None or record[0] is None or type(index) is not int or index < 0 \
                    or record[0].request_id != item.get("request_id"):
                problems.append(f"feedback on {str(item.get('request_id'))[:64]} does not match its log record")
                continue
            try:
                digits, probabilities = logged_digits(record[1])
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
                    source: str = "feedback", policy: FeedbackPolicy = FeedbackPolicy()) -> FeedbackIngested | None:
    """The labels the policy accepts, as one batch through the normal ingest (validation, split;
    exact repeats left out, not refused), then marked as ingested; the rest stays pending. None
    when nothing is accepted; the result's ``batch`` is None when every image was a known one."""
    from tasks.ingest import Candidates, ingest_candidates, to_uint8

    pending = pending_feedback(feedback)
    if not pending:
        return None
    decision = decide(pending, policy)
    if not decision.accepted:
        return FeedbackIngested(ingested=None, feedback_items=0, corrections=0, problems=[],
                                policy=decision.summary())
    names, images, labels, used, problems, corrections = feedback_examples(logs, decision.accepted)
    found = Candidates(names, [to_uint8(image) for image in images], labels,
                       train_only={name for name, item in zip(names, used) if item["basis"] != "trusted"})
    details = {"origin": f"feedback on logged predictions ({logs.uri()})",
               "feedback": {"items": len(used), "corrections": corrections, **decision.summary().model_dump()}}
    result = ingest_candidates(datasets, found, source, reference, details, skip_duplicates=True)
    feedback.mark_ingested(used + decision.overruled, result.batch["sha256"] if result else None)
    return FeedbackIngested(ingested=result, feedback_items=len(used), corrections=corrections, problems=problems,
                            policy=decision.summary())
