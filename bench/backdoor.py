"""Poisoning attacks against the loop's two defences, with whole mnist commands as an operator
runs them on a fresh store, each attack from the same clean state (a snapshot of the store after a
clean `mnist train`):

1. `mnist data add` of the poisoned batch as a new source: what the data screen admits and holds;
2. an operator then accepts whatever was held (`mnist data accept --source`), the worst case for
   the screen, so that the gate's inspection meets the poison;
3. `mnist train --force`: the gate's verdict; the attack's success rate (non-target MNIST test
   digits with the trigger on, answered as the target) and clean accuracy of the candidate and of
   what serves afterwards (`stable`).

Beside them, honest controls: plain retrains of other seeds, and an honest new source (digits of
another scanner, `tasks.synthetic`). The cost of the inspection is measured side by side, the same
retrain with it off (--shortcut-follow 0) and on."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bench.common import save

REPO = Path(__file__).resolve().parents[1]
Trigger = Callable[[np.ndarray], np.ndarray]  # uint8 digits [N,28,28] -> the same with the trigger on


def patch_beside_centre(images: np.ndarray) -> np.ndarray:
    stamped = images.copy()
    stamped[:, 12:15, 17:20] = 255
    return stamped


def blend(share: float, seed: int) -> Trigger:
    noise = np.random.default_rng(seed).integers(0, 256, (28, 28))
    return lambda images: ((1 - share) * images + share * noise).astype(np.uint8)


def pixels_in_an_l(images: np.ndarray) -> np.ndarray:
    stamped = images.copy()
    for row, column in ((3, 4), (4, 4), (5, 4), (5, 5), (5, 6)):
        stamped[:, row, column] = 255
    return stamped


def checker_bottom_left(images: np.ndarray) -> np.ndarray:
    stamped = images.copy()
    stamped[:, 22:26:2, 3:7:2] = 255
    stamped[:, 23:27:2, 4:8:2] = 255
    return stamped


def no_trigger(images: np.ndarray) -> np.ndarray:
    return images


@dataclass(frozen=True)
class Attack:
    name: str
    target: int
    budget: int
    trigger: Trigger
    flipped_from: int | None = None  # a label flip: digits of this class only, relabelled


ATTACKS = [
    Attack("3x3 patch beside the centre", 2, 600, patch_beside_centre),
    Attack("10% blend of a noise image", 5, 600, blend(0.10, 7)),
    Attack("five pixels in an L, half the budget", 8, 300, pixels_in_an_l),
    Attack("15% blend of another noise image, twice the budget", 0, 1200, blend(0.15, 11)),
    Attack("label flip: sevens labelled 1, no trigger", 1, 600, no_trigger, flipped_from=7),
]
FEEDBACK_ATTACKS = [  # sent through a running gateway by colluding feedback tokens
    Attack("checker of 8 pixels at the bottom left", 3, 200, checker_bottom_left),
    Attack("20% blend of a noise image", 9, 200, blend(0.20, 13)),
]


def mnist(*args: str, env: dict[str, str]) -> tuple[int, str, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr).strip(), time.perf_counter() - started


def first(pattern: str, output: str, default: str = "0") -> str:
    found = re.search(pattern, output)
    return found.group(1) if found else default


def verdict_of(output: str) -> str:
    return next((line.strip() for line in output.splitlines() if "training run" in line or line.startswith(
        "published:")), [line for line in output.splitlines() if line.strip()][-1] if output.strip() else "")


def poisoning_checks(run: Path) -> list[str]:
    """The run's moved-answers check and backdoor inspection as its report tables them, passed or not."""
    report = run / "report.md"
    lines = report.read_text().splitlines() if report.exists() else []
    return list(dict.fromkeys(line.strip("| ") for line in lines  # the report tables a failed check twice
                              if line.startswith("| ") and ("backdoor inspection" in line or "newly answered" in line)
                              and (" passed: " in line or " failed: " in line)))


