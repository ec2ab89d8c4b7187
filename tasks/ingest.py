"""Ingest stage: new labelled digits -> validated, deduplicated, split batch -> new dataset version.

Sources: a folder of ``0/`` ... ``9/`` sub-folders of images (the layout Keras'
``image_dataset_from_directory`` reads), a CSV of ``path,label``, or an ``.npz`` with
``x`` and ``y``. Images go through ``mnist_client.images``, the same preparation the
client applies to served images, so training and serving never see differently
prepared inputs. Hard errors refuse the whole batch and write nothing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client.images import InputError, as_digit_batch, prepare_digit, read_image
from storage.datasets import QUARANTINE, SOURCE_PATTERN, DatasetStore, Examples, example_hashes, split_of
from storage.errors import MnistError
from storage.s3 import StoreError
from tasks.digits import ink_statistics
from tasks.results import Ingested, ValidationReport
from tasks.screen import Calibration, Screened, screen

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
NEAR_EMPTY_INK = 0.01  # fraction of ink pixels below which a digit is near-empty
MAX_LISTED = 10  # problems named in a one-line error; the report keeps all


class IngestError(MnistError, ValueError):
    """The batch is refused; nothing was written. The message names files and reasons."""

    status = "INVALID_ARGUMENT"


class HeldForReview(IngestError):
    """Every example of the batch waits in quarantine: nothing became training data, nothing is lost."""


@dataclass
class Candidates:
    """What a source yields before validation: names, prepared uint8 digits, labels, read errors."""

    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # names of examples kept out of the validation and test slices: labels no trusted caller gave
    # may train, but never gate their own source
    train_only: set[str] = field(default_factory=set)

    def add_image(self, path: Path, label: Any, name: str | None = None) -> None:
        label_value = parse_label(label)
        if label_value is None:
            self.errors.append(f"{name or path}: label {label!r} is not a digit 0-9")
            return
        try:
            digit = read_image(path)
        except InputError as error:
            self.errors.append(str(error))
            return
        self.names.append(name or str(path))
        self.images.append(to_uint8(digit))
        self.labels.append(label_value)


def parse_label(value: Any) -> int | None:
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if str(number) == str(value).strip() and 0 <= number <= 9 else None


def to_uint8(digits: np.ndarray) -> np.ndarray:
    """Prepared float [.., 28, 28, 1] in [0,1] -> uint8 [.., 28, 28], how batches keep digits."""
    return np.clip(np.round(np.asarray(digits)[..., 0] * 255.0), 0, 255).astype(np.uint8)


# --- reading the three source formats ---------------------------------------------------
def read_folder(folder: Path) -> Candidates:
    found = Candidates()
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in subfolders if parse_label(p.name) is None]
    if unknown:
        found.errors.append(f"{folder}: sub-folders must be named 0-9, found {unknown[:MAX_LISTED]}")
    stray = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if stray:
        found.errors.append(f"{folder}: files outside the 0-9 sub-folders: {stray[:MAX_LISTED]}")
    for sub in subfolders:
        if parse_label(sub.name) is None:
            continue
        for path in sorted(sub.iterdir()):
            if path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                found.errors.append(f"{path}: not an image file (PNG, JPEG, BMP, GIF, WebP)")
                continue
            found.add_image(path, sub.name)
    return found


def read_csv(path: Path, allow_outside: bool = False) -> Candidates:
    """``path,label`` rows (a header row is allowed), paths relative to the CSV's folder and, unless
    ``allow_outside``, inside it: a CSV must not make any file of the machine training data."""
    found = Candidates()
    folder = path.parent.resolve()
    seen: set[str] = set()
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if rows and rows[0] and parse_label(rows[0][-1]) is None and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    for number, row in enumerate(rows, start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            found.errors.append(f"{path}:{number}: expected 'path,label', got {row}")
            continue
        relative, label = row[0].strip(), row[1]
        if relative in seen:
            found.errors.append(f"{path}:{number}: {relative} is listed twice")
            continue
        seen.add(relative)
        image_path = (path.parent / relative)
        if not allow_outside and not image_path.resolve().is_relative_to(folder):
            found.errors.append(f"{path}:{number}: {relative} is outside the CSV's folder {folder} "
                                "(--allow-paths-outside takes it)")
            continue
        if not image_path.is_file():
            found.errors.append(f"{path}:{number}: {relative} does not exist (the files disagree with the CSV)")
            continue
        found.add_image(image_path, label, f"{path.name}:{number}:{relative}")
    return found


def read_npz(path: Path) -> Candidates:
    """``x`` [N,28,28] or [N,28,28,1], uint8 or float in [0,1], and ``y`` [N] labels 0-9."""
    found = Candidates()
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise IngestError(f"{path}: needs arrays 'x' and 'y', found {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
    except (ValueError, OSError, EOFError) as error:
        raise IngestError(f"{path}: not a readable .npz file ({error})") from None
    try:
        digits = as_digit_batch(x, f"{path}: x")
    except InputError as error:
        raise IngestError(str(error)) from None
    if y.ndim != 1 or len(y) != len(digits):
        raise IngestError(f"{path}: y has shape {list(y.shape)}, expected [{len(digits)}] (one label per image)")
    for index, (digit, label) in enumerate(zip(to_uint8(digits), y.tolist())):
        value = parse_label(label)
        if value is None:
            found.errors.append(f"{path}[{index}]: label {label!r} is not a digit 0-9")
            continue
        found.names.append(f"{path}[{index}]")
        found.images.append(digit)
        found.labels.append(value)
    return found


def read_source(path: Path, allow_outside: bool = False) -> Candidates:
    if path.is_dir():
        return read_folder(path)
    if not path.is_file():
        raise IngestError(f"{path}: no such file or folder (give a folder of 0-9 sub-folders, a .csv or a .npz)")
    if path.suffix.lower() == ".csv":
        return read_csv(path, allow_outside)
    if path.suffix.lower() == ".npz":
        return read_npz(path)
    raise IngestError(f"{path}: unsupported source; give a folder of 0-9 sub-folders, a .csv or a .npz")


# --- validation -----------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """What a new batch is compared with: the base's statistics and the hashes it must not repeat."""

    label_distribution: np.ndarray
    ink_fraction: float
    box_area: float
    forbidden: dict[str, str]  # example hash -> where it already is ("MNIST test set", "dataset v3")


