"""The feedback policy's bound on colluding tokens: the per-batch share holds on the batch actually
taken, budgets per caller and in all over a window count what earlier ingests admitted, trusted
labels are outside them. Pure ``decide()`` logic, then the same through a real SeaweedFS store."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from storage.logs import IngestRecord, ingest_record
from tasks.feedback import (
    SYBIL_BOUND,
    Admitted,
    FeedbackDecision,
    FeedbackPolicy,
    admitted_in_window,
    decide,
    kept_within_share,
)

START = datetime(2026, 12, 6, tzinfo=timezone.utc)
REPO = Path(__file__).resolve().parents[2]


def vote(request: int, caller: str, label: int = 1, trusted: bool = False) -> dict:
    return {"request_id": f"r{request}", "index": 0, "label": label, "caller": caller, "trusted": trusted,
            "time": (START + timedelta(seconds=request)).isoformat(timespec="milliseconds")}


def key(item: dict) -> tuple[str, int, int]:
    return item["request_id"], item["index"], item["label"]


def agreed(decision: FeedbackDecision) -> list[dict]:
    return [item for item in decision.accepted if item["basis"] == "agreed"]


def ingest(pending: list[dict], policy: FeedbackPolicy, records: list[IngestRecord], now: datetime
           ) -> FeedbackDecision:
    """One ingest as ``ingest_feedback`` makes it, less the images: decide with the window's
    admissions, then record what was taken as ``mark_ingested`` writes it and reads it back."""
    decision = decide(pending, policy, admitted_in_window(records, policy, now))
    records.append(IngestRecord.checked(json.loads(json.dumps(
        ingest_record(decision.accepted + decision.overruled, None, now)))))
    return decision


def test_two_callers_agreeing_on_2400_labels_put_no_backlog_into_one_ingest() -> None:
    """The attack as it was found: two tokens agreeing on 2,400 images put 600 into the first
    ingest (the cap was a quarter of all candidates, held-back ones included). Both rest on every
    label, so the share admits one label a batch, and their budgets 20 a window between them."""
    items = [vote(i, caller) for i in range(2400) for caller in ("app-a", "app-b")]
    policy = FeedbackPolicy()
    first = decide(items, policy)
    assert len(first.accepted) == 1 and len(first.capped) == 2399
    unshared = decide(items, FeedbackPolicy(max_caller_share=1.0))
    assert len(unshared.accepted) == policy.most_placed(2) == 20
    assert len(unshared.over_budget) == 2380 and "budget of 20" in unshared.over_budget[0]["reason"]


def test_agreeing_pairs_drain_no_more_than_the_bound_over_a_window_of_ingests() -> None:
    """8 tokens in 4 agreeing pairs once had 200 of 200 labels admitted in one ingest, and 2 tokens
    25, 18, then 14 an ingest. Now 2 tokens get one label a batch (both rest on each), 4 pairs a
    quarter of a batch each, and however often the ingest runs within the window they place
    min(G, floor(k*B/q)) in all: what left the window comes back, no more."""
    for pairs in (1, 4):
        tokens = [f"app-{i}" for i in range(2 * pairs)]
        items = [vote(i, caller) for i in range(200) for caller in tokens[2 * (i % pairs):2 * (i % pairs) + 2]]
        policy, records, done, taken, first = FeedbackPolicy(), [], set(), [], 0
        for hour in range(100):  # an ingest an hour for 100 hours: all within 7 days
            decision = ingest([v for v in items if key(v) not in done], policy, records,
                              START + timedelta(hours=hour))
            batch = Counter(c for item in agreed(decision) for c in item["callers"])
            assert max(batch.values(), default=0) <= max(1, len(agreed(decision)) // 4)
            done |= {key(item) for item in decision.accepted}
            taken += agreed(decision)
            first = first or len(agreed(decision))
        assert first == {1: 1, 4: 80}[pairs]
        assert len(taken) == policy.most_placed(2 * pairs) == {1: 20, 4: 80}[pairs]
        assert max(Counter(c for item in taken for c in item["callers"]).values()) == policy.caller_budget
        later = ingest([v for v in items if key(v) not in done], policy, records, START + timedelta(days=7, hours=1))
        assert len(agreed(later)) == first  # a week after the first ingest, what it took is back in the budget


def test_the_share_holds_on_what_is_ingested_after_some_were_left_out() -> None:
    """Four pairs two labels each: each caller on a quarter of the 8. Leave one out after decide()
    (its log does not read, a screen sends it back) and two callers are on 2 of 7: the batch is cut
    again to what the share allows of what is left; a trusted label stays regardless."""
    items = [vote(i, caller) for i in range(8) for caller in (f"app-{2 * (i % 4)}", f"app-{2 * (i % 4) + 1}")]
    decision = decide(items + [vote(9, "operator", trusted=True)])
    assert len(agreed(decision)) == 8
    left = [item for item in decision.accepted if item["request_id"] != "r7"]
    keep = kept_within_share(left, FeedbackPolicy().max_caller_share)
    assert [item["request_id"] for item, kept in zip(left, keep) if kept] == ["r9", "r0", "r1", "r2", "r3"]
    assert kept_within_share(decision.accepted, 0.25) == [True] * 9  # nothing left out: nothing cut


def test_trusted_labels_are_admitted_past_spent_budgets() -> None:
    spent = Admitted({"app-a": 20, "app-b": 20}, total=100)
    items = [vote(1, "app-a"), vote(1, "app-b"), vote(2, "operator", 4, trusted=True), vote(2, "app-a", 5)]
    decision = decide(items, FeedbackPolicy(), spent)
    assert [(item["request_id"], item["basis"], item["label"]) for item in decision.accepted] == [("r2", "trusted", 4)]
    assert [item["request_id"] for item in decision.over_budget] == ["r1"]
    assert "untrusted labels have used their budget of 100" in decision.over_budget[0]["reason"]


def test_the_bound_is_the_one_the_docs_state() -> None:
    policy = FeedbackPolicy()
    assert [policy.most_placed(k) for k in range(1, 9)] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert FeedbackPolicy(quorum=3, caller_budget=7, untrusted_budget=12).most_placed(4) == 9
    assert FeedbackPolicy(quorum=3, caller_budget=7, untrusted_budget=8).most_placed(4) == 8
    assert "min(G, floor(k*B/q))" in SYBIL_BOUND
    assert "min(G, floor(k*B/q))" in (REPO / "docs" / "feedback-loop.md").read_text()


def test_records_are_read_conservatively() -> None:
    """What ``_ingested`` records say is the bucket's, which others can write: a record from before
    bases were kept, an entry without readable callers, one that does not read at all, count
    against the budgets rather than crash the ingest or lift them; a record that does not read
    spends the window's budget; what is older than the window counts no more."""
    policy, now = FeedbackPolicy(), START + timedelta(days=3)
    good = {"request_id": "r1", "index": 0, "label": 3, "basis": "agreed", "callers": ["app-a", "app-b"]}
    raw = [{"time": (START - timedelta(days=30)).isoformat(), "feedback": [good] * 50},  # outside the window
           {"time": START.isoformat(), "feedback": [good, {**good, "basis": "trusted", "callers": ["operator"]},
                                                   {**good, "basis": "overruled", "callers": ["app-c"]}]},
           {"time": "2026-12-07T00:00:00", "feedback": [{"request_id": "r2", "index": 0, "label": 1}]},  # no basis
           {"time": 12, "feedback": [{**good, "callers": "app-a"}, {"request_id": 5}, "x"]}]  # no time: now
    admitted = admitted_in_window([IngestRecord.checked(record) for record in raw], policy, now)
    assert admitted == Admitted({"app-a": 1, "app-b": 1}, total=5, unattributed=4)
    assert admitted.of("app-c") == 4
    unreadable = admitted_in_window([IngestRecord.checked("not a record")], policy, now)
    assert unreadable.total >= policy.untrusted_budget and unreadable.of("anyone") >= policy.caller_budget


