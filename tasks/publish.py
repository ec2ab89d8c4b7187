"""Publish stage: push a gated SavedModel to the S3 model store and label it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact

from serving.registry import ModelStore, StoreSettings

METRIC_KEYS = ("test_accuracy", "test_loss", "per_class_accuracy")


def manifest_metadata(metrics: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """What a version's manifest says about where it came from (never credentials)."""
    return {"metrics": {key: metrics[key] for key in METRIC_KEYS}, **lineage}


def publish_model(store: ModelStore, saved_model: Path, metrics: dict[str, Any], lineage: dict[str, Any],
                  label: str) -> dict[str, Any]:
    manifest = store.publish(saved_model, manifest_metadata(metrics, lineage))
    event = {"version": manifest["version"], "flow_run_id": lineage.get("flow_run_id"),
             "metrics": manifest["metrics"]}
    store.record({"event": "published", **event})
    store.set_label(label, manifest["version"], {"flow_run_id": lineage.get("flow_run_id")})
    return {"version": manifest["version"], "uri": manifest["uri"], "label": label}


@task(name="publish", timeout_seconds=900)
def publish(saved_model: str, metrics: dict[str, Any], lineage: dict[str, Any], label: str) -> dict[str, Any]:
    store = ModelStore(StoreSettings())
    published = publish_model(store, Path(saved_model), metrics, lineage, label)
    get_run_logger().info("published %s as version %d, labelled %s", published["uri"], published["version"], label)
    create_link_artifact(key="mnist-published-version", link=published["uri"],
                         link_text=f"{published['uri']} ({label})", description="Published model version")
    return published


@task(name="record-rejection")
def record_rejection(reason: str, metrics: dict[str, Any], lineage: dict[str, Any]) -> None:
    """Rejections go into the registry history too: it answers what was tried, not only what shipped."""
    ModelStore(StoreSettings()).record({"event": "rejected", "reason": reason,
                                        "flow_run_id": lineage.get("flow_run_id"),
                                        "metrics": {key: metrics[key] for key in METRIC_KEYS}})


@task(name="rollback", retries=2, retry_delay_seconds=5)
def rollback_label(label: str, flow_run_id: str | None) -> dict[str, int]:
    previous, current = ModelStore(StoreSettings()).rollback(label, {"flow_run_id": flow_run_id})
    get_run_logger().info("%s moved back from version %d to version %d", label, previous, current)
    return {"from": previous, "to": current}
