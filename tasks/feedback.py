"""Feedback stage: a correct label for a logged prediction, and accumulated feedback turned into
labelled digits for the normal ingest path (``tasks/ingest.py``), through a policy that trusts no
single caller.

Who labelled what is kept per caller. A trusted caller's label (an operator's, or a token marked
``trusted``) becomes data as it is. Any other label waits in quarantine until ``quorum`` different
callers give the same one, or an operator accepts it (``mnist feedback accept``); even then it only
trains, never lands in a validation or test slice, no one untrusted caller makes up more than
``max_caller_share`` of the agreed labels a batch takes, and budgets over a window (``window_days``)
limit what is admitted per caller (``caller_budget``) and in all (``untrusted_budget``), counted
from what earlier ingests recorded as admitted: waiting does not drain a backlog into training.
What that bounds a set of colluding tokens to is ``SYBIL_BOUND``.

Feedback names a request by the id the gateway returned (and, for a request of several images,
the image's index). It is accepted only for a request that was logged: an id that was not
sampled, not yet uploaded or is unknown gets a clear error, since there is no image to learn from.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from mnist_client.images import InputError
from mnist_client.tensors import TensorError
from storage.feedback import FeedbackError, checked_label
from storage.logs import FeedbackStore, IngestRecord, PredictionLogStore
from storage.s3 import VerificationFailed
from tasks.digits import logged_digits
from tasks.results import FeedbackIngested, PolicySummary
from tasks.screen import Calibration, screen

if TYPE_CHECKING:  # tasks.ingest is read when feedback is ingested, not when it is only sorted
    from storage.datasets import DatasetStore
    from tasks.ingest import Reference

T = TypeVar("T")


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

SYBIL_BOUND = """With quorum q, a per-caller budget B and a total budget G of untrusted labels per
window W, k colluding tokens can place at most min(G, floor(k*B/q)) labels in training per window
(and so in any one retrain that follows the previous one within W; none at all when k < q).