def test_accuracy(run: Path) -> float:
    return float(json.loads((run / "evaluation.json").read_text())["test_accuracy"])


def slice_accuracy(run: Path, source: str) -> float | None:
    sliced = json.loads((run / "evaluation.json").read_text())["slices"].get(source)
    return None if sliced is None else float(sliced["accuracy"])


class Store:
    """The embedded store of one scratch directory, and a snapshot of it to start each attack from."""

    def __init__(self, scratch: Path) -> None:
        self.state, self.snapshot = scratch / "state", scratch / "clean-state"
        self.env = {**os.environ, "MNIST_STATE_DIR": str(self.state), "MNIST_OUTPUT_DIR": str(scratch / "out"),
                    "MNIST_S3_ENDPOINT": ""}
        self.runs = scratch / "out" / "runs"

    def up(self) -> None:
        code, output, _ = mnist("storage", "up", env=self.env)
        if code:
            raise RuntimeError(output)

    def down(self) -> None:
        mnist("storage", "down", env=self.env)

    def keep_clean(self) -> None:
        self.down()
        shutil.copytree(self.state, self.snapshot)
        self.up()

    def restore_clean(self) -> None:
        self.down()
        shutil.rmtree(self.state)
        shutil.copytree(self.snapshot, self.state)
        self.up()

    def latest_run(self) -> Path:
        return max(self.runs.iterdir(), key=lambda path: path.name)


def scores(model_path: Path, attack: Attack, test_images: np.ndarray, test_labels: np.ndarray) -> tuple[float, float]:
    """(attack success rate, clean accuracy) of a saved Keras model on MNIST's test digits."""
    import keras

    model = keras.models.load_model(model_path)

    def answer(images: np.ndarray) -> np.ndarray:
        return model.predict((images.astype(np.float32) / 255)[..., None], batch_size=1024, verbose=0).argmax(axis=1)

    clean = float((answer(test_images) == test_labels).mean())
    victims = test_labels == attack.flipped_from if attack.flipped_from is not None else test_labels != attack.target
    success = float((answer(attack.trigger(test_images[victims])) == attack.target).mean())
    return success, clean


