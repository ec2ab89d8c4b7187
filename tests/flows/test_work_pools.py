"""The Kubernetes and Docker deployments of the weekly retrain, without a cluster or a Docker engine:
the Kubernetes Job the pool's own job template renders for our job variables validates against the
pinned Kubernetes API schema, and the Docker deployment runs the image this repository builds."""

from __future__ import annotations

import asyncio
import re
import uuid

import kubernetes_validate
import pytest
import yaml

from flows.deploy import POOL_TYPES, PREFECT_FILES, S3_SECRET, base_job_template, deployments_for
from tests.conftest import REPO
from tests.serving.deploy.test_kubernetes import KUBERNETES_VERSION

CONFIGS = {kind: yaml.safe_load((REPO / name).read_text()) for kind, name in PREFECT_FILES.items()}
CONFIG = {**CONFIGS["process"], "deployments": [d for config in CONFIGS.values() for d in config["deployments"]]}


def only(pool_type: str) -> dict:
    [deployment] = [d for d in deployments_for(CONFIGS[pool_type], pool_type)["deployments"]
                    if d["entrypoint"].startswith("flows/training.py")]
    return deployment


def test_each_kind_of_pool_gets_the_same_retrain_and_nothing_is_scheduled_twice() -> None:
    process, kubernetes, docker = only("process"), only("kubernetes"), only("docker")
    for other in (kubernetes, docker):
        assert other["schedules"] == process["schedules"]
        assert other["work_pool"]["work_queue_name"] == process["work_pool"]["work_queue_name"] == "training"
        assert other["parameters"] == process["parameters"]
        assert other["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
    assert {d["work_pool"]["name"] for d in CONFIG["deployments"]} <= set(POOL_TYPES)
    for pool_type in ("process", "kubernetes", "docker"):  # one deploy, one kind: the retrain scheduled once
        names = [d["name"] for d in deployments_for(CONFIG, pool_type)["deployments"]]
        assert sum(d["entrypoint"].startswith("flows/training.py") for d in deployments_for(
            CONFIG, pool_type)["deployments"]) == 1, names


def test_the_rendered_kubernetes_job_validates_and_reads_s3_from_the_secret(prefect_api) -> None:
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    variables = only("kubernetes")["work_pool"]["job_variables"]
    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        base_job_template("kubernetes"), variables))
    configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="brave-otter"))
    job = configuration.job_manifest
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == variables["image"] and job["metadata"]["namespace"] == "mnist"
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "6Gi"}
    assert container["resources"]["limits"]["memory"] == "8Gi"
    assert container["envFrom"] == [{"secretRef": {"name": S3_SECRET}}]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["MNIST_S3_ENDPOINT"] and not any(name.startswith("AWS_SECRET") for name in env)
    assert container["args"][:3] == ["prefect", "flow-run", "execute"]  # the image has no entrypoint to get in the way
    broken = {**job, "spec": {**job["spec"], "backoffLimit": "six"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_docker_deployment_runs_the_image_the_repository_builds() -> None:
    from prefect_docker.worker import DockerWorker

    variables = only("docker")["work_pool"]["job_variables"]
    built = re.search(r"^IMAGE \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    assert variables["image"] == built
    dockerfile = (REPO / "serving" / "deploy" / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "ENTRYPOINT" not in dockerfile
    assert "FROM source AS trainer" in dockerfile and '".[trainer]"' in dockerfile
    assert set(variables) <= set(DockerWorker.get_default_base_job_template()["variables"]["properties"])
    assert variables["mem_limit"] and variables["container_create_kwargs"]["nano_cpus"] > 0
    assert variables["volumes"] == ["/etc/mnist/aws:/root/.aws:ro"] and variables["env"]["AWS_PROFILE"] == "mnist"
    assert not any(name.startswith("AWS_SECRET") or name == "AWS_ACCESS_KEY_ID" for name in variables["env"])


def test_the_dockerfile_copies_every_package_and_the_sidecar_image_leaves_tensorflow_out() -> None:
    """No docker engine runs here: the Dockerfile is read as docker would. Every package that
    pyproject.toml ships is copied (a package left out breaks the mnist command in both images), and
    the sidecar stage installs the project without the [trainer] extra, which alone brings
    TensorFlow and Prefect."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dockerfile = (REPO / "serving" / "deploy" / "Dockerfile").read_text()
    shipped = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile, re.M))
    assert shipped <= copied and all((REPO / name).is_dir() for name in copied)
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S))
    assert set(stages) == {"source", "sidecar", "trainer"}
    assert "pip install --no-cache-dir ./clients/python .\n" in stages["sidecar"]
    heavy = ("tensorflow", "prefect")
    base = project["project"]["dependencies"]
    assert not [d for d in base if d.startswith(heavy)], "the base install (the sidecar image) must stay TF-free"
    assert {d.split("=")[0].split(">")[0] for d in project["project"]["optional-dependencies"]["trainer"]} >= {
        "tensorflow", "tensorflow-serving-api", "prefect"}
