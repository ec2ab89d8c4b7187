"""A publish or a sync whose S3 calls of one kind are reported and slowed, run as
a child process so a test can SIGKILL it between any two calls:

    python -m tests.slowed_store publish SAVED_MODEL_DIR
    python -m tests.slowed_store sync MODEL_BASE_PATH
    python -m tests.slowed_store ingest SOURCE
    python -m tests.slowed_store compact PACK_EXAMPLES
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from serving.sync import sync_once
from storage.models import ModelStore
from storage.settings import StoreSettings


def report_and_slow(store, method: str, delay: float) -> None:
    real = getattr(store.client, method)

    def reporting(**kwargs):
        result = real(**kwargs)
        print(method, kwargs["Key"], flush=True)
        time.sleep(delay)
        return result

    setattr(store.client, method, reporting)


if __name__ == "__main__":
    action, path = sys.argv[1], Path(sys.argv[2])
    store = ModelStore(StoreSettings())
    if action == "ingest":
        import numpy as np

        from storage.datasets import DatasetStore
        from storage.settings import DatasetSettings
        from tasks.ingest import Reference, ingest

        datasets = DatasetStore(DatasetSettings())
        report_and_slow(datasets, "put_object", 0.2)
        ingest(datasets, path, "killed", Reference(np.full(10, 0.1), 0.16, 300.0, {}))
    elif action == "compact":
        from storage.datasets import DatasetStore
        from storage.settings import DatasetSettings

        datasets = DatasetStore(DatasetSettings())
        report_and_slow(datasets, "put_object", 0.2)
        datasets.compact(datasets.latest(), int(sys.argv[2]))
    elif action == "publish":
        report_and_slow(store, "put_object", 0.2)
        store.publish(path, {"flow_run_id": "killed"})
    else:
        report_and_slow(store, "get_object", 0.3)
        sync_once(store, path)
    print("done", flush=True)
