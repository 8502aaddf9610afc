"""deploy/kubernetes/: manifests parsed and checked field by field, schema-validated offline, and dry-run applied
with kubectl when a cluster is reachable."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.conftest import serve_setting_env_names


@pytest.fixture(scope="module")
def docs(root):
    out = []
    for path in sorted((root / "deploy/kubernetes").glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append(doc)
    return out


def _one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_kinds(docs):
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    assert _one(docs, "ServiceMonitor")["apiVersion"] == "monitoring.coreos.com/v1"
    assert _one(docs, "PodDisruptionBudget")["apiVersion"] == "policy/v1"
    assert _one(docs, "Deployment")["apiVersion"] == "apps/v1"


def test_deployment(docs):
    dep = _one(docs, "Deployment")
    labels = dep["spec"]["selector"]["matchLabels"]
    pod = dep["spec"]["template"]
    assert labels.items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    (c,) = spec["containers"]

    # GPUs: requested as a limit, and as many as TP x REPLICAS.
    env = {e["name"]: e.get("value") for e in c["env"]}
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert gpus == int(env["LOGITSERVE_TP"]) * int(env.get("LOGITSERVE_REPLICAS", "1"))
    assert env["LOGITSERVE_DEVICE"] == "cuda"
    used = {n for n in env if n.startswith("LOGITSERVE_")}
    assert used <= serve_setting_env_names(), f"unknown settings: {sorted(used - serve_setting_env_names())}"

    # Probes: readiness gates traffic on /ready; liveness and startup only on the HTTP process.
    port = c["ports"][0]
    assert port["containerPort"] == 8000
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health"), ("startupProbe", "/health")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in (8000, port["name"]), probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load may take minutes"

    # /dev/shm from memory, for NCCL.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    shm_volume = next(name for name, path in mounts.items() if path == "/dev/shm")
    volume = next(v for v in spec["volumes"] if v["name"] == shm_volume)
    assert volume["emptyDir"]["medium"] == "Memory"

    # Non-root, the image's user.
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c.get("args", [])[:1] == ["serve"]


def test_service_pdb_servicemonitor_select_the_pods(docs):
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = _one(docs, "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] in ("http", 8000)

    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])

    sm = _one(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["path"] == "/metrics" and ep["port"] == port["name"]


def test_schema_validation(root):
    """Core kinds against the Kubernetes OpenAPI schemas, strictly (unknown fields are errors)."""
    kv = pytest.importorskip("kubernetes_validate")
    checked = 0
    for path in sorted((root / "deploy/kubernetes").glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: no schema in the core set
            kv.validate(doc, "1.30.0", strict=True)
            checked += 1
    assert checked == 3


def _cluster_reachable(kubectl: str) -> bool:
    proc = subprocess.run([kubectl, "version", "--request-timeout=5s"], capture_output=True, timeout=30)
    return proc.returncode == 0


def test_kubectl(root, tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    if _cluster_reachable(kubectl):
        proc = subprocess.run(
            [kubectl, "apply", "--dry-run=client", "--validate=false", "-f", str(root / "deploy/kubernetes/")],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return
    # No cluster: `kubectl apply --dry-run=client` needs API discovery and cannot run. Render the manifests with
    # kubectl's own (offline) kustomize instead, which parses every file with kubectl's decoder.
    files = sorted(p for p in (root / "deploy/kubernetes").glob("*.y*ml"))
    for p in files:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "kustomization.yaml").write_text("resources:\n" + "".join(f"  - {p.name}\n" for p in files))
    proc = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rendered = sorted(d["kind"] for d in yaml.safe_load_all(proc.stdout) if d)
    assert rendered == ["Deployment", "PodDisruptionBudget", "Service", "ServiceMonitor"]
