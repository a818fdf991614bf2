"""deploy/kubernetes: every manifest valid against the Kubernetes schemas of a pinned version (kubernetes-validate,
strict: no unknown fields), and consistent with rdax-server and each other: the container's arguments parse, the
probes ask the health-only listener, no capability, the Localhost seccomp profile is docker/seccomp.json's, the
Service finds the DaemonSet's pods, the policy loads."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from rdax.service.cli import parse_args
from rdax.service.policy import Policy

# The Kubernetes version the manifests are written for (gRPC probes GA since 1.27, seccompProfile since 1.19).
KUBERNETES_VERSION = "1.34.0"
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
RESOURCES = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_resources() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for p in RESOURCES for d in documents(p)}


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict]:
    return all_resources()


@pytest.fixture(scope="module")
def pod(resources) -> dict:
    return resources[("DaemonSet", "rdax-node")]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def node_container(pod) -> dict:
    return next(c for c in pod["containers"] if c["name"] == "rdax-node")


def dockerfile_entrypoint() -> list[str]:
    """The image's ENTRYPOINT, from docker/Dockerfile (a JSON array over continued lines)."""
    import json
    text = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))
    return json.loads(line[len("ENTRYPOINT"):])


@pytest.mark.parametrize("path", RESOURCES, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_schemas(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_catches_a_wrong_field_bad_flow(node_container) -> None:
    """The check is real: a misspelt field and a wrong type are refused."""
    ds = all_resources()[("DaemonSet", "rdax-node")]
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {"drop": ["ALL"]}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBERNETES_VERSION, strict=True)
    ds = all_resources()[("DaemonSet", "rdax-node")]
    ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBERNETES_VERSION, strict=True)


def test_kubernetes_kustomization_lists_every_resource_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in RESOURCES if p.name != "tls-secret.yaml")


def test_kubernetes_container_arguments_parse_as_rdax_server_flags(node_container) -> None:
    argv = dockerfile_entrypoint()
    assert argv[0] == "rdax-server"
    args = parse_args(argv[1:] + [a.replace("$(POD_IP)", "10.0.0.5") for a in node_container["args"]])
    assert args.root == "/export"
    assert args.tls_cert == "/etc/rdax/tls/node.pem" and args.tls_key == "/etc/rdax/tls/node.key"
    assert args.tls_client_ca == "/etc/rdax/tls/ca.pem"
    assert args.policy == "/etc/rdax/policy/policy.toml"
    assert args.health_listen == "10.0.0.5:7711"
    assert not args.insecure
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in node_container["env"]
    mounts = {m["mountPath"]: m for m in node_container["volumeMounts"]}
    for path in (args.root, "/etc/rdax/tls", "/etc/rdax/policy"):
        assert path in mounts, f"{path} is not mounted"
    assert mounts["/etc/rdax/tls"]["readOnly"] and mounts["/etc/rdax/policy"]["readOnly"]


def test_kubernetes_probes_ask_the_health_only_listener(node_container) -> None:
    """kubelet's gRPC probe cannot present a client certificate: every probe goes to --health-listen's port, and
    readiness asks for the Rdax service by name (NOT_SERVING while the node drains)."""
    health_port = int(node_container["args"][node_container["args"].index("--health-listen") + 1].rsplit(":", 1)[1])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert node_container[probe]["grpc"]["port"] == health_port, probe
    assert node_container["readinessProbe"]["grpc"]["service"] == "rdax.v1.Rdax"
    ports = {p["name"]: p["containerPort"] for p in node_container["ports"]}
    assert ports == {"grpc": 7710, "health": health_port}


def test_kubernetes_node_runs_with_no_capability_and_the_rdax_seccomp_profile_bad_flow(pod, node_container) -> None:
    """Least privilege as measured in the lab: all capabilities dropped and none added, no privilege escalation,
    not privileged, read-only root, the Localhost profile the init container installs; no host PID/IPC."""
    sc = node_container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}, "the node needs no capability (README: least privilege)"
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"]["type"] == "Localhost"
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["automountServiceAccountToken"] is False
    # The profile is installed where the kubelet looks for it: <kubelet root>/seccomp/<localhostProfile>.
    init = next(c for c in pod["initContainers"] if c["name"] == "install-seccomp-profile")
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_dir = next(volumes[m["name"]]["hostPath"]["path"] for m in init["volumeMounts"]
                    if "hostPath" in volumes[m["name"]])
    installed = Path(host_dir) / Path(init["command"][-1]).name
    assert str(installed) == f"/var/lib/kubelet/seccomp/{sc['seccompProfile']['localhostProfile']}"
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert volumes["seccomp-profile"]["configMap"]["name"] == "rdax-seccomp"


def test_kubernetes_volumes_name_what_exists(resources, pod) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod["initContainers"]:
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, mount
    assert volumes["tls"]["secret"]["secretName"] in {name for kind, name in resources if kind == "Secret"}
    assert ("ConfigMap", volumes["policy"]["configMap"]["name"]) in resources
    assert volumes["export"]["hostPath"]["type"] == "Directory"   # never made empty on a machine without the mount
    assert volumes["tls"]["secret"]["defaultMode"] == 0o400


def test_kubernetes_headless_service_finds_the_daemonset_pods(resources) -> None:
    service = resources[("Service", "rdax-node")]
    ds = resources[("DaemonSet", "rdax-node")]
    assert service["spec"]["clusterIP"] == "None"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "grpc" and ports["grpc"] == port["port"] == 7710
    namespaces = {d["metadata"].get("namespace") for d in resources.values() if d["kind"] != "Namespace"}
    assert namespaces == {resources[("Namespace", "rdax")]["metadata"]["name"]}


def test_kubernetes_policy_configmap_is_a_valid_policy(resources) -> None:
    text = resources[("ConfigMap", "rdax-policy")]["data"]["policy.toml"]
    policy = Policy.parse(text, "policy-configmap.yaml")
    assert policy is not None
