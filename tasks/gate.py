"""The gate: checks of a candidate's scores (``tasks/scoring.py``) against the accuracy threshold,
against ``stable`` and against poisoning, and the verdict they add up to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from tasks.data import NUM_CLASSES
from tasks.results import Evaluation, FailedCheck, StableScores, TestScores, Verdict


@dataclass(frozen=True)
class GateCheck:
    """One comparison of the gate: ``value`` must be >= ``limit`` (<= with ``at_most``)."""

    name: str
    value: float
    limit: float
    at_most: bool = False

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def describe(self) -> str:
        verdict = "passed" if self.passed else "failed"
        relation = {(False, True): ">=", (False, False): "<", (True, True): "<=", (True, False): ">"}[
            (self.at_most, self.passed)]
        return f"{self.name} {verdict}: {self.value:.4f} {relation} {self.limit:.4f}"


# --- poisoning: what accuracy on clean digits cannot see -------------------------------------
# A backdoor keeps clean accuracy and sends digits to one target when a trigger is present; a
# label flip pulls answers towards one digit. Both are judged on trusted (MNIST test) digits,
# against stable: answers newly pulled to one digit, and shortcuts reverse-engineered from the
# candidate that stable does not follow (tasks/backdoor.py), whatever the trigger looks like.


def moved_to_digit(candidate: Evaluation, champion: StableScores) -> list[float]:
    """Per digit, the share of trusted test digits that stable answers right and the candidate
    answers wrong, as this digit: answers pulled towards one digit, as label flipping does."""
    answers = np.asarray(candidate.predictions)
    newly_wrong = np.zeros(len(answers), dtype=bool)
    newly_wrong[candidate.misclassified] = True
    newly_wrong[champion.misclassified] = False
    return [float((newly_wrong & (answers == digit)).mean()) for digit in range(NUM_CLASSES)]


def weakest_follow(candidate: Evaluation, champion: StableScores) -> tuple[int, float]:
    """The digit whose shortcut stable follows least, as a share of how far the candidate follows
    it, among the candidate's small shortcuts: those that work on it (FOLLOW_ABOVE) with a change
    no larger than its median digit's. A backdoor is a small change by nature; a large one draws
    much of the digit, and how far another model follows a drawing is no evidence. (digit, 1.0)
    when no shortcut qualifies."""
    from tasks.backdoor import FOLLOW_ABOVE

    typical = float(np.median(candidate.shortcut_sizes))
    ratios = [(followed / sent if sent >= FOLLOW_ABOVE and size <= typical else 1.0)
              for sent, followed, size in zip(candidate.shortcuts, champion.shortcuts_followed,
                                              candidate.shortcut_sizes)]
    digit = int(np.argmin(ratios))
    return digit, float(ratios[digit])


def poisoning_checks(candidate: Evaluation, champion: StableScores | None, moved_margin: float,
                     shortcut_follow: float) -> list[GateCheck]:
    """Against ``stable`` on trusted (MNIST test) digits: answers newly wrong as any one digit, at
    most ``moved_margin`` of them; each digit's reverse-engineered shortcut, followed by stable on
    at least ``shortcut_follow`` of what it does to the candidate."""
    if champion is None:
        return []
    moved = moved_to_digit(candidate, champion)
    digit = int(np.argmax(moved))
    checks = [GateCheck(f"MNIST test digits stable v{champion.version} gets right, newly answered {digit}",
                        moved[digit], moved_margin, at_most=True)]
    if not candidate.shortcuts:  # not inspected: the check is off
        return checks
    target, follow = weakest_follow(candidate, champion)
    size, typical = candidate.shortcut_sizes[target], float(np.median(candidate.shortcut_sizes))
    checks.append(GateCheck(f"backdoor inspection: the shortcut to {target} ({size:.0f} pixels changed, median"
                            f" {typical:.0f}) sends {candidate.shortcuts[target]:.2f} of other digits there; the share"
                            f" of that stable v{champion.version} follows too (one it ignores is this model's own:"
                            " a backdoor)", follow, shortcut_follow))
    return checks


STABLE_COMPARISONS = "the comparisons with stable (accuracy, each digit, slices, answers moved, backdoor inspection)"


def skipped_checks(champion: StableScores | None, publishing: bool, shortcut_follow: float) -> list[str]:
    """What the gate did not check and why, said in its verdict rather than left to be noticed."""
    if not publishing:
        return [f"{STABLE_COMPARISONS}: a run that does not publish is compared with nothing"]
    if champion is None:
        return [f"{STABLE_COMPARISONS}: no version is stable yet, the accuracy gate alone judges the first"]
    return ["the backdoor inspection: --shortcut-follow 0"] if shortcut_follow == 0 else []


def accuracy_gate(metrics: TestScores, threshold: float) -> GateCheck:
    return GateCheck("accuracy gate (test_accuracy >= threshold)", metrics.test_accuracy, threshold)


NONINFERIORITY_Z = 1.645  # one-sided 95%: the candidate is rejected when confidently worse


def paired_noise(candidate: TestScores, champion: StableScores) -> float:
    """How far two equally good models' accuracies differ on the same test digits by chance: 1.645
    standard errors of the paired difference (only digits one model gets right and the other wrong
    count, as McNemar's test). Default seeds 0, 1 and 2 disagree pairwise on 32-37 of MNIST's
    10,000 test digits: a noise of 0.0009-0.0010."""
    mine, theirs = set(candidate.misclassified), set(champion.misclassified)
    newly_wrong, newly_right, count = len(mine - theirs), len(theirs - mine), candidate.num_examples
    difference = (newly_wrong - newly_right) / count
    variance = ((newly_wrong + newly_right) / count - difference ** 2) / count
    return NONINFERIORITY_Z * float(np.sqrt(max(variance, 0.0)))


def champion_checks(candidate: TestScores, champion: StableScores | None, accuracy_margin: float,
                    class_margin: float) -> list[GateCheck]:
    """Challenger vs the ``stable`` champion on the same test set: overall accuracy may drop by
    at most ``accuracy_margin`` beyond the paired noise (a non-inferiority test: a retrain that is
    only another seed's luck passes, one confidently worse by more than the margin does not); each
    digit's by at most ``class_margin``."""
    if champion is None:
        return []
    noise = paired_noise(candidate, champion)
    checks = [GateCheck(f"not worse than stable v{champion.version} (accuracy - {accuracy_margin:g}"
                        f" - {noise:.4f} paired noise)", candidate.test_accuracy,
                        champion.test_accuracy - accuracy_margin - noise)]
    checks += [GateCheck(f"digit {digit} vs stable (class accuracy - {class_margin:g})", mine, theirs - class_margin)
               for digit, (mine, theirs) in enumerate(zip(candidate.per_class_accuracy,
                                                           champion.per_class_accuracy))]
    return checks


def slice_checks(candidate: Evaluation, champion: StableScores | None, threshold: float, margin: float,
                 min_size: int) -> tuple[list[GateCheck], list[str]]:
    """Each new source's test slice with at least ``min_size`` examples must reach ``threshold``
    and lose at most ``margin`` against ``stable`` on the same images; smaller slices are
    reported, not gated. Returns the checks and the notes on slices too small to judge."""
    checks, notes = [], []
    for source, scores in sorted(candidate.slices.items()):
        if scores.num_examples < min_size:
            notes.append(f"slice {source}: {scores.num_examples} test examples < {min_size}, reported, not gated")
            continue
        checks.append(GateCheck(f"slice {source} accuracy >= slice threshold", scores.accuracy, threshold))
        if champion is not None and source in champion.slices:
            checks.append(GateCheck(f"slice {source} not worse than stable v{champion.version} (- {margin:g})",
                                    scores.accuracy, champion.slices[source].accuracy - margin))
    return checks, notes


def short_reason(checks: list[GateCheck], shown: int = 2) -> str:
    """The failing checks in one short line, for a state message and the runs list; the report
    tables every check. Empty when nothing failed."""
    failed = [check.describe() for check in checks if not check.passed]
    more = len(failed) - shown
    return "; ".join(failed[:shown]) + (f"; and {more} more failing check{'s' * (more > 1)} (see the report)"
                                        if more > 0 else "")


def checks_table(checks: list[GateCheck]) -> str:
    """The gate's checks as aligned lines for the run's log, failing ones first."""
    return "\n".join(f"  {'FAIL' if not c.passed else 'pass'}  {c.value:.4f} {'<=' if c.at_most else '>='} "
                     f"{c.limit:.4f}  {c.name}" for c in sorted(checks, key=lambda check: check.passed))


def judge(checks: list[GateCheck], skipped: list[str] | None = None) -> Verdict:
    """The verdict the checks add up to: passed when every check passed; every check described, the
    failing ones with their figures; ``skipped``, what was not checked and why."""
    failed = [check for check in checks if not check.passed]
    summary = ("; ".join(check.describe() for check in checks) if not failed
               else "rejected: " + "; ".join(check.describe() for check in failed))
    return Verdict(passed=not failed, summary=summary, reason=short_reason(checks),
                   checks=[check.describe() for check in checks], skipped=list(skipped or []),
                   failed=[FailedCheck(check=c.name, value=c.value, limit=c.limit, at_most=c.at_most) for c in failed])


REJECTED = "Rejected"  # the state name of a gate task and a training run whose candidate was rejected


def verdict_state(verdict: Verdict) -> Verdict | State:
    """How a verdict shows in Prefect, for the gate task and the training run alike: a pass is the
    verdict itself, a rejection its ``rejection_state``."""
    return verdict if verdict.passed else rejection_state(verdict)


def rejection_state(verdict: Verdict) -> State:
    """A rejection is an expected outcome, not a crash: a COMPLETED-type state named ``Rejected``
    with the short reason as its message (the UI's runs list shows it), holding the verdict."""
    return Completed(name=REJECTED, message=verdict.reason, data=verdict)


@task(name="gate")
def gate(checks: list[GateCheck], skipped: list[str] | None = None) -> Verdict | State:
    """Judge the candidate; the verdict goes to the log and a markdown artifact, with what was
    ``skipped`` and why.

    A rejection is an expected outcome, not a crash: the task ends in a ``Rejected`` state
    (of type COMPLETED) holding the verdict, and logs a warning, so its state and its log say
    the same; the flow then ends ``Rejected`` with the one-line reason, without a traceback.
    """
    verdict = judge(checks, skipped)
    log_verdict(verdict, checks)
    failing_first = sorted(checks, key=lambda check: check.passed)
    table = "\n".join(f"| {c.name} | {c.value:.4f} | {c.limit:.4f} | {'pass' if c.passed else 'FAIL'} |"
                      for c in failing_first)
    create_table_artifact([{"check": c.name, "value": round(c.value, 5), "limit": round(c.limit, 5),
                            "verdict": "pass" if c.passed else "FAIL"} for c in failing_first],
                          key="mnist-gate-checks", description="Gate checks, including the comparison with stable")
    not_checked = "".join(f"\n\nNot checked: {why}." for why in verdict.skipped)
    create_markdown_artifact(
        f"# Gate: {'passed' if verdict.passed else 'rejected'}\n\n"
        f"{verdict.summary if verdict.passed else verdict.reason}{not_checked}\n\n"
        f"| check | value | limit | verdict |\n|---|---|---|---|\n{table}\n",
        key="mnist-gate", description="Gate verdict")
    return verdict_state(verdict)


def log_verdict(verdict: Verdict, checks: list[GateCheck]) -> None:
    """A pass: a table of every check. A rejection: a warning with each failing check, then the table."""
    logger = get_run_logger()
    if verdict.passed:
        logger.info("gate passed: all %d checks\n%s", len(checks), checks_table(checks))
    else:
        logger.warning("gate rejected: %d of %d checks failed\n%s", len(verdict.failed), len(checks),
                       "\n".join(f"  {check.describe()}" for check in checks if not check.passed))
        logger.info("all %d checks, failing first:\n%s", len(checks), checks_table(checks))
    for why in verdict.skipped:
        logger.info("gate: not checked: %s", why)
