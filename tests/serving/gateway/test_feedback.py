"""Feedback through the gateway, with a real SeaweedFS and CLI processes: bearer tokens and a rate
per caller, request ids the gateway owns, the quarantine of untrusted labels and its per-caller cap,
bodies no handler may crash on, and the round trip into a dataset batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from mnist_client.client import Target, predict, predict_call
from storage.embedded import free_port
from tests.conftest import REPO, run_mnist, stopped_by_sigterm
from tests.gateway_cases import (  # noqa: F401  fixtures, used by name
    APP_A,
    APP_B,
    LABELLER,
    bearer,
    digits,
    logged,
    start_gateway,
    stores,
    upstream,
    wait_for,
)


def test_feedback_round_trip_to_an_ingested_batch(store_env, upstream, digits: np.ndarray, tmp_path: Path,
                                                  mnist_dir: Path, trusted_stable: int) -> None:
    _, address, _ = upstream
    shifted = np.roll(digits[:12], 2, axis=2)  # MNIST's own digits would be refused as duplicates
    gateway = start_gateway(address, sample_rate=1.0)
    unsampled = start_gateway(address, sample_rate=0.0)
    feedback_url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        answers = predict(shifted[:10], address=f"127.0.0.1:{gateway.port}")  # one request of ten images
        singles = [predict_call(shifted[i:i + 1], Target(f"127.0.0.1:{gateway.port}")).request_id
                   for i in (10, 11)]
        skipped = predict_call(shifted[:1], Target(f"127.0.0.1:{unsampled.port}")).request_id
        wait_for(lambda: gateway.logger.written_records == 3)
        request_id = answers[0]["request_id"]
        replies = [httpx.post(feedback_url, json={"request_id": request_id, "index": i, "label": label},
                              headers=bearer(LABELLER)) for i, label in enumerate([7, 2, 1, 0, 4])]
        unknown = httpx.post(feedback_url, json={"request_id": "no-such-request", "label": 3}, headers=bearer(LABELLER))
        bad_label = httpx.post(feedback_url, json={"request_id": request_id, "label": 12}, headers=bearer(LABELLER))
        out_of_range = httpx.post(feedback_url, json={"request_id": request_id, "index": 10, "label": 1},
                                  headers=bearer(LABELLER))
        not_sampled = httpx.post(f"http://127.0.0.1:{unsampled.rest.port}/v1/models/mnist/feedback",
                                 json={"request_id": skipped, "label": 3}, headers=bearer(LABELLER))
    finally:
        gateway.stop()
        unsampled.stop()
    assert [reply.status_code for reply in replies] == [200] * 5
    assert replies[0].json()["version"] == 1 and answers[3]["index"] == 3
    assert replies[0].json()["caller"] == "labeller" and replies[0].json()["trusted"] is True
    assert unknown.status_code == 404 and "no-such-request" in unknown.json()["error"]
    assert bad_label.status_code == 400 and "0-9" in bad_label.json()["error"]
    assert out_of_range.status_code == 400 and "has 10 image(s)" in out_of_range.json()["error"]
    assert not_sampled.status_code == 404 and "not sampled" in not_sampled.json()["error"]
    # the CLI: one id, and a CSV with one good and one unknown id (refused in one line, exit 1)
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    assert run_mnist("feedback", singles[0], "9", env=env).returncode == 0
    csv_file = tmp_path / "feedback.csv"
    csv_file.write_text(f"request_id,label\n{singles[1]},5\nnobody,4\n")
    refused = run_mnist("feedback", "--csv", str(csv_file), env=env)
    assert refused.returncode == 1 and "1 of 2 refused" in refused.stderr and "nobody" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    added = run_mnist("data", "add", "--from-feedback", "--json", env=env)
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    assert result["batch"]["count"] == 7 and result["batch"]["source"] == "feedback"
    assert result["batch"]["label_histogram"][7] == 1 and result["batch"]["label_histogram"][9] == 1
    again = run_mnist("data", "add", "--from-feedback", env=env)
    assert again.returncode == 0 and "no new feedback" in again.stdout


def test_feedback_needs_a_known_token_and_is_attributed_and_rate_limited(store_env, upstream,
                                                                       digits: np.ndarray) -> None:
    _, address, _ = upstream
    gateway = start_gateway(address, feedback_per_minute=3)
    closed = start_gateway(address, credentials=())
    url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        request_id = predict_call(digits[:1], Target(f"127.0.0.1:{gateway.port}")).request_id
        wait_for(lambda: gateway.logger.written_records == 1)
        body = {"request_id": request_id, "label": 3}
        refused = [httpx.post(url, json=body, headers=headers) for headers in (
            {}, {"Authorization": "Bearer not-a-token-of-anyone-at-all"}, {"Authorization": "Basic " + "x" * 30},
            {"Authorization": f"Token {APP_A.token.decode()}"})]
        taken = [httpx.post(url, json=body, headers=bearer(APP_A)) for _ in range(3)]
        limited = httpx.post(url, json=body, headers=bearer(APP_A))
        other_caller = httpx.post(url, json=body, headers=bearer(APP_B))  # the limit is per caller
        off = httpx.post(f"http://127.0.0.1:{closed.rest.port}/v1/models/mnist/feedback", json=body,
                         headers=bearer(LABELLER))
    finally:
        gateway.stop()
        closed.stop()
    assert [reply.status_code for reply in refused] == [401] * 4
    assert all(reply.headers["www-authenticate"].startswith("Bearer") for reply in refused)
    assert [reply.status_code for reply in taken] == [200] * 3 and limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1 and other_caller.status_code == 200
    assert off.status_code == 401 and "--feedback-tokens" in off.json()["error"]
    stored = gateway.feedback.all()
    assert sorted((item["caller"], item["trusted"]) for item in stored) == [("app-a", False), ("app-b", False)]


def test_a_callers_request_id_never_addresses_someone_elses_call(store_env, upstream, digits: np.ndarray) -> None:
    """Two callers send the same x-request-id: each call gets its own id from the gateway, the
    callers' id is kept beside both, and feedback on the shared id finds no call."""
    _, address, _ = upstream
    gateway = start_gateway(address)
    target = Target(f"127.0.0.1:{gateway.port}")
    try:
        first = predict_call(digits[:1], target, request_id="order-1796423773")
        second = predict_call(digits[1:2], target, request_id="order-1796423773")
        wait_for(lambda: gateway.logger.written_records == 2)
        collision = httpx.post(f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback",
                               json={"request_id": "order-1796423773", "label": 1}, headers=bearer(LABELLER))
    finally:
        gateway.stop()
    assert len({first.request_id, second.request_id, "order-1796423773"}) == 3
    entries = [entry for entry, _ in logged(gateway.logs)]
    assert [(e.request_id, e.client_request_id) for e in entries] == [
        (first.request_id, "order-1796423773"), (second.request_id, "order-1796423773")]
    assert collision.status_code == 404 and gateway.feedback.all() == []