def mnist_reference(train_images: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray) -> Reference:
    """MNIST's digits may not come back as new ones: a test digit (as stored, or as prepared by the
    client's function) would leak the test set; a training digit in a new source's test slice would
    be scored after training on it."""
    prepared = to_uint8(np.stack([prepare_digit(image.astype(np.float32) / 255.0) for image in test_images]))
    forbidden = {digest: "MNIST's training set" for digest in example_hashes(train_images)}
    forbidden |= {digest: "MNIST's test set" for digest in example_hashes(test_images) + example_hashes(prepared)}
    stats = ink_statistics(test_images)
    return Reference(np.bincount(test_labels, minlength=10) / len(test_labels),
                     float(stats["ink_fraction"].mean()), float(stats["box_area"].mean()), forbidden)


def stacked(found: Candidates) -> np.ndarray:
    return np.stack(found.images) if found.images else np.zeros((0, 28, 28), np.uint8)


def validate(found: Candidates, reference: Reference, images: np.ndarray, hashes: list[str]) -> ValidationReport:
    """The validation report of ``found`` (stacked as ``images``, with their ``hashes``);
    ``errors`` refuse the batch, ``warnings`` are recorded."""
    errors = list(found.errors)
    if not found.images and not errors:
        errors.append("the batch has no examples")
    first_seen: dict[str, str] = {}
    for name, digest in zip(found.names, hashes):
        if digest in reference.forbidden:
            errors.append(f"{name}: exact duplicate of an example in {reference.forbidden[digest]}")
        elif digest in first_seen:
            errors.append(f"{name}: exact duplicate of {first_seen[digest]} in this batch")
        first_seen.setdefault(digest, name)
    warnings = []
    if len(images):
        stats = ink_statistics(images)
        distribution = np.bincount(found.labels, minlength=10) / len(found.labels)
        distance = 0.5 * float(np.abs(distribution - reference.label_distribution).sum())
        if len(images) >= 50 and distance > 0.3:
            warnings.append(f"label histogram far from the base's (total variation {distance:.2f} > 0.30)")
        for key, base in (("ink_fraction", reference.ink_fraction), ("box_area", reference.box_area)):
            mean = float(stats[key].mean())
            if base and abs(mean - base) / base > 0.5:
                warnings.append(f"mean {key.replace('_', ' ')} {mean:.3f} is far from the base's {base:.3f}")
        near_empty = [name for name, ink in zip(found.names, stats["ink_fraction"]) if ink < NEAR_EMPTY_INK]
        if near_empty:
            warnings.append(f"{len(near_empty)} near-empty images, e.g. {near_empty[:3]}")
    return ValidationReport(examples=len(images), errors=errors, warnings=warnings,
                            label_histogram=np.bincount(found.labels, minlength=10).tolist() if found.labels
                            else [0] * 10)


