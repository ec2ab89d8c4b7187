"""The rollback flow: point a label (``stable`` by default) back at its previous good version."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from tasks.publish import rollback_label
from tasks.results import LabelMoved


@flow(name="mnist-rollback", log_prints=True, validate_parameters=True)
def rollback_flow(label: Literal["stable", "canary"] = "stable") -> LabelMoved:
    return rollback_label(label, str(flow_run.id) if flow_run.id else None)
