"""The feedback policy's bound on colluding tokens: the per-batch share holds on the batch actually
taken."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tasks.feedback import FeedbackPolicy, decide

START = datetime(2026, 12, 6, tzinfo=timezone.utc)


def vote(request: int, caller: str, label: int = 1, trusted: bool = False) -> dict:
    return {"request_id": f"r{request}", "index": 0, "label": label, "caller": caller, "trusted": trusted,
            "time": (START + timedelta(seconds=request)).isoformat(timespec="milliseconds")}


def test_two_callers_agreeing_on_2400_labels_put_no_backlog_into_one_ingest() -> None:
    """The attack as it was found: two tokens agreeing on 2,400 images put 600 into the first
    ingest (the cap was a quarter of all candidates, held-back ones included). Both rest on every
    label, so the share admits one label a batch."""
    items = [vote(i, caller) for i in range(2400) for caller in ("app-a", "app-b")]
    first = decide(items, FeedbackPolicy())
    assert len(first.accepted) == 1 and len(first.capped) == 2399