def refusal(report: ValidationReport) -> str:
    errors = report.errors
    more = f" (and {len(errors) - MAX_LISTED} more)" if len(errors) > MAX_LISTED else ""
    return f"batch refused, nothing written: {len(errors)} problem(s): " + "; ".join(errors[:MAX_LISTED]) + more


# --- the whole ingest ------------------------------------------------------------------
def without_duplicates(found: Candidates, forbidden: dict[str, str]) -> tuple[Candidates, list[str]]:
    """``found`` less its exact duplicates (of ``forbidden`` or earlier in itself), and what was left out.
    For feedback: served traffic repeats itself, and a repeat is no reason to refuse the rest."""
    kept, skipped, seen = Candidates(errors=list(found.errors), train_only=found.train_only), [], set()
    for name, image, label in zip(found.names, found.images, found.labels):
        digest = example_hashes(image[None])[0]
        if digest in forbidden or digest in seen:
            skipped.append(f"{name}: exact duplicate of an example in {forbidden.get(digest, 'this batch')}")
            continue
        seen.add(digest)
        kept.names.append(name)
        kept.images.append(image)
        kept.labels.append(label)
    return kept, skipped


def ingest(store: DatasetStore, source_path: Path, source: str, reference: Reference,
           details: dict[str, Any] | None = None, allow_outside: bool = False,
           screen_with: list[Calibration] | None = None) -> Ingested:
    """Validate, screen, split by hash and store a batch, then a new dataset version with it.
    Raises IngestError (nothing written) on any hard error. ``allow_outside``: a CSV may name
    files outside its own folder. ``screen_with``: the trusted models' calibrations; what they
    flag waits in quarantine (tasks/screen.py)."""
    check_source_name(source)
    added = ingest_candidates(store, read_source(source_path, allow_outside), source, reference,
                              {"origin": str(source_path), **(details or {})}, screen_with=screen_with)
    if added is None:  # only with skip_duplicates: a duplicate is an error here
        raise IngestError("batch refused, nothing written: every example is a known one")
    return added


def check_source_name(source: str) -> None:
    if not SOURCE_PATTERN.match(source):
        raise IngestError(f"source name {source!r}: use lower-case letters, digits, '.', '_' or '-' (max 63)")