def test_untrusted_labels_wait_in_quarantine_until_callers_agree_or_an_operator_accepts(
        store_env, upstream, digits: np.ndarray, mnist_dir: Path, trusted_stable: int) -> None:
    from storage.datasets import DatasetStore
    from storage.settings import DatasetSettings
    from tasks.ingest import to_uint8

    _, address, _ = upstream
    shifted = np.roll(digits[:5], 2, axis=2)  # not MNIST's own digits, which ingest refuses as duplicates
    gateway = start_gateway(address)
    url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        ids = [predict_call(shifted[i:i + 1], Target(f"127.0.0.1:{gateway.port}")).request_id for i in range(5)]
        wait_for(lambda: gateway.logger.written_records == 5)
        # MNIST's test digits 7 2 1 0 4: every label the policy takes is one the trusted model can
        # believe (agreement never admits a label the data screen contradicts: tests/tasks/test_screen.py)
        votes = [(0, APP_A, 0),                   # one untrusted caller: waits
                 (1, APP_A, 2), (1, APP_B, 2),    # two untrusted callers agree: trains, never tests
                 (2, APP_A, 0), (2, APP_B, 3),    # they disagree: waits
                 (3, APP_A, 6), (3, LABELLER, 0),  # a trusted caller decides; the other label is overruled
                 (4, APP_A, 2)]                   # waits until the operator accepts it below
        replies = [httpx.post(url, json={"request_id": ids[i], "label": label}, headers=bearer(who))
                   for i, who, label in votes]
    finally:
        gateway.stop()
    assert [reply.status_code for reply in replies] == [200] * len(votes)
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    review = run_mnist("feedback", "review", "--json", env=env)
    assert review.returncode == 0, review.stderr
    waiting = json.loads(review.stdout)
    assert {item["request_id"] for item in waiting["waiting"]} == {ids[0], ids[2], ids[4]}
    assert (waiting["trusted"], waiting["agreed"], waiting["quarantined"]) == (1, 1, 3)
    tie = run_mnist("feedback", "accept", ids[2], env=env)
    assert tie.returncode == 2 and "callers disagree" in tie.stderr
    assert run_mnist("feedback", "accept", ids[4], env=env).returncode == 0  # takes app-a's 2, as the operator's

    added = run_mnist("data", "add", "--from-feedback", "--json", env=env)
    assert added.returncode == 0, added.stderr
    batch = json.loads(added.stdout)["batch"]
    assert batch["count"] == 3 and batch["feedback"]["trusted"] == 2 and batch["feedback"]["agreed"] == 1
    histogram = np.bincount([2, 0, 2], minlength=10).tolist()
    assert batch["label_histogram"] == histogram  # no attacker's 0 among them
    stored = DatasetStore(DatasetSettings()).read_batch(batch["sha256"])
    agreed = next(i for i, image in enumerate(stored.images) if np.array_equal(image, to_uint8(shifted[1])))
    assert stored.splits[agreed] == 0 and stored.labels[agreed] == 2  # agreed by untrusted callers: train only
    after = json.loads(run_mnist("feedback", "review", "--json", env=env).stdout)
    assert {item["request_id"] for item in after["waiting"]} == {ids[0], ids[2]}
    shown = run_mnist("data", "show", str(json.loads(added.stdout)["version"]["version"]), env=env)
    assert shown.returncode == 0 and '"quarantined": 2' in shown.stdout


