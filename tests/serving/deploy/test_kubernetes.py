"""The Kubernetes manifests for production serving, validated offline against the Kubernetes API
schema (kubernetes-validate, a pinned Kubernetes version): no cluster runs here."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

KUBERNETES_VERSION = "1.34"
MANIFESTS = REPO / "serving" / "deploy" / "kubernetes"


def documents() -> list[dict]:
    return [doc for path in sorted(MANIFESTS.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in documents() if doc["kind"] == kind]


def test_every_manifest_validates_against_the_pinned_schema() -> None:
    kinds = sorted(doc["kind"] for doc in documents())
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                            "PodDisruptionBudget", "Secret", "Secret", "Secret", "Service", "Service"])
    for doc in documents():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    broken = by_kind("Deployment")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8500"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_each_replica_runs_tf_serving_with_the_sync_sidecar_on_a_shared_volume() -> None:
    [deployment] = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    serving, sync = (next(c for c in pod["containers"] if c["name"] == name) for name in ("tensorflow-serving", "sync"))
    assert serving["image"].startswith("tensorflow/serving:") and deployment["spec"]["replicas"] >= 2
    assert "--model_config_file=/models/models.config" in serving["args"]
    compose = yaml.safe_load((REPO / "serving" / "deploy" / "docker-compose.yml").read_text())
    assert serving["args"] == compose["services"]["serving"]["command"]  # the command mnist serve is tested on
    assert serving["readinessProbe"]["httpGet"]["path"] == "/v1/models/mnist"  # ready once a version serves
    assert all("requests" in c["resources"] for c in pod["containers"])
    assert sync["args"][:1] == ["sync"] and sync["args"][sync["args"].index("--server") + 1] == "localhost:8500"
    shared = {m["name"] for m in serving["volumeMounts"]} & {m["name"] for m in sync["volumeMounts"]}
    assert "models" in shared
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in sync["env"] if "valueFrom" in e}
    assert secrets == {"mnist-s3-readonly"}
    assert sync["image"].startswith("mnist-sidecar:") and "--target sidecar" in (MANIFESTS / "serving.yaml").read_text()


def test_clients_reach_the_model_through_the_logging_gateway() -> None:
    [deployment] = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    args = gateway["args"]
    assert args[0] == "gateway" and args[args.index("--upstream") + 1] == "localhost:8500"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/v1/models/mnist/ready"
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert {s["spec"]["ports"][0]["targetPort"] for s in by_kind("Service")} == {"gateway-grpc"}
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in gateway["env"] if "valueFrom" in e}
    assert secrets == {"mnist-s3-traffic"} and {s["metadata"]["name"] for s in by_kind("Secret")} >= secrets
    # feedback takes a bearer token from a Secret mounted as the file MNIST_FEEDBACK_TOKENS names
    tokens = next(e["value"] for e in gateway["env"] if e["name"] == "MNIST_FEEDBACK_TOKENS")
    mount = next(m for m in gateway["volumeMounts"] if tokens.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret = next(s for s in by_kind("Secret") if s["metadata"]["name"] == volume["secret"]["secretName"])
    assert tokens.rsplit("/", 1)[1] in secret["stringData"] and mount["readOnly"]
    [policy] = by_kind("NetworkPolicy")
    client_rule = next(rule for rule in policy["spec"]["ingress"]
                       if {"podSelector": {"matchLabels": {"mnist-client": "true"}}} in rule["from"])
    assert {port["port"] for port in client_rule["ports"]} == {ports["gateway-grpc"], ports["gateway-rest"]}
    assert all(port["port"] != 8500 for rule in policy["spec"]["ingress"] for port in rule["ports"])


def test_config_map_carries_the_same_files_as_the_compose_setup() -> None:
    [config] = by_kind("ConfigMap")
    for name in ("batching_parameters.txt", "monitoring.config"):
        assert config["data"][name] == (REPO / "serving" / "deploy" / name).read_text()


def test_scaling_disruption_and_network_policies_select_the_serving_pods() -> None:
    [deployment] = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [autoscaler] = by_kind("HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert autoscaler["spec"]["minReplicas"] >= 2
    [budget] = by_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = by_kind("Service")
    assert all(s["spec"]["selector"].items() <= labels.items() for s in services)
    assert any(s["spec"].get("clusterIP") == "None" for s in services)  # dns:/// round robin for clients
    [policy] = by_kind("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    allowed = [selector["matchLabels"] for peer in peers for selector in peer.values()]
    assert {"mnist-client": "true"} in allowed
    assert len(allowed) == len(peers) and all(allowed)  # never an empty (allow-all) peer