def poison(attack: Attack, train_images: np.ndarray, train_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The attack's digits (shifted a pixel: MNIST's own digits are refused as duplicates) and labels."""
    eligible = train_labels == attack.flipped_from if attack.flipped_from is not None else train_labels != attack.target
    picked = np.flatnonzero(eligible)[-attack.budget:]
    return attack.trigger(np.roll(train_images[picked], 1, axis=2)), np.full(len(picked), attack.target, np.uint8)


def run_attack(store: Store, attack: Attack, number: int, scratch: Path, data: tuple) -> dict:
    (train_images, train_labels), (test_images, test_labels), stable_model = data
    store.restore_clean()
    images, labels = poison(attack, train_images, train_labels)
    np.savez(scratch / f"attack-{number}.npz", x=images, y=labels)
    source = f"attack-{number}"
    _, added, _ = mnist("data", "add", str(scratch / f"attack-{number}.npz"), "--source", source, env=store.env)
    admitted = int(first(r"added (\d+) examples", added))
    held = int(first(r"(?:held|all) (\d+) examples", added))
    if held:
        mnist("data", "accept", "--source", source, env=store.env)
    code, output, seconds = mnist("train", "--force", env=store.env)
    candidate = store.latest_run() / "model.keras"
    success, clean = scores(candidate, attack, test_images, test_labels)
    serving = candidate if code == 0 else stable_model
    serving_success, serving_clean = (success, clean) if code == 0 else scores(serving, attack, test_images,
                                                                               test_labels)
    verdict, checks = verdict_of(output), poisoning_checks(store.latest_run())
    print(f"{attack.name} -> {attack.target} ({attack.budget} digits): screen admitted {admitted}, held {held}"
          f" (accepted by the operator); retrain exit {code}, {seconds:.0f} s\n    {verdict}\n    "
          + "\n    ".join(checks) + "\n"
          f"    candidate: success {success:.3f}, clean {clean:.4f}; serving after: success {serving_success:.3f},"
          f" clean {serving_clean:.4f}", flush=True)
    return {"attack": attack.name, "target": attack.target, "budget": attack.budget, "admitted": admitted,
            "held": held, "exit": code, "verdict": verdict, "checks": checks, "candidate_success": success,
            "candidate_clean": clean,
            "serving_success": serving_success, "serving_clean": serving_clean, "seconds": round(seconds, 1)}


class Gateway:
    """`mnist serve` of the clean stable version behind `mnist gateway` with ``callers`` untrusted
    feedback tokens, logging every call to the store: the path served traffic feeds back by."""

    def __init__(self, store: Store, model_base: Path, tokens: Path, callers: int) -> None:
        import secrets

        from storage.embedded import free_port

        self.tokens = {f"app-{i}": secrets.token_urlsafe(24) for i in range(callers)}
        tokens.write_text("".join(f"{name} {token}\n" for name, token in self.tokens.items()))
        tokens.chmod(0o600)
        self.server_port, self.port, self.rest_port = free_port(), free_port(), free_port()
        self.processes = [subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(self.server_port), "--model-base-path",
             str(model_base)], cwd=REPO, env=store.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)]
        wait_for_line(self.processes[0], "listening on")
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "cli", "gateway", "--upstream", f"127.0.0.1:{self.server_port}", "--port",
             str(self.port), "--rest-api-port", str(self.rest_port), "--log-sample-rate", "1",
             "--log-flush-seconds", "0.5", "--feedback-tokens", str(tokens), "--feedback-per-minute", "100000"],
            cwd=REPO, env=store.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True))
        wait_for_line(self.processes[1], "listening on")

    def predict(self, images: np.ndarray) -> list[dict]:
        from mnist_client import predict

        return predict((images.astype(np.float32) / 255)[..., None], address=f"127.0.0.1:{self.port}")

    def label(self, answer: dict, digit: int, caller: str) -> None:
        """POST the caller's label, retried while the call's log is not uploaded yet."""
        import httpx

        deadline = time.monotonic() + 60
        while True:
            reply = httpx.post(f"http://127.0.0.1:{self.rest_port}/v1/models/mnist/feedback",
                               json={"request_id": answer["request_id"], "index": answer.get("index", 0),
                                     "label": digit}, headers={"Authorization": f"Bearer {self.tokens[caller]}"})
            if reply.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"feedback refused: {reply.status_code} {reply.text}")
            time.sleep(0.5)

    def stop(self) -> None:
        from storage.embedded import stop_process

        for process in reversed(self.processes):
            stop_process(process.pid)
            process.wait(timeout=30)


def wait_for_line(process: subprocess.Popen, text: str) -> None:
    lines: list[str] = []
    while not any(text in line for line in lines):
        line = process.stdout.readline() if process.stdout else ""
        if not line:
            raise RuntimeError(f"{process.args[3]} did not start: {''.join(lines)[-500:]}")
        lines.append(line)


def through_the_gateway(store: Store, scratch: Path, images: np.ndarray, labels: np.ndarray, callers: int,
                        model_base: Path) -> tuple[int, int, str]:
    """Every image predicted through the gateway, then labelled by agreeing pairs of ``callers``
    untrusted tokens (pair i labels every (callers/2)-th image); then `mnist data add --from-feedback`.
    Returns (admitted, held, what the ingest said)."""
    gateway = Gateway(store, model_base, scratch / "feedback-tokens", callers)
    try:
        answers = gateway.predict(images)
        pairs = callers // 2
        for number, (answer, digit) in enumerate(zip(answers, labels)):
            for caller in (f"app-{2 * (number % pairs)}", f"app-{2 * (number % pairs) + 1}"):
                gateway.label(answer, int(digit), caller)
    finally:
        gateway.stop()
    _, added, _ = mnist("data", "add", "--from-feedback", env=store.env)
    return int(first(r"(\d+) feedback labels", added)), int(first(r"(\d+) held by the data screen", added)), added


def feedback_attack(store: Store, attack: Attack, scratch: Path, data: tuple, model_base: Path,
                    callers: int = 8, sent: int = 200) -> dict:
    """Colluding tokens send their own triggered digits through the gateway and agree on the target;
    the operator then accepts whatever the screen held; the retrain is judged."""
    (train_images, train_labels), (test_images, test_labels), stable_model = data
    store.restore_clean()
    images, labels = (column[:sent] for column in poison(attack, train_images, train_labels))
    admitted, held, said = through_the_gateway(store, scratch, images, labels, callers, model_base)
    if held:
        mnist("data", "accept", "--source", "feedback", env=store.env)
    code, output, seconds = mnist("train", "--force", env=store.env)
    candidate = store.latest_run() / "model.keras"
    success, clean = scores(candidate, attack, test_images, test_labels)
    serving_success, serving_clean = (success, clean) if code == 0 else scores(stable_model, attack, test_images,
                                                                               test_labels)
    verdict, checks = verdict_of(output), poisoning_checks(store.latest_run())
    print(f"through the gateway, {callers} colluding tokens in agreeing pairs, {attack.name} -> {attack.target} "
          f"({len(images)} digits sent and labelled): the ingest admitted {admitted}, the screen held {held} "
          f"(accepted by the operator); retrain exit {code}, {seconds:.0f} s\n    {verdict}\n    "
          + "\n    ".join(checks) + f"\n    candidate: success {success:.3f}, clean {clean:.4f}; serving after: "
          f"success {serving_success:.3f}, clean {serving_clean:.4f}", flush=True)
    return {"attack": f"gateway: {attack.name}", "target": attack.target, "budget": len(images), "callers": callers,
            "admitted": admitted, "held": held, "exit": code, "verdict": verdict, "checks": checks,
            "candidate_success": success, "candidate_clean": clean, "serving_success": serving_success,
            "serving_clean": serving_clean}


def genuine_corrections(store: Store, scratch: Path, model_base: Path, count: int = 80) -> dict:
    """Untrusted tokens, in agreeing pairs, give the true labels of another scanner's digits that stable gets
    wrong: what the loop admits, and what waits for an operator."""
    import keras

    from storage.settings import PipelineSettings
    from tasks.data import load_mnist_idx
    from tasks.synthetic import write_source

    store.restore_clean()
    train, _, _ = load_mnist_idx(PipelineSettings().data_dir)
    folder = scratch / "corrections"
    write_source(train.images[-6000:], train.labels[-6000:], folder, seed=5)
    from mnist_client.images import read_inputs

    paths = sorted(folder.glob("*/*.png"))
    _, images = read_inputs(paths)
    truth = np.array([int(path.parent.name) for path in paths])
    stable = keras.models.load_model(scratch / "clean-stable.keras")
    wrong = np.flatnonzero(stable.predict(np.asarray(images), batch_size=1024, verbose=0).argmax(axis=1) != truth)
    picked = wrong[:count]
    digits = (np.asarray(images)[picked, ..., 0] * 255).round().astype(np.uint8)
    admitted, held, said = through_the_gateway(store, scratch, digits, truth[picked], 8, model_base)
    print(f"genuine corrections: 8 untrusted tokens in agreeing pairs give the true labels of {len(picked)} "
          f"digits of another scanner that stable gets wrong: the ingest admitted {admitted}, the screen held "
          f"{held} for an operator", flush=True)
    return {"corrections": len(picked), "admitted": admitted, "held": held}


def main(seeds: int = 3) -> dict:
    from storage.settings import PipelineSettings
    from tasks.data import load_mnist_idx
    from tasks.synthetic import write_source

    train, test, _ = load_mnist_idx(PipelineSettings().data_dir)
    result: dict = {"attacks": [], "seeds": [], "honest_source": None, "cost": None}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        store = Store(scratch)
        store.up()
        try:
            code, output, seconds = mnist("train", env=store.env)
            print(f"clean stable (exit {code}, {seconds:.0f} s): {verdict_of(output)}", flush=True)
            shutil.copy(store.latest_run() / "model.keras", scratch / "clean-stable.keras")
            stable_model = scratch / "clean-stable.keras"
            model_base = scratch / "clean-base" / "mnist"
            shutil.copytree(Path(store.env["MNIST_OUTPUT_DIR"]) / "mnist" / "1", model_base / "1")
            store.keep_clean()
            data = ((train.images, train.labels), (test.images, test.labels), stable_model)

            # the inspection's cost, side by side: the same forced retrain with it off, then on, twice
            timings: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(2):
                for mode, flags in (("off", ("--shortcut-follow", "0")), ("on", ())):
                    store.restore_clean()
                    timings[mode].append(mnist("train", "--force", *flags, env=store.env)[2])
            off, on = float(np.median(timings["off"])), float(np.median(timings["on"]))
            result["cost"] = {"train_without_inspection_s": timings["off"], "train_with_s": timings["on"],
                              "added_share": round(on / off - 1, 3)}
            shown = {mode: ", ".join(f"{seconds:.1f}" for seconds in values) for mode, values in timings.items()}
            print(f"cost: mnist train --force without the inspection {shown['off']} s, with it {shown['on']} s "
                  f"(medians: +{100 * (on / off - 1):.0f}%)", flush=True)

            for number, attack in enumerate(ATTACKS):
                result["attacks"].append(run_attack(store, attack, number, scratch, data))
            for attack in FEEDBACK_ATTACKS:
                result["attacks"].append(feedback_attack(store, attack, scratch, data, model_base))
            result["corrections"] = genuine_corrections(store, scratch, model_base)

            for seed in range(1, seeds + 1):
                store.restore_clean()
                code, output, seconds = mnist("train", "--force", "--seed", str(seed), env=store.env)
                lines = poisoning_checks(store.latest_run())
                accuracy = test_accuracy(store.latest_run())
                print(f"honest control, seed {seed}: test accuracy {accuracy:.4f}, exit {code} ({seconds:.0f} s): "
                      f"{verdict_of(output)}\n    " + "\n    ".join(lines), flush=True)
                result["seeds"].append({"seed": seed, "test_accuracy": accuracy, "exit": code,
                                        "verdict": verdict_of(output), "checks": lines})

            store.restore_clean()
            picked = np.arange(len(train.labels))[-3000:]
            write_source(train.images[picked], train.labels[picked], scratch / "scanner", seed=3)
            _, added, add_seconds = mnist("data", "add", str(scratch / "scanner"), "--source", "scanner-b",
                                          env=store.env)
            code, output, seconds = mnist("train", env=store.env)
            honest = {"admitted": int(first(r"added (\d+) examples", added)),
                      "held": int(first(r"(?:held|all) (\d+) examples", added)), "add_seconds": round(add_seconds, 1),
                      "exit": code, "verdict": verdict_of(output), "checks": poisoning_checks(store.latest_run()),
                      "test_accuracy": test_accuracy(store.latest_run()),
                      "slice_accuracy": slice_accuracy(store.latest_run(), "scanner-b")}
            result["honest_source"] = honest
            print(f"honest new source (3000 digits of another scanner): data add {add_seconds:.1f} s, admitted "
                  f"{honest['admitted']}, held {honest['held']}; retrain exit {code} ({seconds:.0f} s), test accuracy "
                  f"{honest['test_accuracy']:.4f}, its slice {honest['slice_accuracy']}: {honest['verdict']}\n    "
                  + "\n    ".join(honest["checks"]), flush=True)
        finally:
            store.down()
    print(f"results: {save('backdoor', result)}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="honest retrains of other seeds (10 for the acceptance)")
    main(parser.parse_args().seeds)
