"""Prefect flows and the ``mnist`` command line."""
