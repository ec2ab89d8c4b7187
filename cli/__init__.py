"""The ``mnist`` command: thin adapters over flows, tasks, storage and serving."""
