"""Every code snippet in the README and docs/ is checked, so none can rot: the ones a reader pastes
against a running stack (the light client, the feedback set-up) run for real against one; every
other shell line is checked for what it names: an mnist command that parses, a make target, a
deployment and parameter that exist, or a tool this machine has no cluster for, named below."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import httpx
import pytest
import yaml

from tests.conftest import REPO, stack_addresses

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<language>\w*)\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
# Tools whose snippets need what this machine lacks; each line of theirs is still read, and a tool
# not in this table (or below) fails the test until someone says how its line is checked.
NOT_RUN_HERE = {
    "kubectl": "no Kubernetes cluster here: the manifests it applies are validated against the API schema",
    "helm": "no Kubernetes cluster here",
    "docker": "no Docker daemon here: the compose file and images are validated in tests/test_kubernetes.py",
    "pip": "installs from a git host or a wheel: the Makefile's own install is tested",
    "openssl": "key generation for signing, a standard command",
    "bazel": "TF Serving's own build, described for reference",
}
SHELL_BUILTINS = {"cd", "echo", "export", "sleep", "mkdir", "cp", "ln", "rm", "cat", "awk", "curl", "python", "git",
                  "tar", "install", "touch", "grep", "for", "do", "done", "then", "fi", "if"}


class Snippet(NamedTuple):
    where: str
    language: str
    code: str


def snippets() -> list[Snippet]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in FENCE.finditer(text):
            indent = len(match["indent"])
            body = "\n".join(line[indent:] for line in match["body"].splitlines())
            line = text[:match.start()].count("\n") + 1
            found.append(Snippet(f"{document.relative_to(REPO)}:{line}", match["language"], body))
    return found


def shell_commands(code: str) -> Iterator[list[str]]:
    """Each simple command of a shell snippet as its words: continuation lines joined, comments,
    assignments before a command and the command substitutions' insides left to their own check."""
    joined = re.sub(r"\\\n\s*", " ", code)
    joined = re.sub(r"<[A-Za-z][\w ./|-]*>", "placeholder", joined)  # <gateway>: the reader's own value
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        redirected = False
        for word in lexer:
            if word in {">>", ">", "<", "2>", "&>"}:
                redirected = True  # the next word is a file, not a command
            elif word in {"&&", "||", ";", "|", "&", "(", ")"}:
                if words:
                    yield words
                words = []
            elif redirected:
                redirected = False
            else:
                words.append(word)
        if words:
            yield words


def without_assignments(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (REPO / "Makefile").read_text(), re.M))


def deployments() -> set[str]:
    from flows.deploy import PREFECT_FILES, flow_name

    names = set()
    for file in PREFECT_FILES.values():
        for deployment in yaml.safe_load((REPO / file).read_text())["deployments"]:
            names.add(f"{flow_name(deployment['entrypoint'], REPO)}/{deployment['name']}")
    return names


def check_mnist_command(words: list[str]) -> None:
    from cli.app import build_parser

    try:
        build_parser().parse_args(words[1:])
    except SystemExit as refused:
        raise AssertionError(f"{shlex.join(words)}: the mnist command refuses it") from refused


def check_prefect_command(words: list[str]) -> None:
    from flows.deploy import POOL_TYPES
    from flows.training import training_flow

    if words[1:3] == ["worker", "start"]:
        pool = words[words.index("--pool") + 1]
        assert pool in POOL_TYPES, f"{shlex.join(words)}: no deployment names the pool {pool}"
        return
    assert words[1:3] == ["deployment", "run"], shlex.join(words)
    assert words[3] in deployments(), f"{words[3]} is no deployment of prefect*.yaml"
    for at, word in enumerate(words):
        if word == "--param":
            name = words[at + 1].split("=", 1)[0]
            assert name in training_flow.parameters.properties, f"--param {name}: the training flow has no such"


def check_line(snippet: Snippet, words: list[str]) -> None:
    words = without_assignments(words)
    if words[:1] == ["sudo"]:
        words = words[1:]
    if not words:
        return
    tool = Path(words[0]).name
    if tool == "mnist":
        check_mnist_command(words)
    elif tool == "make":
        assert set(w for w in words[1:] if "=" not in w) <= make_targets(), f"{snippet.where}: {shlex.join(words)}"
    elif tool == "prefect":
        check_prefect_command(words)
    elif tool in NOT_RUN_HERE or tool in SHELL_BUILTINS or words[0].startswith(("$", "./", "/")):
        return
    else:
        raise AssertionError(f"{snippet.where}: '{tool}' is neither run nor checked by this test; say how in it")


RUN_FOR_REAL = {"docs/serving.md": "from mnist_client import predict", "docs/feedback-loop.md": "feedback-tokens"}


def test_every_shell_line_names_what_exists() -> None:
    shell = [s for s in snippets() if s.language == "bash"]
    assert len(shell) >= 10, [s.where for s in shell]
    for snippet in shell:
        for words in shell_commands(snippet.code):
            check_line(snippet, words)