def ingest_candidates(store: DatasetStore, found: Candidates, source: str, reference: Reference,
                      details: dict[str, Any], skip_duplicates: bool = False,
                      screen_with: list[Calibration] | None = None) -> Ingested | None:
    """The checks, screen, split and writes of ``ingest`` for examples already read. With
    ``skip_duplicates`` exact duplicates are left out (and listed in the result's ``skipped``)
    instead of refusing the batch; None when that leaves nothing to add. Raises HeldForReview
    when the screen holds every example."""
    check_source_name(source)
    latest = store.latest()
    known = {digest: f"dataset version {latest['version']}" for digest in store.known_hashes(latest)} if latest else {}
    forbidden = {**reference.forbidden, **known}
    skipped: list[str] = []
    if skip_duplicates:
        found, skipped = without_duplicates(found, forbidden)
        if skipped and not found.images and not found.errors:
            return None
    images = stacked(found)
    hashes = example_hashes(images)  # once: duplicates and the split both use them
    report = validate(found, replace(reference, forbidden=forbidden), images, hashes)
    if report.errors:
        raise IngestError(refusal(report))
    quarantine = None
    if screen_with is not None:
        screened = screen(images, np.array(found.labels), screen_with)
        if len(screened.waiting):
            quarantine = hold(store, found, images, screened, source, details)
            found, images, hashes = without_held(found, images, hashes, screened.waiting)
            if not found.images:
                raise HeldForReview(held_message(quarantine))
    splits = np.array([0 if name in found.train_only else split_of(digest)
                       for name, digest in zip(found.names, hashes)], dtype=np.uint8)
    batch = store.put_batch(Examples(images, np.array(found.labels, dtype=np.uint8), splits),
                            {"source": source, "validation": report.model_dump(), **details})
    new = set(hashes)

    def no_duplicates_added_meanwhile(batches: list[str]) -> None:
        """Another ingest's batch landed first: refuse ours if it repeats any of that batch's examples."""
        for digest in batches:
            if new & set(example_hashes(store.read_batch(digest).images)):
                raise IngestError(f"batch {batch['sha256'][:12]} repeats examples of batch {digest[:12]}, "
                                  "added by another ingest meanwhile; nothing was versioned")

    version = store.add_batch(batch["sha256"], {}, latest["batches"] if latest else [], no_duplicates_added_meanwhile)
    packed, warnings = pack_when_full(store, version)
    return Ingested(batch=batch, version=version, skipped=skipped, packed=packed, quarantine=quarantine,
                    report=report.model_copy(update={"warnings": [*report.warnings, *warnings]}))


# --- quarantine: what the screen holds back ----------------------------------------------
def hold(store: DatasetStore, found: Candidates, images: np.ndarray, screened: Screened, source: str,
         details: dict[str, Any]) -> dict[str, Any]:
    """The examples the screen holds, stored apart (no dataset version lists them) with the reason
    for each: they wait for an operator (``accept_held``, ``reject_held``)."""
    waiting = screened.waiting
    labels = np.array(found.labels, dtype=np.uint8)[waiting]
    reasons = [screened.reasons[i] or f"held with its batch: {screened.held}" for i in waiting]
    return store.put_batch(Examples(images[waiting], labels, np.zeros(len(waiting), np.uint8)),
                           {"source": source, "names": [found.names[i] for i in waiting], "reasons": reasons,
                            "held": screened.held, "screened_with": screened.checked_with,
                            "batch_examples": len(found.names), **details}, folder=QUARANTINE)


def without_held(found: Candidates, images: np.ndarray, hashes: list[str], waiting: np.ndarray
                 ) -> tuple[Candidates, np.ndarray, list[str]]:
    keep = np.setdiff1d(np.arange(len(found.names)), waiting)
    kept = Candidates(names=[found.names[i] for i in keep], images=[found.images[i] for i in keep],
                      labels=[found.labels[i] for i in keep], train_only=found.train_only)
    return kept, images[keep], [hashes[i] for i in keep]