def test_no_untrusted_caller_makes_up_more_than_its_share_of_a_batch() -> None:
    from tasks.feedback import FeedbackPolicy, decide

    def vote(request: int, caller: str, label: int = 1) -> dict:
        return {"request_id": f"r{request}", "index": 0, "label": label, "caller": caller, "trusted": False,
                "time": f"2026-12-06T00:00:{request:02d}"}

    items = [vote(i, caller) for i in range(8) for caller in ("app-a", "app-b")]  # one pair agrees on all 8
    items += [vote(8 + i, caller) for i in range(4) for caller in ("app-c", "app-d")]
    decision = decide(items, FeedbackPolicy(quorum=2, max_caller_share=0.25))
    taken = [item["request_id"] for item in decision.accepted]
    # the share is of the batch taken: each caller on one of these two (a quarter, rounded down,
    # is at least one); three each of six would put every caller on half of it
    assert taken == ["r0", "r8"] and len(decision.capped) == 10
    assert decide(items, FeedbackPolicy(quorum=3)).accepted == []  # no image has three callers


def test_hostile_feedback_bodies_get_400_in_one_line_and_no_traceback(store_env, upstream, digits: np.ndarray,
                                                                      tmp_path: Path) -> None:
    _, address, _ = upstream
    tokens = tmp_path / "tokens"
    tokens.write_text(f"labeller {LABELLER.token.decode()} trusted\n")
    port, rest_port = free_port(), free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--upstream", address, "--port", str(port),
                                "--rest-api-port", str(rest_port), "--feedback-tokens", str(tokens)], cwd=REPO,
                               env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        assert "listening on" in gateway.stdout.readline()
        request_id = predict_call(digits[:1], Target(f"127.0.0.1:{port}")).request_id
        url = f"http://127.0.0.1:{rest_port}/v1/models/mnist/feedback"
        bodies = {"deeply nested": b"[" * 2000 + b"]" * 2000,
                  "a 4,000-digit label": f'{{"request_id": "{request_id}", "label": {"7" * 4000}}}'.encode(),
                  "a superscript digit": json.dumps({"request_id": request_id, "label": "\u00b2"}).encode(),
                  "a 4,000-digit request id": f'{{"request_id": {"1" * 4000}, "label": 1}}'.encode(),
                  "a float index": json.dumps({"request_id": request_id, "label": 1, "index": 0.5}).encode(),
                  "not JSON": b"\xff\xfe{",
                  "a list": b"[1, 2]"}
        replies = {name: httpx.post(url, content=body, headers={**bearer(LABELLER), "content-type": "application/json"})
                   for name, body in bodies.items()}
        too_big = httpx.post(url, content=f'{{"request_id": "{request_id}", "label": {"7" * 5000}}}'.encode(),
                             headers=bearer(LABELLER))  # the 5,000-digit label: refused before it is read
    finally:
        output = stopped_by_sigterm(gateway, timeout=30)
    for name, reply in replies.items():
        assert reply.status_code == 400, (name, reply.status_code, reply.text[:200])
        assert len(reply.json()["error"]) < 300 and "\n" not in reply.json()["error"], name
    assert too_big.status_code == 413
    assert "Traceback" not in output and "Error" not in output.replace("Errno", ""), output[-3000:]


