"""Prefect flows (the tasks wired together), their parameters and settings, and their deployments.
The ``mnist`` command line is ``cli``."""
