"""One settings module: every ``MNIST_*`` variable is a field of ``storage/settings.py``, the docs'
table is rendered from it, and no other module reads the environment."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from storage.settings import TABLE_START, settings_rows, settings_table, with_table
from tests.conftest import REPO

PACKAGES = ("cli", "flows", "tasks", "serving", "storage", "clients")
# names that look like settings but are not: an internal variable a parent sets for its child, and a
# constant of digests
NOT_SETTINGS = {"MNIST_DIE_WITH_PARENT", "MNIST_SHA256"}


def test_the_docs_table_is_the_one_the_settings_render() -> None:
    document = (REPO / "docs" / "operations.md").read_text()
    assert TABLE_START in document
    assert with_table(document) == document, "render it again: python -m storage.settings docs/operations.md"
    assert settings_table().count("\n") == len(settings_rows()) + 2


def test_every_mnist_variable_named_anywhere_is_a_setting() -> None:
    known = {variable.strip("`") for variable, _, _ in settings_rows()}
    files = [*REPO.glob("docs/*.md"), REPO / "README.md", REPO / "Makefile", *REPO.glob("prefect*.yaml"),
             *(REPO / "serving" / "deploy").rglob("*.y*ml"),
             *(path for package in PACKAGES for path in (REPO / package).rglob("*.py")
               if "_generated" not in path.parts)]
    named = {(name, path.relative_to(REPO).as_posix()) for path in files
             for name in re.findall(r"\bMNIST_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())}
    unknown = sorted((name, where) for name, where in named if name not in known | NOT_SETTINGS)
    assert unknown == [], "a variable no settings class reads (add it to storage/settings.py)"


def environment_reads(tree: ast.AST) -> list[int]:
    """Lines that read ``os.environ`` or ``os.getenv`` (a write, ``os.environ[name] = ...``, is not one)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "getenv", "getenvb"):
            lines.append(node.lineno)
    writes = {node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assign)
              for target in node.targets if isinstance(target, ast.Subscript)
              and ast.unparse(target.value) == "os.environ"}
    setdefaults = {node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and ast.unparse(node.func) == "os.environ.setdefault"}
    return sorted(set(lines) - writes - setdefaults)


def test_no_module_but_the_settings_reads_the_environment() -> None:
    readers = [f"{path.relative_to(REPO)}:{line}" for package in PACKAGES for path in (REPO / package).rglob("*.py")
               if "_generated" not in path.parts and path != REPO / "storage" / "settings.py"
               for line in environment_reads(ast.parse(path.read_text()))]
    assert readers == [], "read it through storage/settings.py"


def test_the_reader_check_sees_a_read_and_lets_a_write_pass(tmp_path: Path) -> None:
    source = ("import os\nos.environ['A'] = '1'\nos.environ.setdefault('B', '2')\nx = os.environ.get('C')\n"
              "y = os.getenv('D')\nz = 'E' in os.environ\n")
    assert environment_reads(ast.parse(source)) == [4, 5, 6]