def test_feedback_items_altered_in_the_bucket_are_refused_one_by_one(store_env, upstream,
                                                                     digits: np.ndarray) -> None:
    """Items are read back from the bucket, which anyone holding its keys can write: a position
    or image index that is not a whole number in range is one refused item, never an image read
    from elsewhere in the batch (a negative index would read from its end)."""
    from storage.feedback import FEEDBACK_HOURS
    from tasks.feedback import feedback_examples

    _, address, _ = upstream
    gateway = start_gateway(address, sample_rate=1.0)
    try:
        request_id = predict_call(np.roll(digits[:3], 2, axis=2), Target(f"127.0.0.1:{gateway.port}")).request_id
        wait_for(lambda: gateway.logger.written_records == 1)
    finally:
        gateway.stop()
    logs, _ = stores()
    key, position, _ = logs.find(request_id, FEEDBACK_HOURS)
    good = {"request_id": request_id, "log": key, "position": position, "index": 2, "label": 4}
    altered = [{**good, "index": -1}, {**good, "index": True}, {**good, "index": 3}, {**good, "position": -1},
               {**good, "position": float(position)}, {**good, "position": 99}, {**good, "request_id": "other"}]
    names, images, labels, used, problems, _ = feedback_examples(logs, [good, *altered])
    assert names == [f"feedback:{request_id}#2"] and labels == [4] and used == [good]
    assert len(problems) == len(altered), problems


def test_callers_are_added_and_revoked_without_a_restart(store_env, upstream, digits: np.ndarray,
                                                        tmp_path: Path) -> None:
    """The token file read again when it changes: a new caller is let in, a removed one refused,
    and a file that no longer reads keeps the callers before (said on stderr, not a 500)."""
    from serving.gateway.callers import read_token_file

    _, address, _ = upstream
    tokens = tmp_path / "feedback-tokens"
    tokens.write_text(f"app-a {APP_A.token.decode()}\n")
    gateway = start_gateway(address, credentials=tuple(read_token_file(tokens)), tokens_file=tokens)
    url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        request_id = predict_call(digits[:1], Target(f"127.0.0.1:{gateway.port}")).request_id
        wait_for(lambda: gateway.logger.written_records == 1)
        body = {"request_id": request_id, "label": 3}
        before = [httpx.post(url, json=body, headers=bearer(who)).status_code for who in (APP_A, APP_B)]
        tokens.write_text(f"app-b {APP_B.token.decode()}\n")  # app-b added, app-a revoked
        after = [httpx.post(url, json=body, headers=bearer(who)).status_code for who in (APP_A, APP_B)]
        tokens.write_text("app-b short\n")  # a mistake while editing: app-b stays
        broken = httpx.post(url, json=body, headers=bearer(APP_B)).status_code
    finally:
        gateway.stop()
    assert (before, after, broken) == ([200, 401], [401, 200], 200)


def test_sighup_makes_the_gateway_read_its_token_file_again(store_env, upstream, tmp_path: Path) -> None:
    import signal

    _, address, _ = upstream
    tokens = tmp_path / "feedback-tokens"
    tokens.write_text(f"app-a {APP_A.token.decode()}\napp-b {APP_B.token.decode()} trusted\n")
    process = subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--upstream", address, "--port", "0",
                                "--rest-api-port", str(free_port()), "--feedback-tokens", str(tokens)],
                               cwd=REPO, env={**os.environ, **store_env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in process.stdout.readline()
        process.send_signal(signal.SIGHUP)
        assert process.stderr.readline().strip() == "mnist gateway: --feedback-tokens reloaded: 2 callers"
        assert process.poll() is None  # SIGHUP does not stop it
    finally:
        assert stopped_by_sigterm(process)
