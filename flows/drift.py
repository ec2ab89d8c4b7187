"""The drift flow: the last window of logged traffic against the reference statistics of the
version that answered it; a report artifact with plots, and ``mnist.drift.detected`` when a
statistic drifts (the retrain-on-drift automation listens for it). Wiring only: the work is
``tasks.drift``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.states import Completed, State

from flows.params import DriftParams
from storage.settings import PipelineSettings
from tasks.results import DriftRun, DriftVerdict


@task(name="collect-traffic", timeout_seconds=1800)
def collect_traffic(window_hours: float, run_dir: str) -> dict[int, str]:
    """The window's logged traffic, summarised per version that answered as it is read (counts,
    and a bounded sample of per-image statistics: ``tasks.drift.TrafficSummary``), one .npz each."""
    from storage.live_check import FirstLiveChecks, key_note, live_check_key
    from storage.logs import PredictionLogStore
    from storage.settings import TrafficSettings
    from tasks.drift import served_traffic

    since = datetime.now(timezone.utc) - timedelta(hours=window_hours)
    settings = TrafficSettings()
    live_checks = FirstLiveChecks(live_check_key(settings))
    paths, counts = {}, {}
    for version, summary in served_traffic(PredictionLogStore(settings).window(since), live_checks).items():
        path = Path(run_dir) / f"traffic-v{version}.npz"
        arrays: dict[str, Any] = summary.arrays()
        np.savez_compressed(path, **arrays)
        paths[version], counts[version] = str(path), int(arrays["count"])
    get_run_logger().info("logged traffic since %s: %s; %s, %d left out", since.isoformat(timespec="seconds"),
                          counts or "none", key_note(live_checks.key), len(live_checks.seen))
    return paths


@task(name="version-reference")
def version_reference(version: int) -> dict[str, Any] | None:
    """The reference statistics published with a version (verified against its manifest), or None."""
    import json

    from storage.models import ModelStore, check_entry
    from storage.settings import StoreSettings
    from tasks.drift import REFERENCE_FILE, checked_reference

    store = ModelStore(StoreSettings())
    manifest = store.manifest(version)
    entry = manifest.get("files", {}).get(REFERENCE_FILE)
    if entry is None:
        return None
    check_entry(version, REFERENCE_FILE, entry)
    raw = store.fetch_verified(store.key(version, REFERENCE_FILE), entry, f"version {version}: {REFERENCE_FILE}")
    return checked_reference(json.loads(raw))


@task(name="compare-traffic")
def compare_traffic(version: int, traffic_path: str, reference: dict[str, Any], params: DriftParams,
                    run_dir: str) -> tuple[DriftVerdict, str | None]:
    """The version's verdict and, when there was enough traffic, its plot (embedded PNG)."""
    from tasks.drift import DriftThresholds, compare, plot_drift
    from tasks.report import embedded_png

    with np.load(traffic_path) as stored:
        traffic = dict(stored)
    thresholds = DriftThresholds(params.alpha, params.min_effect, params.min_requests)
    result = compare(reference, traffic, thresholds)
    if not result.scores:
        return result, None
    plot = plot_drift(reference, traffic, Path(run_dir) / f"drift-v{version}.png",
                      f"version {version}: reference ({reference['source']}) against served traffic")
    return result, embedded_png(plot)


def drift_event(version: int, result: DriftVerdict, window_hours: float) -> None:
    from storage.models import ModelStore
    from storage.settings import StoreSettings
    from tasks.publish import model_resource

    scores = {name: {"statistic": round(score.statistic, 4), "p_value": score.p_value}
              for name, score in result.scores.items()}
    emit_event("mnist.drift.detected", resource=model_resource(ModelStore(StoreSettings()), version),
               payload={"version": version, "drifted": result.drifted, "scores": scores,
                        "images": result.images, "window_hours": window_hours})


@flow(name="mnist-drift", log_prints=True, validate_parameters=True)
def drift_flow(params: DriftParams = DriftParams()) -> State:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = PipelineSettings().output_dir / "drift" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    traffic = collect_traffic(params.window_hours, str(run_dir))
    results: dict[int, DriftVerdict] = {}
    plots: dict[int, str] = {}
    notes: list[str] = []
    for version, path in sorted(traffic.items()):
        reference = version_reference(version)
        if reference is None:
            notes.append(f"version {version} has no reference statistics (published before they were kept)")
            continue
        results[version], plot = compare_traffic(version, path, reference, params, str(run_dir))
        if plot:
            plots[version] = plot
    window = f"last {params.window_hours:g} h, alpha {params.alpha:g}, min effect {params.min_effect:g}"
    if not traffic:
        notes.append(f"no logged requests in the {window.split(',')[0]}: not enough data")
    from tasks.drift import drift_markdown

    create_markdown_artifact(drift_markdown(results, window, plots, notes), key="mnist-drift",
                             description="Served traffic against each version's reference statistics")
    drifted = {version: result for version, result in results.items() if result.verdict == "drift"}
    for version, result in drifted.items():
        drift_event(version, result, params.window_hours)
    summary = "; ".join(f"version {v}: {r.verdict}" + (f" ({', '.join(r.drifted)})" if r.drifted else "")
                        for v, r in sorted(results.items())) or "not enough data: no logged traffic with a reference"
    return Completed(message=summary, data=DriftRun(results=results, notes=notes, report_dir=str(run_dir)))
