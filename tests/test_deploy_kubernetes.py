"""Kubernetes manifests (deploy/kubernetes/) without a Kubernetes cluster.

Every manifest is checked against the schemas that a cluster would use: the Dask operator's
CRDs shipped inside the installed dask-kubernetes package (its Helm chart's ``crds/``, fully
resolved) and Kubernetes' own OpenAPI schemas (kubernetes-validate, strict). The DaskCluster
that ``deploy_profiles.cluster_spec`` builds from config must be the one in the manifest, and
every container of every pod must run unprivileged with requests and limits.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path

import dask
import dask_kubernetes
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from pipeline import config, deploy_profiles

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
CRDS = (
    Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
)
# The oldest Kubernetes the manifests promise to work with (CronJob timeZone is GA in 1.27),
# and the newest that kubernetes-validate knows.
K8S_VERSIONS = ("1.30", latest_version())


def _load_all() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


MANIFESTS = _load_all()
DOCS = [(name, doc) for name, docs in MANIFESTS.items() for doc in docs]
DOC_IDS = [f"{name}:{doc['kind']}" for name, doc in DOCS]


def _one(kind: str, name: str | None = None) -> dict:
    found = [
        d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@functools.cache
def _crds() -> dict[tuple[str, str], dict]:
    """(kind, apiVersion) -> openAPIV3Schema of every CRD the installed operator ships."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB of YAML
    out = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=loader)
        for v in crd["spec"]["versions"]:
            key = (crd["spec"]["names"]["kind"], f"{crd['spec']['group']}/{v['name']}")
            out[key] = v["schema"]["openAPIV3Schema"]
    return out


def _crd_schema(kind: str, api_version: str) -> dict:
    schemas = _crds()
    assert (kind, api_version) in schemas, f"no CRD for {kind} {api_version} in {CRDS}"
    return schemas[kind, api_version]


