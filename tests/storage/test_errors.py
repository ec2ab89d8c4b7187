"""One error family: every exception class of the project is an MnistError, no builtin's name is
taken, and each transport maps the family's status in one place."""

from __future__ import annotations

import ast
import builtins
import importlib

import pytest

from storage.errors import HTTP_STATUS, MnistError, http_status
from tests.conftest import REPO

PACKAGES = ("cli", "flows", "tasks", "serving", "storage")


def exception_classes() -> list[tuple[str, str]]:
    """(module, class) of every class the packages define whose name says it is an error, or whose
    bases are exceptions."""
    found = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.bases:
                    found.append((module, node.name))
    return found


def test_every_exception_of_the_project_is_an_mnist_error_and_no_builtin_is_shadowed() -> None:
    outside, shadowing = [], []
    for module_name, name in exception_classes():
        if module_name.startswith(("cli.app", "cli.__main__")):
            continue  # importing cli.app sets the process up for a command
        value = getattr(importlib.import_module(module_name), name)
        if isinstance(value, type) and issubclass(value, BaseException):
            if not issubclass(value, MnistError):
                outside.append(f"{module_name}.{name}")
            if hasattr(builtins, name):
                shadowing.append(f"{module_name}.{name}")
    assert outside == [] and shadowing == []


def test_each_status_of_the_family_is_a_grpc_status_and_has_its_http_status() -> None:
    import grpc

    from serving.model_server.errors import RequestError, grpc_code

    names = {code.name for code in grpc.StatusCode}
    assert set(HTTP_STATUS) <= names
    for module_name, name in exception_classes():
        if module_name.startswith("cli.app"):
            continue
        value = getattr(importlib.import_module(module_name), name)
        if isinstance(value, type) and issubclass(value, MnistError):
            assert value.status in names, (name, value.status)
    refused = RequestError(grpc.StatusCode.NOT_FOUND, "no such version")
    assert (grpc_code(refused), refused.http_status) == (grpc.StatusCode.NOT_FOUND, 404)
    assert http_status("INTERNAL") == 500 and MnistError("x", status="UNAVAILABLE").http_status == 503
    assert MnistError("too large", http=413).http_status == 413


@pytest.mark.parametrize("error, status, http", [
    ("storage.models.VersionNotFound", "NOT_FOUND", 404),
    ("storage.s3.StoreError", "UNAVAILABLE", 503),
    ("storage.s3.StoreAccessDenied", "PERMISSION_DENIED", 403),
    ("tasks.data.DataError", "INVALID_ARGUMENT", 400),
])
def test_a_subclass_says_its_own_status(error: str, status: str, http: int) -> None:
    module, _, name = error.rpartition(".")
    raised = getattr(importlib.import_module(module), name)("said in one line")
    assert (raised.status, raised.http_status) == (status, http)


def test_a_feedback_refusal_for_an_unknown_request_is_not_found() -> None:
    from storage.feedback import FeedbackError

    assert (FeedbackError("no such request", http=404).status, FeedbackError("not a digit").http_status) == \
        ("NOT_FOUND", 400)