def test_the_checks_see_a_wrong_flag_a_missing_target_and_an_unknown_tool() -> None:
    where = Snippet("docs/x.md:1", "bash", "")
    for wrong in ("mnist predict --no-such-flag", "make no-such-target", "terraform apply",
                  ".venv/bin/prefect deployment run mnist-training/no-such"):
        with pytest.raises(AssertionError):
            for words in shell_commands(wrong):
                check_line(where, words)


def test_every_fenced_block_says_its_language_or_is_plain_text() -> None:
    """A block with no language is output, a layout or a usage line, never something to paste:
    a shell or Python block says so, and then one of the tests here reads it."""
    for snippet in snippets():
        assert snippet.language in {"", "bash", "python"}, snippet.where
        if snippet.language == "":
            first = snippet.code.lstrip().split(maxsplit=1)[0] if snippet.code.strip() else ""
            assert first not in {"make", "pip", "kubectl", "curl", "python", "from", "import"}, \
                f"{snippet.where}: code in a block without a language escapes the checks"


@pytest.fixture(scope="module")
def running_stack(s3_server, saved_model_dir: Path, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """make serve's stack as a reader has it: started in a directory of its own (state in .state
    there), with a published stable version."""
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    home = tmp_path_factory.mktemp("reader")
    env = {**os.environ, "MNIST_S3_ENDPOINT": s3_server.endpoint, "MNIST_S3_BUCKET": "docs-snippets",
           "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": "us-east-1",
           "MNIST_DATA_DIR": str(mnist_dir), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MNIST_STATE_DIR", None)
    pushed = subprocess.run([sys.executable, "-m", "cli", "registry", "push", str(saved_model_dir)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    process = subprocess.Popen([sys.executable, "-m", "cli", "up", "--port", "0", "--rest-api-port", "0"], cwd=home,
                               env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines: list[str] = []
    try:
        gateway, rest = stack_addresses(process, lines)
        deadline = time.monotonic() + 120
        while httpx.get(f"{rest}/v1/models/mnist/labels/stable/ready").status_code != 200:
            assert time.monotonic() < deadline, "stable never became ready"
            time.sleep(0.5)
        yield {"home": home, "env": env, "gateway": gateway, "rest": rest}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def only_snippet(document: str, marker: str, language: str) -> Snippet:
    [snippet] = [s for s in snippets() if s.where.startswith(document + ":") and marker in s.code
                 and s.language == language]
    return snippet


def test_the_light_client_snippet_runs_as_written(running_stack, prepared_path: Path) -> None:
    """docs/serving.md's Python, pasted into a service: its one placeholder (the address) pointed at
    the stack, its digit.png a real test digit."""
    from PIL import Image

    from tasks.data import load_test_set

    snippet = only_snippet("docs/serving.md", RUN_FOR_REAL["docs/serving.md"], "python")
    images, labels = load_test_set(prepared_path)
    Image.fromarray((images[0].squeeze() * 255).astype("uint8")).save(running_stack["home"] / "digit.png")
    code = snippet.code.replace("dns:///serving.internal:8500", running_stack["gateway"])
    assert code != snippet.code, "the snippet's address placeholder changed: update this test's substitution"
    ran = subprocess.run([sys.executable, "-c", code], cwd=running_stack["home"], env=running_stack["env"],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    digit, confidence, request_id = ran.stdout.split()
    assert int(digit) == int(labels[0]) and 0 < float(confidence) <= 1 and len(request_id) >= 16, ran.stdout


def test_the_feedback_set_up_runs_as_written(running_stack) -> None:
    """docs/feedback-loop.md's three steps in bash, in the directory of a running make serve: a new
    caller is let in without a restart and its label is taken. The one change: the stack's REST
    address for :8501 (and its gRPC one exported, as mnist up's banner says), as tests use free ports."""
    snippet = only_snippet("docs/feedback-loop.md", RUN_FOR_REAL["docs/feedback-loop.md"], "bash")
    code = snippet.code.replace("http://127.0.0.1:8501", running_stack["rest"])
    assert code != snippet.code, "the snippet's REST address changed: update this test's substitution"
    env = {**running_stack["env"], "MNIST_SERVING_ADDRESS": running_stack["gateway"]}  # as its banner says
    for _ in range(2):  # pasted twice, as people do: the caller is added once and still let in
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=running_stack["home"], env=env,
                             capture_output=True, text=True, timeout=180)
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
        answer = json.loads(ran.stdout.strip().splitlines()[-1])
        assert "error" not in answer and answer["label"] == 7 and answer["caller"] == "checkout-app", answer
    tokens = (running_stack["home"] / ".state" / "serving" / "feedback-tokens").read_text()
    assert len(re.findall(r"^checkout-app \S{24,}$", tokens, re.M)) == 1, tokens