def _pruned_fields(instance, schema: dict, path: str = "") -> Iterator[str]:
    """Fields the API server would silently drop (not in a structural schema's properties).

    jsonschema accepts unknown properties; Kubernetes prunes them, so a typo such as
    ``nodeSelecter`` would vanish without an error. This finds them.
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(instance, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if props is not None and key in props:
                yield from _pruned_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from _pruned_fields(value, extra, f"{path}.{key}")
            elif props is not None and extra is not True:
                yield f"{path}.{key}"
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(instance):
            yield from _pruned_fields(value, schema["items"], f"{path}[{i}]")


def _crd_errors(doc: dict) -> list[str]:
    schema = _crd_schema(doc["kind"], doc["apiVersion"])
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    errors += [f"{p}: unknown field (would be pruned)" for p in _pruned_fields(body, schema)]
    return errors


def _pod_specs(node, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every pod spec (a mapping with a list of ``containers``) inside a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
        for key, value in node.items():
            yield from _pod_specs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _pod_specs(value, f"{path}[{i}]")


def _as_pod(spec: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


# ------------------------------------------------------------------------- schemas
def test_the_expected_manifests_are_there():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS}
    assert {
        ("DaskCluster", "elodin"),
        ("DaskWorkerGroup", "elodin-gpu"),
        ("DaskJob", "elodin-run"),
        ("CronJob", "elodin-reprocess"),
        ("ConfigMap", "elodin-config"),
        ("Secret", "elodin-s3"),
        ("PersistentVolumeClaim", "elodin-data"),
    } <= kinds


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=DOC_IDS)
def test_manifest_validates(name, doc):
    if doc["apiVersion"].startswith("kubernetes.dask.org/"):
        assert _crd_errors(doc) == []
        # The pods inside a custom resource are checked against Kubernetes' Pod schema too:
        # the CRD only says "a PodSpec", the API server later builds real Pods from it.
        pods = list(_pod_specs(doc["spec"]))
        assert pods
        for _, spec in pods:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(_as_pod(spec), version, strict=True)
    else:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_scheduler_service_of_the_cluster_validates():
    for doc in (_one("DaskCluster"), _one("DaskJob")):
        spec = (
            doc["spec"]["scheduler"]
            if doc["kind"] == "DaskCluster"
            else doc["spec"]["cluster"]["spec"]["scheduler"]
        )
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s"},
            "spec": spec["service"],
        }
        kubernetes_validate.validate(service, latest_version(), strict=True)
        # The operator selects the scheduler pod by the cluster's name (a DaskJob's is the job's).
        assert spec["service"]["selector"]["dask.org/cluster-name"] == doc["metadata"]["name"]


def test_the_checks_catch_broken_manifests():
    bad = copy.deepcopy(_one("DaskCluster"))
    bad["spec"]["worker"]["replicas"] = "two"
    assert any("replicas" in e for e in _crd_errors(bad))
    typo = copy.deepcopy(_one("DaskWorkerGroup"))
    typo["spec"]["worker"]["spec"]["nodeSelecter"] = typo["spec"]["worker"]["spec"].pop(
        "nodeSelector"
    )
    assert any("nodeSelecter: unknown field" in e for e in _crd_errors(typo))
    pod = copy.deepcopy(_one("DaskCluster")["spec"]["worker"]["spec"])
    pod["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_as_pod(pod), latest_version(), strict=True)


# ------------------------------------------------------------------------- security
CONTAINERS = [
    (f"{name}:{doc['kind']}{path}", pod, c)
    for name, doc in DOCS
    for path, pod in _pod_specs(doc)
    for c in pod["containers"] + pod.get("initContainers", [])
]


@pytest.mark.parametrize(("where", "pod", "container"), CONTAINERS, ids=[c[0] for c in CONTAINERS])
def test_every_container_is_unprivileged_and_bounded(where, pod, container):
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    assert isinstance(uid, int) and uid != 0
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged", False) is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert not sc.get("capabilities", {}).get("add")
    assert sc.get("readOnlyRootFilesystem") is True
    # A read-only root needs somewhere to write: an emptyDir on /tmp.
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert resources["requests"][kind] and resources["limits"][kind], kind
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert container["image"].rsplit(":", 1)[-1] not in ("", "latest")


def test_containers_were_found():
    # DaskCluster: scheduler + worker; GPU group; DaskJob: job + scheduler + worker; CronJob.
    assert len(CONTAINERS) == 7


# ------------------------------------------------------------------------- Python == manifests
def test_cluster_spec_from_config_is_the_manifest():
    manifest = _one("DaskCluster", "elodin")
    built = deploy_profiles.cluster_spec(name="elodin")
    assert built["apiVersion"] == manifest["apiVersion"] and built["kind"] == manifest["kind"]
    assert built["spec"] == manifest["spec"]
    assert _crd_errors(built) == []


def test_gpu_worker_group_from_config_is_the_manifest():
    manifest = _one("DaskWorkerGroup", "elodin-gpu")
    built = deploy_profiles.gpu_worker_group_spec(cluster="elodin")
    assert built["spec"] == manifest["spec"]
    assert built["metadata"]["name"] == manifest["metadata"]["name"]


def test_batch_job_runs_the_same_cluster():
    job = _one("DaskJob", "elodin-run")
    assert job["spec"]["cluster"]["spec"] == deploy_profiles.cluster_spec(name="elodin-run")["spec"]
    (container,) = job["spec"]["job"]["spec"]["containers"]
    assert "elodin run /config/config.yaml" in " ".join(container["command"] + container["args"])
    # The operator's DASK_SCHEDULER_ADDRESS reaches Elodin's setting.
    assert 'ELODIN__COMPUTE__SCHEDULER="$DASK_SCHEDULER_ADDRESS"' in container["args"][0]
    assert job["spec"]["job"]["spec"]["restartPolicy"] == "Never"


def test_cronjob_reprocesses_incrementally_on_the_long_lived_cluster():
    cron = _one("CronJob", "elodin-reprocess")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] + container["args"] == [
        "elodin",
        "run",
        "/config/config.yaml",
        "--incremental",
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ELODIN__COMPUTE__SCHEDULER"] == "tcp://elodin-scheduler:8786"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_jobs_use_the_configured_image_config_and_secret():
    for kind in ("DaskJob", "CronJob"):
        pods = [p for _, p in _pod_specs(_one(kind)) if p["containers"][0]["name"] == "job"]
        (pod,) = pods
        container = pod["containers"][0]
        assert container["image"] == config.get("kubernetes.image")
        assert container["envFrom"] == [{"secretRef": {"name": "elodin-s3", "optional": True}}]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "elodin-config"
        assert {"name": "config", "mountPath": "/config", "readOnly": True} in container[
            "volumeMounts"
        ]


def test_run_config_in_the_configmap_uses_known_settings():
    data = yaml.safe_load(_one("ConfigMap", "elodin-config")["data"]["config.yaml"])
    assert data["elodin"]["run"]["inputs"] and data["elodin"]["run"]["store"].startswith("s3://")
    # `run` is what `elodin run` reads; every other key must be a known setting.
    config.validate(
        {"elodin": {k: v for k, v in data["elodin"].items() if k != "run"}}, source="configmap"
    )


def test_gpu_and_cpu_workers_differ_only_where_they_should():
    cpu = deploy_profiles.cluster_spec(name="c")["spec"]["worker"]["spec"]
    gpu = deploy_profiles.gpu_worker_group_spec(cluster="c")["spec"]["worker"]["spec"]
    (cpu_c,), (gpu_c,) = cpu["containers"], gpu["containers"]
    assert gpu_c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu_c["resources"]["limits"]
    assert gpu_c["args"][-2:] == ["--resources", "GPU=1"] and "--resources" not in cpu_c["args"]
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[
        "tolerations"
    ]
    assert "nodeSelector" not in cpu and "tolerations" not in cpu
    assert gpu_c["image"].endswith("-gpu") and cpu_c["image"].endswith("-cpu")
    assert (
        gpu_c["securityContext"]
        == cpu_c["securityContext"]
        == deploy_profiles.CONTAINER_SECURITY_CONTEXT
    )
    assert gpu_c["env"] == cpu_c["env"] and gpu["volumes"] == cpu["volumes"]


def test_overrides_and_config_change_the_spec():
    spec = deploy_profiles.cluster_spec(
        name="x", workers=5, image="reg/elodin:1", worker_memory="4Gi", secret=None
    )
    (c,) = spec["spec"]["worker"]["spec"]["containers"]
    assert spec["spec"]["worker"]["replicas"] == 5
    assert c["image"] == "reg/elodin:1" and c["resources"]["limits"]["memory"] == "4Gi"
    assert "envFrom" not in c
    with dask.config.set({"elodin.kubernetes.worker-cpu": "500m"}):
        (c,) = deploy_profiles.cluster_spec(name="x")["spec"]["worker"]["spec"]["containers"]
    assert c["resources"]["requests"]["cpu"] == "500m"
    assert c["args"][c["args"].index("--nthreads") + 1] == "1"
    generated = deploy_profiles.cluster_spec()["metadata"]["name"]
    assert (
        generated.startswith("elodin-")
        and generated != deploy_profiles.cluster_spec()["metadata"]["name"]
    )


def test_bad_node_selector_names_the_key():
    from pipeline.errors import ConfigError

    with pytest.raises(
        ConfigError, match="elodin.kubernetes.gpu-node-selector: expected 'key=value'"
    ):
        deploy_profiles.gpu_worker_group_spec(cluster="c", gpu_node_selector=["gpu"])


def test_without_a_kubernetes_api_connect_gives_one_line(tmp_path, monkeypatch):
    from pipeline import compute
    from pipeline.errors import ConfigError

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="cannot reach the Kubernetes API") as err:
        with compute.connect("kubernetes", workers=1, quiet=True):
            pass
    assert "\n" not in str(err.value)
