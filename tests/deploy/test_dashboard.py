"""The Grafana dashboard queries only series that the service's Metrics really exposes."""

from __future__ import annotations

import json
import re

import pytest

PROMQL_FUNCTIONS_AND_KEYWORDS = {
    "histogram_quantile", "sum", "rate", "irate", "increase", "avg", "max", "min", "count", "by", "without",
    "le", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool", "topk",
    "bottomk", "clamp_min", "clamp_max", "abs", "delta", "deriv", "vector", "scalar", "time",
}
METRIC_RE = re.compile(r"\b(logitserve_[a-zA-Z0-9_:]+)")


@pytest.fixture(scope="module")
def dashboard(root):
    return json.loads((root / "deploy/grafana/dashboards/logitserve.json").read_text())


def _exprs(dashboard):
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Every series name a scrape of service.metrics.Metrics can contain."""
    import prometheus_client

    from service.metrics import Metrics

    m = Metrics(prometheus_client.CollectorRegistry())
    text = prometheus_client.generate_latest(m.registry).decode()
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    assert names, "Metrics exposes nothing"
    return names


def test_every_queried_metric_is_exposed(dashboard, exposed):
    referenced = {name for _, expr in _exprs(dashboard) for name in METRIC_RE.findall(expr)}
    assert referenced, "the dashboard queries no logitserve metric"
    missing = referenced - exposed
    assert not missing, f"queried but not exposed by service.metrics.Metrics: {sorted(missing)}"


def test_required_panels(dashboard):
    exprs = [e for _, e in _exprs(dashboard)]
    joined = "\n".join(exprs)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(logitserve_request_duration_seconds_bucket" in joined
    assert "logitserve_queue_duration_seconds_bucket" in joined
    assert "logitserve_batch_tokens" in joined
    assert "rate(logitserve_prompt_tokens_total[1m])" in joined
    assert any("logitserve_requests_total" in e and 'status=~"4..|5.."' in e for e in exprs)
    assert "logitserve_worker_restarts_total" in joined
    assert "logitserve_requests_in_flight" in joined
    assert "logitserve_queue_tokens" in joined
    assert "rate(logitserve_prefix_shared_tokens_total[1m])" in joined
    assert any(re.fullmatch(r"(sum|max)( by \(instance\))? ?\(logitserve_result_bytes\)", e) for e in exprs)
    assert "avg(logitserve_queue_tokens)" in joined  # the autoscaling signal, per pod


def test_dashboard_is_well_formed(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for title, expr in _exprs(dashboard):
        assert expr.count("(") == expr.count(")"), title
        assert expr.count("{") == expr.count("}"), title
        # histogram_quantile needs the le label kept through the aggregation
        if "histogram_quantile" in expr:
            assert re.search(r"by \([^)]*\ble\b", expr), title
            assert "_bucket[" in expr, title
        words = set(re.findall(r"\b([a-z_]+)\s*\(", expr))
        assert words <= PROMQL_FUNCTIONS_AND_KEYWORDS, f"{title}: unexpected functions {words - PROMQL_FUNCTIONS_AND_KEYWORDS}"
    # Grafana resolves ${datasource} from the dashboard's own datasource variable.
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        uid = panel["datasource"]["uid"]
        assert uid.strip("${}") in names
