"""``python -m cli``: the ``mnist`` command."""

from cli.app import run

run()
