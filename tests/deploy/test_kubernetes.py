"""deploy/kubernetes: every object valid against the Kubernetes API's own schemas (PyPI's kubernetes-validate,
which bundles them: no cluster, no network), strictly (a field the API does not have fails), for the oldest
and the newest version the manifests support; and the numbers that must agree across files agree."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest
import yaml

from adapterd.v1 import adapterd_pb2 as pb
from tests.deploy.conftest import DEPLOY, MANIFESTS, container_args, find, load_documents

# 1.30: the oldest with everything used here (native gRPC probes since 1.27, policy/v1 PodDisruptionBudget,
# subPathExpr); the newest is the newest whose schemas the installed kubernetes-validate bundles.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
DOCUMENTS = [(path.name, doc) for path in MANIFESTS for doc in load_documents(path)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), DOCUMENTS,
                         ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in DOCUMENTS])
def test_every_object_is_valid_for_the_api(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_a_field_the_api_does_not_have_fails():
    statefulset = copy.deepcopy(find("StatefulSet", "adapterd"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    with pytest.raises(kubernetes_validate.ValidationError, match="grpcc"):
        kubernetes_validate.validate(statefulset, VERSIONS[-1], strict=True)


def _pod() -> dict:
    return find("StatefulSet", "adapterd")["spec"]["template"]


def test_probes_and_ports_are_the_daemons_ports():
    spec = _pod()["spec"]
    container, args = spec["containers"][0], container_args(spec)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": int(args["port"]), "metrics": int(args["metrics-port"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": int(args["port"])}, probe
    annotations = _pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == args["metrics-port"] and annotations["prometheus.io/scrape"] == "true"


def test_the_termination_grace_period_covers_prestop_and_the_whole_drain():
    spec = _pod()["spec"]
    container, args = spec["containers"][0], container_args(spec)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    margin_s = 10  # the daemon ends within --grace plus 10 s, whatever is stuck (server/shutdown.py)
    assert spec["terminationGracePeriodSeconds"] >= int(command[1]) + float(args["grace"]) + margin_s


def test_one_gpu_each_and_the_images_user():
    spec = _pod()["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    uid = re.search(r"--uid (\d+) adapterd", (DEPLOY.parent / "Dockerfile").read_text()).group(1)
    assert spec["securityContext"]["runAsUser"] == int(uid)


def test_adapters_and_runs_are_on_shared_storage():
    spec = _pod()["spec"]
    args, mounts = container_args(spec), {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    for volume, flag in (("adapters", "adapters"), ("runs", "runs")):
        assert mounts[volume]["mountPath"] == args[flag]
        claim = find("PersistentVolumeClaim", claims[volume])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # a training run belongs to the replica that started it: each pod its own runs directory
    assert mounts["runs"]["subPathExpr"] == "$(POD_NAME)"
    assert args["base"].startswith(mounts["models"]["mountPath"] + "/") and mounts["models"]["readOnly"]


def test_the_kernel_cache_is_the_pods_own_volume():
    """The image's TRITON_CACHE_DIR lies on a volume of the pod (kept across container restarts), never on storage
    shared between pods: the autotuners' choices are keyed by the GPU's architecture, not the card."""
    cache = re.search(r"^ENV TRITON_CACHE_DIR=(\S+)$", (DEPLOY.parent / "Dockerfile").read_text(), re.M)[1]
    spec = _pod()["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    holding = [m for m in spec["containers"][0]["volumeMounts"] if cache.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(holding) == 1 and not holding[0].get("readOnly"), holding
    assert set(volumes[holding[0]["name"]]) == {"name", "emptyDir"}, volumes[holding[0]["name"]]


def test_the_headless_service_and_the_budget_select_the_replicas():
    statefulset, labels = find("StatefulSet", "adapterd"), _pod()["metadata"]["labels"]
    service = find("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and not service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= labels.items()
    budget = find("PodDisruptionBudget", "adapterd")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_envoy_finds_the_replicas_through_the_headless_service(envoy_config):
    (cluster,) = envoy_config["static_resources"]["clusters"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    service = find("Service", "adapterd-headless")
    assert address["address"] == f"adapterd-headless.{service['metadata']['namespace']}.svc.cluster.local"
    assert address["port_value"] == int(container_args(_pod()["spec"])["port"])
    health = cluster["health_checks"][0]["grpc_health_check"]["service_name"]
    assert health == pb.DESCRIPTOR.services_by_name["Adapterd"].full_name  # the daemon sets its health too


def test_envoys_prestop_drains_through_its_admin_port_within_the_grace_period(envoy_config):
    spec = find("Deployment", "adapterd-envoy")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    script = container["lifecycle"]["preStop"]["exec"]["command"][-1]
    admin_port = envoy_config["admin"]["address"]["socket_address"]["port_value"]
    assert f"/dev/tcp/127.0.0.1/{admin_port}" in script and "POST /drain_listeners?graceful" in script
    drain_s = int(container["args"][container["args"].index("--drain-time-s") + 1])
    sleep_s = int(re.search(r"sleep (\d+)", script).group(1))
    assert drain_s < sleep_s < spec["terminationGracePeriodSeconds"]
    listener = envoy_config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert container["ports"][0]["containerPort"] == listener["port_value"]


def test_the_kustomization_ships_every_manifest_and_envoys_config():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(f"kubernetes/{path.name}" for path in MANIFESTS)
    (generator,) = kustomization["configMapGenerator"]
    (source,) = generator["files"]
    key, path = source.split("=")
    assert (DEPLOY / path).is_file()
    envoy = find("Deployment", "adapterd-envoy")["spec"]["template"]["spec"]
    (volume,) = envoy["volumes"]
    mount = envoy["containers"][0]["volumeMounts"][0]
    assert volume["configMap"]["name"] == generator["name"]
    args = envoy["containers"][0]["args"]
    assert args[args.index("--config-path") + 1] == f"{mount['mountPath']}/{key}"