# --- the property -----------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    policy: FeedbackPolicy
    colluders: int
    honest: int
    votes: int
    prior: int
    ingests: int
    seed: int


policies = st.one_of(st.just(FeedbackPolicy()), st.builds(
    FeedbackPolicy, quorum=st.integers(1, 3), max_caller_share=st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 1.0]),
    caller_budget=st.integers(1, 30), untrusted_budget=st.integers(1, 150)))
scenarios = st.builds(Scenario, policies, st.integers(1, 12), st.integers(0, 5), st.integers(0, 3000),
                      st.integers(0, 150), st.integers(1, 6), st.integers(0, 2**32 - 1))


def backlog(scenario: Scenario, colluders: list[str], honest: list[str], rng: random.Random) -> list[dict]:
    """Votes on images, each with the ingest it arrives before: the colluders (some of them)
    agreeing on their label, honest callers mostly right, anyone on anything, trusted labels."""
    votes: list[dict] = []
    image = 0
    while len(votes) < scenario.votes:
        image, truth, kind = image + 1, rng.randrange(10), rng.random()
        if kind < 0.5:
            ballot = {caller: (truth + 1) % 10 for caller in rng.sample(colluders, rng.randint(1, len(colluders)))}
            if honest and rng.random() < 0.2:
                ballot[rng.choice(honest)] = truth
        elif kind < 0.8 and honest:
            ballot = {caller: truth if rng.random() < 0.9 else rng.randrange(10)
                      for caller in rng.sample(honest, rng.randint(1, len(honest)))}
        elif kind < 0.9:
            everyone = colluders + honest
            ballot = {caller: rng.randrange(10) for caller in rng.sample(everyone, rng.randint(1, len(everyone)))}
        else:
            ballot = {"operator": truth, **{caller: rng.randrange(10) for caller in rng.sample(colluders, 1)}}
            if rng.random() < 0.3:
                ballot["lab"] = rng.randrange(10)
        for caller, label in ballot.items():
            votes.append({"request_id": f"r{image // 3}", "index": image % 3, "label": label, "caller": caller,
                          "trusted": caller in ("operator", "lab"), "arrival": rng.randrange(scenario.ingests),
                          "time": (START - timedelta(seconds=rng.randrange(86400), microseconds=len(votes))
                                   ).isoformat(timespec="microseconds")})  # distinct: the latest trusted is one
    return votes[:scenario.votes]


