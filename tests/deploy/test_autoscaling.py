"""deploy/kubernetes/autoscaling/: the HorizontalPodAutoscaler (prometheus-adapter) and the KEDA ScaledObject that
scale the Deployment on queued tokens per pod, and the Deployment's drain on scale-down.

The HPA is validated strictly against the Kubernetes 1.30 OpenAPI schemas (kubernetes-validate), as the core
manifests are. The ScaledObject is a KEDA custom resource, whose schema is not in that set (like the
ServiceMonitor in test_kubernetes.py): it gets a structural check of its fields against KEDA's documented
ScaledObject spec, and the HPA behaviour it hands to Kubernetes is validated strictly inside an HPA. The
prometheus-adapter rule and the KEDA query are parsed as PromQL (promql-parser) after the adapter's template
substitution, and must select the series the server exposes.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

HERE = "deploy/kubernetes/autoscaling"
# KEDA's ScaledObject spec fields (keda.sh/v1alpha1, KEDA 2.x documentation "Scaling Deployments").
SCALED_OBJECT_SPEC_FIELDS = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
    "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}
PROMETHEUS_TRIGGER_METADATA = {
    "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders", "ignoreNullValues",
    "queryParameters", "unsafeSsl", "timeout",
}


@pytest.fixture(scope="module")
def manifests(root):
    def load(name):
        (doc,) = [d for d in yaml.safe_load_all((root / HERE / name).read_text()) if d]
        return doc

    core = {}
    for path in sorted((root / "deploy/kubernetes").glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                core[doc["kind"]] = doc
    return {
        "hpa": load("hpa.yaml"),
        "keda": load("keda-scaledobject.yaml"),
        "adapter": yaml.safe_load((root / HERE / "prometheus-adapter-values.yaml").read_text()),
        **core,
    }


def _env(deployment) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in c["env"]}


def _queue_gauge_name() -> str:
    """The exposed name of the queue-depth gauge, from the server's own Metrics."""
    import prometheus_client

    from service.metrics import Metrics

    text = prometheus_client.generate_latest(Metrics(prometheus_client.CollectorRegistry()).registry).decode()
    (name,) = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE logitserve_queue_tokens ")]
    assert f"# TYPE {name} gauge" in text
    return name


def test_hpa_is_valid_and_scales_the_deployment_on_queued_tokens(manifests):
    kv = pytest.importorskip("kubernetes_validate")
    hpa, dep = manifests["hpa"], manifests["Deployment"]
    kv.validate(hpa, "1.30.0", strict=True)
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (dep["apiVersion"], dep["kind"], dep["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == _queue_gauge_name()
    assert metric["pods"]["target"]["type"] == "AverageValue"

    # The target sits between one full batch (a pod running at all) and the queue limit (past which it answers 429):
    # pods are added while the queue still accepts work.
    target = int(metric["pods"]["target"]["averageValue"])
    batch = int(_env(dep)["LOGITSERVE_MAX_BATCH_TOKENS"])
    assert batch <= target < 16 * batch  # 16 x max-batch-tokens: --max-queue-tokens' default

    # Never fewer pods than the disruption budget keeps serving through a node drain.
    pdb = manifests["PodDisruptionBudget"]
    assert hpa["spec"]["minReplicas"] >= 1 + int(pdb["spec"]["maxUnavailable"])
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def _substitute(template: str, series: str) -> str:
    """prometheus-adapter's metricsQuery template, filled as the adapter does for a request for two pods."""
    return (template.replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"logitserve-a|logitserve-b"')
            .replace("<<.GroupBy>>", "pod"))


def _selected_metrics(expr) -> set[str]:
    """Metric names a parsed PromQL expression selects (its vector selectors, walked through the AST)."""
    import promql_parser

    names: set[str] = set()

    def walk(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        for attr in ("expr", "lhs", "rhs", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for child in getattr(node, "args", None) or []:
            walk(child)
        if isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)

    walk(expr)
    return names


def test_prometheus_adapter_rule_serves_the_hpa_metric(manifests):
    promql_parser = pytest.importorskip("promql_parser")
    name = manifests["hpa"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = manifests["adapter"]["rules"]["custom"]
    assert manifests["adapter"]["rules"]["default"] is False

    series = promql_parser.parse(rule["seriesQuery"])
    assert _selected_metrics(series) == {_queue_gauge_name()}
    assert re.fullmatch(rule["name"]["matches"], _queue_gauge_name())
    assert rule["name"]["as"] == name
    # Per pod and namespace, as a Pods metric of the HPA is asked for.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = promql_parser.parse(_substitute(rule["metricsQuery"], _queue_gauge_name()))
    assert _selected_metrics(query) == {_queue_gauge_name()}
    assert isinstance(query, promql_parser.AggregateExpr) and str(query.op) in ("sum", "max", "avg")
    assert "pod" in query.modifier.labels


def test_keda_scaled_object_matches_the_hpa(manifests):
    kv = pytest.importorskip("kubernetes_validate")
    promql_parser = pytest.importorskip("promql_parser")
    so, hpa, dep, svc = manifests["keda"], manifests["hpa"], manifests["Deployment"], manifests["Service"]
    assert (so["apiVersion"], so["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = so["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC_FIELDS, set(spec) - SCALED_OBJECT_SPEC_FIELDS
    assert spec["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == dep["kind"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])

    # The behaviour KEDA hands to the HPA it creates: the same as hpa.yaml's, and valid as an HPA's.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["spec"]["behavior"]
    kv.validate({**hpa, "spec": {**hpa["spec"], "behavior": behavior}}, "1.30.0", strict=True)

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert set(meta) <= PROMETHEUS_TRIGGER_METADATA, set(meta) - PROMETHEUS_TRIGGER_METADATA
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?", meta["serverAddress"])
    # KEDA divides the query's value by the pod count: the query sums the pods, the threshold is hpa.yaml's.
    assert meta["threshold"] == hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    query = promql_parser.parse(meta["query"])
    assert isinstance(query, promql_parser.AggregateExpr) and str(query.op) == "sum" and query.modifier is None
    assert _selected_metrics(query) == {_queue_gauge_name()}
    assert f'service="{svc["metadata"]["name"]}"' in meta["query"]


def test_deployment_drains_before_it_goes(manifests):
    """A pod removed by a scale-down or rollout: out of the endpoints during preStop, then the server's drain
    (in-flight requests bounded by the request timeout) fits in the grace period."""
    dep = manifests["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"  # 503 while loading, restarting or draining
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 5  # endpoint removal reaches kube-proxy and ingress controllers within a few seconds
    request_timeout = float(_env(dep)["LOGITSERVE_REQUEST_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + request_timeout + 10


def test_kubectl_renders_the_autoscaling_manifests(root, tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    # No cluster needed: kubectl's own kustomize parses each file with kubectl's decoder (as test_kubernetes does).
    for name in ("hpa.yaml", "keda-scaledobject.yaml"):
        shutil.copy(root / HERE / name, tmp_path / name)
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - hpa.yaml\n  - keda-scaledobject.yaml\n")
    proc = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(d["kind"] for d in yaml.safe_load_all(proc.stdout) if d) == ["HorizontalPodAutoscaler", "ScaledObject"]