Why the code enforces it: a label the k tokens place without honest help rests on at least q of
them (``agreed_label``); every admitted label counts against every caller it rests on
(``admitted_in_window``); each ingest takes for a caller only what its budget has left after the
W before it, and for all untrusted labels only what G has left (``within_budget_and_share``). So
in any stretch of W no caller rests on more than B admitted labels and no more than G are
admitted: each label the tokens place spends q of the k*B they have between them."""


@dataclass(frozen=True)
class FeedbackPolicy:
    quorum: int = 2  # untrusted callers that must give the same label before it becomes data
    max_caller_share: float = 0.25  # of a batch's agreed labels, what may rest on one untrusted caller
    caller_budget: int = 20  # agreed labels admitted per untrusted caller per window
    untrusted_budget: int = 100  # agreed labels admitted in all per window
    window_days: float = 7.0

    def most_placed(self, colluders: int) -> int:
        """The most labels ``colluders`` tokens can place in training per window (``SYBIL_BOUND``)."""
        return min(self.untrusted_budget, colluders * self.caller_budget // self.quorum)


@dataclass(frozen=True)
class Admitted:
    """Agreed labels earlier ingests admitted within the window: per caller and in all;
    ``unattributed``, labels whose callers a record does not say, count against every caller."""

    callers: dict[str, int] = field(default_factory=dict)
    total: int = 0
    unattributed: int = 0

    def of(self, caller: str) -> int:
        return self.callers.get(caller, 0) + self.unattributed


@dataclass
class FeedbackDecision:
    """Pending feedback sorted: labels that become data now (``basis`` trusted or agreed, with the
    callers it rests on), images still in quarantine with their votes, and agreed labels that stay
    pending, with the ``reason``: held back by the per-batch share (``capped``) or by a window
    budget (``over_budget``)."""

    accepted: list[Item] = field(default_factory=list)
    quarantined: list[Item] = field(default_factory=list)
    capped: list[Item] = field(default_factory=list)
    over_budget: list[Item] = field(default_factory=list)
    overruled: list[Item] = field(default_factory=list)  # other labels of an image a trusted caller labelled

    def summary(self) -> PolicySummary:
        callers: dict[str, int] = defaultdict(int)
        for item in self.accepted:
            for caller in item["callers"]:
                callers[caller] += 1
        return PolicySummary(trusted=sum(item["basis"] == "trusted" for item in self.accepted),
                             agreed=sum(item["basis"] == "agreed" for item in self.accepted),
                             quarantined=len(self.quarantined), capped=len(self.capped),
                             over_budget=len(self.over_budget), callers=dict(callers))


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


def taken_in_order(agreed: list[Item], limit: int, caller_left: Callable[[str], int], most: int) -> list[Item]:
    """Agreed labels in the given order, each taken unless a caller it rests on is at ``limit`` or
    at its budget left; at most ``most``."""
    counts: Counter[str] = Counter()
    taken: list[Item] = []
    for item in agreed:
        if len(taken) >= most:
            break
        if all(counts[caller] < min(limit, caller_left(caller)) for caller in item["callers"]):
            counts.update(item["callers"])
            taken.append(item)
    return taken


def within_budget_and_share(agreed: list[Item], share: float, caller_left: Callable[[str], int],
                            total_left: int) -> list[Item]:
    """The agreed labels (given oldest first) one ingest takes, earliest first: none over a caller's
    budget left (``caller_left``) or the total left, and no caller on more than ``share`` of the
    batch taken.

    The share is of the batch that results, so its size is found, not assumed: take oldest first
    under the cap a batch of ``size`` allows; when fewer than ``size`` fit, the batch is smaller and
    its cap lower, so try again at that size. The size only shrinks; it stops at a batch of exactly
    ``size`` labels, none of whose callers is on more than share_limit(size) of them."""
    size = min(len(agreed), max(0, total_left))
    while True:
        taken = taken_in_order(agreed, share_limit(share, size), caller_left, size)
        if len(taken) == size:
            return taken
        size = len(taken)


def held_reason(item: Item, counts: Counter[str], caller_left: Callable[[str], int], budget_spent: bool,
                policy: FeedbackPolicy) -> tuple[bool, str]:
    """(over a budget, why) for an agreed label the ingest does not take."""
    window = f"{policy.window_days:g} days"
    if budget_spent:
        return True, f"untrusted labels have used their budget of {policy.untrusted_budget} per {window}"
    spent = [caller for caller in item["callers"] if counts[caller] >= caller_left(caller)]
    if spent:
        return True, f"{spent[0]} has used its budget of {policy.caller_budget} labels per {window}"
    return False, f"no caller may rest on more than {policy.max_caller_share:.0%} of a batch's agreed labels"


def decide(items: list[Item], policy: FeedbackPolicy = FeedbackPolicy(),
           admitted: Admitted = Admitted()) -> FeedbackDecision:
    """Which pending labels become data now, which wait in quarantine (see the module's rules);
    ``admitted``: what earlier ingests admitted within the policy's window, which the budgets count."""
    by_image: dict[tuple[str, int], list[Item]] = defaultdict(list)
    for item in items:
        by_image[(item["request_id"], item["index"])].append(item)
    decision, agreed = FeedbackDecision(), []
    for (request_id, index), votes in by_image.items():
        if any(is_trusted(vote) for vote in votes):  # trusted labels: data as they come, outside the budgets
            label, overruled = trusted_label(votes)
            decision.accepted.append(label)
            decision.overruled += overruled
        elif (candidate := agreed_label(votes, policy.quorum)) is not None:
            agreed.append(candidate)
        else:
            decision.quarantined.append(waiting(request_id, index, votes))
    agreed.sort(key=lambda item: item["time"])

    def caller_left(caller: str) -> int:
        return max(0, policy.caller_budget - admitted.of(caller))

    total_left = max(0, policy.untrusted_budget - admitted.total)
    taken = within_budget_and_share(agreed, policy.max_caller_share, caller_left, total_left)
    decision.accepted += taken
    counts = Counter(caller for item in taken for caller in item["callers"])
    chosen = {id(item) for item in taken}
    for item in agreed:
        if id(item) not in chosen:
            over, reason = held_reason(item, counts, caller_left, len(taken) >= total_left, policy)
            (decision.over_budget if over else decision.capped).append({**item, "reason": reason})
    return decision


def admitted_in_window(records: Iterable[IngestRecord], policy: FeedbackPolicy, now: datetime) -> Admitted:
    """What the ``_ingested`` records say earlier ingests admitted of untrusted labels within the
    window before ``now``, read conservatively: a record without a readable time counts as within
    the window, a label of unknown basis as agreed, one without readable callers against every
    caller, and a record that does not read as a whole window's budget spent."""
    since = now - timedelta(days=policy.window_days)
    callers: Counter[str] = Counter()
    total = unattributed = 0
    for record in records:
        if record.time is not None and record.time < since:
            continue
        if record.unreadable is None:
            total += policy.untrusted_budget
            unattributed += policy.caller_budget
            continue
        total += record.unreadable
        unattributed += record.unreadable
        for label in record.labels:
            if label.basis in ("trusted", "overruled", "held"):  # held: it did not train
                continue
            total += 1
            if label.basis == "agreed" and label.callers:
                callers.update(label.callers)
            else:
                unattributed += 1
    return Admitted(dict(callers), total, unattributed)


def pending_feedback(feedback: FeedbackStore, records: list[IngestRecord] | None = None) -> list[Item]:
    """Feedback not yet turned into a batch (a corrected label counts as new); ``records``: the
    ``_ingested`` records, when already read."""
    done = feedback.ingested(records)
    return sorted((item for item in feedback.all()
                   if isinstance(item, dict) and (item.get("request_id"), item.get("index"), item.get("label"))
                   not in done), key=lambda item: (item["time"], item["request_id"], item["index"]))


def pending_decision(feedback: FeedbackStore, policy: FeedbackPolicy = FeedbackPolicy(),
                     now: datetime | None = None) -> FeedbackDecision:
    """What an ingest at ``now`` (UTC) would decide of the pending feedback, budgets counted."""
    records = feedback.ingest_records()
    return decide(pending_feedback(feedback, records), policy,
                  admitted_in_window(records, policy, now or datetime.now(timezone.utc)))


class FeedbackExamples(NamedTuple):
    """The logged images feedback labels, with what could not be used and why."""

    names: list[str]  # feedback:<request id>#<index>
    images: list[np.ndarray]  # float digits [28,28,1]
    labels: list[int]
    used: list[dict[str, Any]]  # the feedback items the images came from
    problems: list[str]  # one line per item left out
    corrected: list[bool]  # per item used: its label differs from what the model answered


def feedback_examples(logs: PredictionLogStore, items: list[dict[str, Any]]) -> FeedbackExamples:
    """The logged image of every feedback item, read once per log batch."""
    by_batch: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        by_batch[str(item.get("log"))].append(item)
    names, images, labels, used, problems, corrected = [], [], [], [], [], []
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
            corrected.append(probabilities is not None and len(probabilities) > index
                             and int(np.argmax(probabilities[index])) != label)
            names.append(f"feedback:{item['request_id']}#{index}")
            images.append(digits[index])
            labels.append(label)
            used.append(item)
    return FeedbackExamples(names, images, labels, used, problems, corrected)


def kept_within_share(items: list[Item], share: float) -> list[bool]:
    """Which of the labels about to be ingested stay, so that the share holds on the agreed ones
    actually ingested after others were left out on the way (an unreadable log, a screen); every
    trusted one stays. Nothing is left out when nothing was: ``decide`` took a batch the share allows."""
    agreed = sorted((item for item in items if item["basis"] == "agreed"), key=lambda item: item["time"])
    kept = {id(item) for item in within_budget_and_share(agreed, share, lambda _: len(agreed), len(agreed))}
    return [item["basis"] != "agreed" or id(item) in kept for item in items]


def only(column: list[T], keep: list[bool]) -> list[T]:
    return [value for value, kept in zip(column, keep) if kept]


def screened_out(datasets: Any, names: list[str], images: list[np.ndarray], labels: list[int],
                 used: list[Item], calibrations: list[Calibration], source: str) -> tuple[list[bool], list[Item]]:
    """The screen (tasks/screen.py) on every label sent through the gateway, trusted token or not:
    agreement among callers never admits a label the trusted models contradict. What it flags is
    held in the data quarantine with its reason and callers (``mnist data quarantine``; accepted or
    rejected there per example, source or caller). Returns which items stay, and the held ones."""
    from tasks.ingest import Candidates, hold, to_uint8

    screened = [i for i, item in enumerate(used) if item.get("source") == "gateway"]
    if not screened:
        return [True] * len(used), []
    found = Candidates([names[i] for i in screened], [to_uint8(images[i]) for i in screened],
                       [labels[i] for i in screened])
    verdict = screen(np.stack(found.images), np.array(found.labels), calibrations)
    waiting = verdict.waiting.tolist()
    if not waiting:
        return [True] * len(used), []
    held_items = [used[screened[i]] for i in waiting]
    hold(datasets, found, np.stack(found.images), verdict, source,
         {"origin": "feedback on logged predictions", "callers": [list(item["callers"]) for item in held_items]})
    held_positions = {screened[i] for i in waiting}
    return [i not in held_positions for i in range(len(used))], [{**item, "basis": "held"} for item in held_items]


def ingest_feedback(datasets: DatasetStore, logs: PredictionLogStore, feedback: FeedbackStore, reference: Reference,
                    source: str = "feedback", policy: FeedbackPolicy = FeedbackPolicy(),
                    now: datetime | None = None, screen_with: list[Calibration] | None = None
                    ) -> FeedbackIngested | None:
    """The labels the policy accepts at ``now`` (UTC), screened (``screen_with``: the trusted
    models), as one batch through the normal ingest (validation, split; exact repeats left out,
    not refused), then marked as ingested; the rest stays pending. None when nothing is accepted;
    the result's ``batch`` is None when every image was a known one. Only what is ingested is
    recorded as admitted: the budgets count what trained."""
    from tasks.ingest import Candidates, ingest_candidates, to_uint8

    now = now or datetime.now(timezone.utc)
    records = feedback.ingest_records()
    pending = pending_feedback(feedback, records)
    if not pending:
        return None
    decision = decide(pending, policy, admitted_in_window(records, policy, now))
    if not decision.accepted:
        return FeedbackIngested(ingested=None, feedback_items=0, corrections=0, problems=[],
                                policy=decision.summary())
    names, images, labels, used, problems, corrected = feedback_examples(logs, decision.accepted)
    held: list[Item] = []
    if screen_with is not None and used:
        stays, held = screened_out(datasets, names, images, labels, used, screen_with, source)
        for item in only(used, [not kept for kept in stays]):
            decision.accepted.remove(item)
        names, images, labels, used, corrected = (only(names, stays), only(images, stays), only(labels, stays),
                                                  only(used, stays), only(corrected, stays))
    # Whatever leaves images out after decide() (unreadable logs above, the screen's holds) goes
    # before this line: the share is checked on what remains.
    keep = kept_within_share(used, policy.max_caller_share)
    for item in only(used, [not kept for kept in keep]):
        decision.accepted.remove(item)
        decision.capped.append({**item, "reason": "over its callers' share of the batch once others were left out"})
    names, images, labels, used, corrected = (only(names, keep), only(images, keep), only(labels, keep),
                                              only(used, keep), only(corrected, keep))
    found = Candidates(names, [to_uint8(image) for image in images], labels,
                       train_only={name for name, item in zip(names, used) if item["basis"] != "trusted"})
    summary = decision.summary()
    details = {"origin": f"feedback on logged predictions ({logs.uri()})",
               "feedback": {"items": len(used), "corrections": sum(corrected), **summary.model_dump()}}
    result = ingest_candidates(datasets, found, source, reference, details, skip_duplicates=True) if used else None
    feedback.mark_ingested(used + decision.overruled + held, result.batch["sha256"] if result else None, now)
    return FeedbackIngested(ingested=result, feedback_items=len(used), corrections=sum(corrected),
                            problems=problems, policy=summary.model_copy(update={"screened_out": len(held)}))