def prior_records(scenario: Scenario, untrusted: list[str], rng: random.Random, start: datetime, window: timedelta
                  ) -> tuple[list[IngestRecord], list[list[str]]]:
    """Earlier ingests' records: some in the stretch of one window the test's ingests end in,
    admitted within the budgets as they were, and older ones past any budget, which must not count."""
    policy, counts, in_window = scenario.policy, Counter[str](), []
    records = []
    for number in range(scenario.prior):
        callers = rng.sample(untrusted, min(len(untrusted), rng.randint(max(policy.quorum, 1), policy.quorum + 2)))
        item = {"request_id": f"old{number}", "index": 0, "label": 1, "basis": "agreed", "callers": callers}
        old = rng.random() < 0.3
        if not old and (len(in_window) >= policy.untrusted_budget
                        or any(counts[c] >= policy.caller_budget for c in callers)):
            continue
        if not old:
            counts.update(callers)
            in_window.append(callers)
        when = start - (2 * window if old else rng.random() * window / 2)
        records.append(IngestRecord.checked(json.loads(json.dumps(ingest_record([item], None, when)))))
    return records, in_window


def check_batch(decision: FeedbackDecision, pending: list[dict], policy: FeedbackPolicy, admitted: Admitted) -> None:
    taken = agreed(decision)
    counts = Counter(caller for item in taken for caller in item["callers"])
    if taken:  # the share, of the agreed labels this batch takes
        assert max(counts.values()) <= max(1, math.floor(policy.max_caller_share * len(taken)))
    trusted = {(v["request_id"], v["index"]): v for v in sorted(pending, key=lambda v: v["time"]) if v["trusted"]}
    accepted = {(item["request_id"], item["index"]): item for item in decision.accepted}
    for image, latest in trusted.items():  # trusted labels: always, as the latest trusted caller gave them
        assert accepted[image]["basis"] == "trusted" and accepted[image]["label"] == latest["label"]
    images = [(item["request_id"], item["index"]) for part in
              (decision.accepted, decision.quarantined, decision.capped, decision.over_budget) for item in part]
    assert sorted(images) == sorted({(v["request_id"], v["index"]) for v in pending})  # each image once
    assert not decision.capped or taken  # the share alone never leaves a batch empty
    for item in decision.over_budget:  # held by a budget only when one is spent
        assert admitted.total + len(taken) >= policy.untrusted_budget or any(
            admitted.of(c) + counts[c] >= policy.caller_budget for c in item["callers"]), item


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_colluders_never_place_more_than_the_bound_in_a_window(scenario: Scenario) -> None:
    policy, rng = scenario.policy, random.Random(scenario.seed)
    colluders = [f"sybil-{i}" for i in range(scenario.colluders)]
    honest = [f"user-{i}" for i in range(scenario.honest)]
    votes = backlog(scenario, colluders, honest, rng)
    window = timedelta(days=policy.window_days)
    records, in_window = prior_records(scenario, colluders + honest, rng, START, window)
    done: set[tuple[str, int, int]] = set()
    for number in range(scenario.ingests):  # all within half a window of START: one window with the prior ones
        now = START + window / 2 * number / scenario.ingests
        pending = [v for v in votes if v["arrival"] <= number and key(v) not in done]
        admitted = admitted_in_window(records, policy, now)
        decision = ingest(pending, policy, records, now)
        check_batch(decision, pending, policy, admitted)
        done |= {key(item) for item in decision.accepted + decision.overruled}
        in_window += [item["callers"] for item in agreed(decision)]
        per_caller = Counter(caller for callers in in_window for caller in callers)
        assert len(in_window) <= policy.untrusted_budget
        assert max(per_caller.values(), default=0) <= policy.caller_budget
        placed = sum(len(set(callers) & set(colluders)) >= policy.quorum for callers in in_window)
        assert placed <= policy.most_placed(len(colluders))
        assert placed <= min(policy.untrusted_budget,
                             math.floor(len(colluders) * policy.caller_budget / policy.quorum))
    target(placed / max(1, policy.most_placed(len(colluders))), label="share of the bound placed")  # seek the edge