def held_message(quarantine: dict[str, Any]) -> str:
    why = quarantine["held"] or quarantine["reasons"][0]
    return (f"nothing added: all {quarantine['count']} examples wait in quarantine {quarantine['sha256'][:12]} "
            f"({why}); mnist data quarantine lists them, mnist data accept or reject decides")


def pending_held(store: DatasetStore, digest: str) -> tuple[dict[str, Any], list[int]]:
    """A held batch's manifest and the indices of its examples no operator decided on yet."""
    manifest = store.quarantine_manifest(digest)
    decided = store.decisions(digest)
    return manifest, [i for i in range(manifest["count"]) if i not in decided]


def chosen(pending: list[int], examples: list[int] | None, digest: str) -> list[int]:
    if examples is None:
        return pending
    unknown = sorted(set(examples) - set(pending))
    if unknown:
        raise IngestError(f"held batch {digest[:12]}: example(s) {unknown[:MAX_LISTED]} are not pending "
                          f"(pending: {len(pending)}, numbered from 0)")
    return sorted(set(examples))


def accept_held(store: DatasetStore, digest: str, reference: Reference, operator: str,
                examples: list[int] | None = None) -> Ingested | None:
    """An operator's acceptance: the chosen pending examples (all by default) become a batch of
    their source, unscreened, then the decision is recorded. Accepting again after a crash in
    between adds nothing twice (exact duplicates are left out)."""
    manifest, pending = pending_held(store, digest)
    picked = chosen(pending, examples, digest)
    if not picked:
        raise IngestError(f"held batch {digest[:12]}: nothing pending to accept")
    held = store.read_batch(digest, manifest, folder=QUARANTINE)
    listed = manifest.get("names")
    names: list[Any] = listed if isinstance(listed, list) else []
    found = Candidates(names=[str(names[i]) if i < len(names) else f"{digest[:12]}[{i}]" for i in picked],
                       images=[held.images[i] for i in picked], labels=[int(held.labels[i]) for i in picked])
    source = str(manifest.get("source"))
    result = ingest_candidates(store, found, source, reference,
                               {"origin": f"quarantine {digest[:12]}, accepted by {operator}"}, skip_duplicates=True)
    store.decide_quarantined(digest, "accept", picked, {"by": operator,
                                                        "batch": result.batch["sha256"] if result else None})
    return result


def reject_held(store: DatasetStore, digest: str, operator: str, examples: list[int] | None = None) -> int:
    """An operator's rejection: the chosen pending examples never train. Returns how many."""
    _, pending = pending_held(store, digest)
    picked = chosen(pending, examples, digest)
    if picked:
        store.decide_quarantined(digest, "reject", picked, {"by": operator})
    return len(picked)


def pack_when_full(store: DatasetStore, version: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Once small batches add up to a whole pack, pack them (``DatasetStore.compact``); the packs
    made, and a warning when that failed. The version is written already: the next ingest tries again."""
    try:
        return [pack["sha256"] for pack in store.compact(version, full_only=True)], []
    except StoreError as error:
        return [], [f"small batches not packed this time: {error}"]


def rescreen_held(store: DatasetStore, digest: str, reference: Reference, calibrations: list[Calibration]
                  ) -> tuple[int, int]:
    """A held batch's pending examples screened again (once a trusted model exists, or a new one
    serves): what passes is accepted in the screen's name, the rest keeps waiting. (added, waiting)"""
    manifest, pending = pending_held(store, digest)
    if not pending:
        return 0, 0
    held = store.read_batch(digest, manifest, folder=QUARANTINE)
    screened = screen(held.images[pending], held.labels[pending], calibrations)
    still = set(screened.waiting.tolist())
    passing = [index for position, index in enumerate(pending) if position not in still]
    if passing:
        accept_held(store, digest, reference, f"the screen ({', '.join(screened.checked_with)})", passing)
    return len(passing), len(pending) - len(passing)
