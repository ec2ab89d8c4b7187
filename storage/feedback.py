"""Feedback records: the correct label of one image of a logged request, checked and stored.

The gateway's feedback route and ``mnist feedback`` both record through here; turning
accumulated feedback into training data is the feedback stage's (``tasks/feedback.py``).
"""

from __future__ import annotations

from typing import Any, Callable

from storage.errors import MnistError
from storage.live_check import LiveCheckKey
from storage.logs import (
    MAX_FEEDBACK_INDEX,
    FeedbackStore,
    LogEntry,
    LogNotFound,
    PredictionLogStore,
    valid_request_id,
)
from storage.s3 import utc_now

FEEDBACK_HOURS = 30 * 24  # how far back a request id is looked up
Located = tuple[str, int, LogEntry]  # (index key of the log batch, position in it, its entry)


class FeedbackError(MnistError, ValueError):
    """Feedback refused, with the HTTP status it maps to (400 bad input, 404 no such logged request)."""

    status = "INVALID_ARGUMENT"

    def __init__(self, message: str, http: int = 400):
        super().__init__(message, status="NOT_FOUND" if http == 404 else None, http=http)


DIGITS = "0123456789"


def shown(value: Any) -> str:
    """A caller's value in an error: its type for anything but a short string or a small int."""
    if isinstance(value, str):
        return repr(value[:20] + ("..." if len(value) > 20 else ""))
    if type(value) is int and -10**6 < value < 10**6:
        return str(value)
    return f"a {type(value).__name__}"


def checked_label(value: Any) -> int:
    """0-9 as an int or a one-character string of an ASCII digit; anything else is refused (a
    superscript '²' is a digit to str.isdigit, and a 5,000-digit int cannot even be printed)."""
    if type(value) is int and 0 <= value <= 9:
        return value
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip() in DIGITS:
        return int(value.strip())
    raise FeedbackError(f"label {shown(value)} is not a digit 0-9")


def checked_index(value: Any) -> int:
    if type(value) is not int or not 0 <= value < MAX_FEEDBACK_INDEX:
        raise FeedbackError(f"index {shown(value)}: the image's position in its request, "
                            f"an integer 0-{MAX_FEEDBACK_INDEX - 1}")
    return value


def record_feedback(logs: PredictionLogStore, feedback: FeedbackStore, request_id: str, label: Any, index: Any = 0,
                    source: str = "api", locate: Callable[[str], Located | None] | None = None,
                    caller: str = "operator", trusted: bool = True, *,
                    live_check_key: LiveCheckKey | None) -> dict[str, Any]:
    """Store ``caller``'s label for image ``index`` of a logged request (that caller's latest label
    wins). ``trusted``: whether the label becomes data as it is, or waits in quarantine
    (``tasks/feedback.py``). The CLI writes with the store's own credentials: an operator, trusted.
    A publish's live check (its golden digits are MNIST test digits) takes no feedback, as
    ``live_check_key`` tells it (``storage/live_check.py``); an id that only looks like one is
    traffic as any other. With no key, no request is a live check."""
    if not isinstance(request_id, str) or not valid_request_id(request_id):
        raise FeedbackError(f"request id {shown(request_id)}: 1-128 of A-Z a-z 0-9 . _ : -")
    digit, position_in_request = checked_label(label), checked_index(index)
    try:
        key, position, entry = (locate and locate(request_id)) or logs.find(request_id, FEEDBACK_HOURS)
    except LogNotFound as error:
        raise FeedbackError(str(error), http=404) from None
    if live_check_key is not None and live_check_key.marks(entry):
        raise FeedbackError(f"request {request_id} was a publish's live check, not served traffic", http=404)
    if position_in_request >= entry.examples:
        raise FeedbackError(f"request {request_id} has {entry.examples} image(s); index {position_in_request} "
                            "is out of range")
    item = {"request_id": request_id, "index": position_in_request, "label": digit, "version": entry.version,
            "log": key, "position": position, "source": source, "time": utc_now(), "caller": caller,
            "trusted": trusted}
    feedback.put(item)
    return item