# --- through the real store ----------------------------------------------------------------
def logged_digits(logs, count: int, now: datetime) -> list[tuple[str, int, object]]:
    """``count`` one-image calls logged in one batch, of distinct random digits: (key, position, entry)."""
    from mnist_client.protos import predict_pb2
    from mnist_client.tensors import to_tensor_proto
    from serving.gateway.log_records import prediction_log
    from storage.logs import LogEntry

    rng = np.random.default_rng(7)
    entries, records = [], []
    for number in range(count):
        digit = np.zeros((1, 28, 28, 1), np.float32)
        top, left = rng.integers(4, 12, size=2)
        digit[0, top:top + 12, left:left + 8, 0] = rng.uniform(0.5, 1.0, size=(12, 8))
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "mnist"
        request.inputs["image"].CopyFrom(to_tensor_proto(digit))
        entries.append(LogEntry(f"call-{number}", now.isoformat(timespec="milliseconds"), 1, "", "grpc", 1))
        records.append(prediction_log(b"", request.SerializeToString(), b""))
    key = logs.write_batch(entries, records)
    return [(key, position, entry) for position, entry in enumerate(entries)]


def traffic():
    from storage.logs import FeedbackStore, PredictionLogStore
    from storage.settings import TrafficSettings

    logs = PredictionLogStore(TrafficSettings())
    logs.ensure_bucket()
    return logs, FeedbackStore(TrafficSettings())


