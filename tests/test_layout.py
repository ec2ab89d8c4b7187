"""The layout is the deployment: one package per running process, imports that point down only, and
sidecars that run where TensorFlow and Prefect cannot be imported."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from storage.embedded import free_port
from tests.conftest import REPO, start_model_server

CLIENT = REPO / "clients" / "python"
PACKAGES = ("cli", "flows", "tasks", "serving", "storage")
# higher imports lower, never the other way round
RANK = {"cli": 5, "flows": 4, "tasks": 3, "serving": 2, "storage": 1, "mnist_client": 0}
# inside serving/: what each process's package must never import
SERVING_FORBIDDEN = {
    "serving.protocol": ("serving.model_server", "serving.gateway", "serving.sync", "serving.stack", "serving.truth"),
    "serving.gateway": ("serving.model_server", "serving.sync", "serving.stack"),
    "serving.sync": ("serving.model_server", "serving.gateway", "serving.stack"),
    "serving.model_server": ("serving.gateway", "serving.sync", "serving.stack"),
}
# where TensorFlow and Prefect must be unimportable, for the sidecar entry points below
BLOCKED = ("tensorflow", "tensorflow_serving", "keras", "prefect", "prefect_dask")
WITHOUT_HEAVY_IMPORTS = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed beside a sidecar")
sys.meta_path.insert(0, Refuse())
sys.argv[0] = "mnist"
from cli.app import run
run()
"""


def project_modules() -> dict[str, Path]:
    modules = {}
    for root, base in [(REPO, package) for package in PACKAGES] + [(CLIENT, "mnist_client")]:
        for path in (root / base).rglob("*.py"):
            if "_generated" in path.parts:
                continue
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports, function-local imports included (they hide circles too)."""
    modules = project_modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)  # a module's own package __init__ is not an arrow
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in list(edges):
        if module not in index:
            visit(module)
    return found


def test_no_module_takes_part_in_an_import_circle() -> None:
    assert circles(import_graph()) == []


def wrong_arrows(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        for target in sorted(targets):
            if RANK[target.partition(".")[0]] > RANK[module.partition(".")[0]]:
                wrong.append(f"{module} -> {target} (upward)")
            for package, forbidden in SERVING_FORBIDDEN.items():
                if (module == package or module.startswith(package + ".")) and target.startswith(forbidden):
                    wrong.append(f"{module} -> {target} (another process's package)")
    return wrong


def test_imports_point_down_the_layers_and_processes_stay_apart() -> None:
    assert wrong_arrows(import_graph()) == []


def test_only_the_client_reads_its_generated_stubs_the_rest_use_mnist_client_protos() -> None:
    outside = [path for package in PACKAGES + ("bench", "tests") for path in (REPO / package).rglob("*.py")]
    reaching_in = [f"{path.relative_to(REPO)}:{number}" for path in outside
                   for number, line in enumerate(path.read_text().splitlines(), 1)
                   if line.lstrip().startswith(("from mnist_client._generated", "import mnist_client._generated"))]
    assert reaching_in == [], "import from mnist_client.protos instead"


def test_the_graph_checks_see_a_circle_an_upward_arrow_and_a_crossing() -> None:
    """The two checks above can fail, on a graph with each defect the layout once had."""
    edges = {"storage.models": {"storage.signing"}, "storage.signing": {"storage.models"},
             "serving.gateway.server": {"tasks.feedback", "serving.model_server.tensors", "serving.protocol.http"}}
    assert circles(edges) == [["storage.models", "storage.signing"]]
    assert wrong_arrows(edges) == ["serving.gateway.server -> serving.model_server.tensors (another process's package)",
                                   "serving.gateway.server -> tasks.feedback (upward)"]


def sidecar(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WITHOUT_HEAVY_IMPORTS, *args], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_process_that_imports_tensorflow_fails_under_the_boundary(store_env) -> None:
    """The guard is real: the model server's entry point, which needs TensorFlow, cannot start."""
    process = sidecar("serve", "--port", str(free_port()), "--model_base_path", "/nonexistent", env=store_env)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "is not installed beside a sidecar" in output, output


def test_the_sync_and_the_gateway_run_without_tensorflow_or_prefect(store_env, store, saved_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    from mnist_client.client import Target, predict_call
    from serving.sync import local_versions

    store.publish(saved_model_dir, {"flow_run_id": "layout-test"})
    store.set_label("stable", 1)
    base = tmp_path / "models" / "mnist"
    sync = sidecar("sync", "--model-base-path", str(base), env=store_env)
    output, _ = sync.communicate(timeout=120)
    assert sync.returncode == 0 and local_versions(base) == [1], output

    server, address = start_model_server(base)
    port = free_port()
    gateway = sidecar("gateway", "--upstream", address, "--port", str(port), "--log-flush-seconds", "600",
                      env=store_env)
    try:
        first = gateway.stdout.readline()
        assert "listening on" in first, first + gateway.stdout.read()
        import numpy as np

        answer = predict_call(np.zeros((1, 28, 28, 1), np.float32), Target(f"127.0.0.1:{port}"))
        assert answer.version == 1
        gateway.send_signal(signal.SIGTERM)
        output, _ = gateway.communicate(timeout=60)
    finally:
        if gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait(timeout=30)
        gateway.stdout.close()
        server.stop()
    assert gateway.returncode == 0 and "1 records written" in output, output


@pytest.mark.parametrize("module", ["serving.sync", "serving.gateway.server", "serving.protocol.monitoring"])
def test_sidecar_modules_are_free_of_tensorflow_at_import(module: str) -> None:
    code = WITHOUT_HEAVY_IMPORTS.replace("from cli.app import run\nrun()", f"import {module}")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_readme_is_short_and_its_folder_map_matches_the_tree() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 220 and readme.index("## Two commands") < 1500
    block = readme.split("## How it is built", 1)[1].split("```")[1]
    named = [line.split()[0] for line in block.splitlines() if line and not line.startswith(" ")]
    assert all((REPO / path).exists() for path in named), [path for path in named if not (REPO / path).exists()]
    packages = {path.parent.relative_to(REPO).as_posix() + "/" for path in REPO.glob("*/__init__.py")}
    packages |= {path.parent.relative_to(REPO).as_posix() + "/" for path in REPO.glob("serving/*/__init__.py")}
    assert packages - {"tests/", "serving/"} <= set(named), sorted(packages - set(named))  # serving/: by its parts


def test_the_test_tree_mirrors_the_packages() -> None:
    """tests/<package path>/test_*.py beside what they test (as MLServer's tests); only the checks
    of the whole project (layout, install, docs) sit at the top."""
    tests = REPO / "tests"
    misplaced = [path.relative_to(tests).as_posix() for path in tests.rglob("test_*.py")
                 if not (REPO / path.parent.relative_to(tests)).is_dir() or path.parent == tests
                 and path.name not in ("test_layout.py", "test_install.py", "test_docs_snippets.py")]
    assert misplaced == []