def test_the_window_budget_survives_successive_ingests_through_the_store(store_env) -> None:
    """Three tokens, agreeing in pairs on 30 images, get floor(3*5/2) = 7 labels into training in
    the first ingest and none in the next two, within the same window (the budget read back from
    the ``_ingested`` records); an operator's label goes in regardless; a window later, 7 more."""
    from storage.datasets import DatasetStore
    from storage.feedback import record_feedback
    from storage.settings import DatasetSettings
    from tasks.feedback import ingest_feedback
    from tasks.ingest import Reference

    logs, feedback = traffic()
    datasets = DatasetStore(DatasetSettings())
    reference = Reference(np.full(10, 0.1), 0.19, 150.0, {})
    now = datetime.now(timezone.utc)
    calls = logged_digits(logs, 31, now)
    pairs = [("app-a", "app-b"), ("app-b", "app-c"), ("app-c", "app-a")]
    for number, (key, position, entry) in enumerate(calls[:30]):
        for caller in pairs[number % 3]:
            record_feedback(logs, feedback, entry.request_id, 4, source="gateway", caller=caller, trusted=False,
                            locate=lambda _, found=(key, position, entry): found, live_check_key=None)
    policy = FeedbackPolicy(caller_budget=5, max_caller_share=1.0)  # the share apart: the budget alone here

    first = ingest_feedback(datasets, logs, feedback, reference, policy=policy, now=now)
    assert first and first.ingested and first.ingested.batch["count"] == 7 == policy.most_placed(3)
    assert (first.policy.agreed, first.policy.over_budget) == (7, 23)
    key, position, entry = calls[30]
    record_feedback(logs, feedback, entry.request_id, 2, locate=lambda _: (key, position, entry),  # an operator's
                    live_check_key=None)
    second = ingest_feedback(datasets, logs, feedback, reference, policy=policy, now=now + timedelta(days=1))
    assert second and second.ingested and second.ingested.batch["count"] == 1
    assert (second.policy.trusted, second.policy.agreed, second.policy.over_budget) == (1, 0, 23)
    third = ingest_feedback(datasets, logs, feedback, reference, policy=policy, now=now + timedelta(days=2))
    assert third and third.feedback_items == 0 and third.policy.over_budget == 23

    records = feedback.ingest_records()
    admitted = [label for record in records for label in record.labels if label.basis == "agreed"]
    assert len(admitted) == 7 and all(len(label.callers) == 2 for label in admitted)
    assert max(admitted_in_window(records, policy, now + timedelta(days=2)).callers.values()) == 5
    later = ingest_feedback(datasets, logs, feedback, reference, policy=policy, now=now + timedelta(days=8))
    assert later and later.policy.agreed == 7 and later.policy.over_budget == 16


def test_a_malformed_record_in_the_bucket_neither_crashes_the_ingest_nor_lifts_the_budget(store_env) -> None:
    from tasks.feedback import pending_decision

    logs, feedback = traffic()
    now = datetime.now(timezone.utc)
    for caller, trusted, request in (("app-a", False, "r1"), ("app-b", False, "r1"), ("operator", True, "r2")):
        feedback.put({"request_id": request, "index": 0, "label": 3, "caller": caller, "trusted": trusted,
                      "source": "gateway", "time": now.isoformat(), "log": "none", "position": 0})
    assert pending_decision(feedback).summary().agreed == 1
    old = ingest_record([{"request_id": "r9", "index": 0, "label": 1, "basis": "agreed", "callers": ["app-a"]}],
                        None, now - timedelta(days=30))
    feedback.client.put_object(Bucket=feedback.bucket, Key=feedback.key("_ingested", "old.json"),
                               Body=json.dumps(old).encode())
    assert pending_decision(feedback).summary().agreed == 1  # a month ago: outside the window
    feedback.client.put_object(Bucket=feedback.bucket, Key=feedback.key("_ingested", "torn.json"),
                               Body=b'{"batch": null, "feedback": [{"request_id": "r7", "ind')
    decision = pending_decision(feedback)
    assert decision.summary().model_dump() == {"trusted": 1, "agreed": 0, "quarantined": 0, "capped": 0,
                                               "over_budget": 1, "screened_out": 0, "callers": {"operator": 1}}
    assert feedback.ingested() == {("r9", 0, 1)}
