"""docker-compose.yml: structure (PyYAML) and validation by a Compose implementation when one is installed."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.conftest import serve_setting_env_names


@pytest.fixture(scope="module")
def compose(root):
    return yaml.safe_load((root / "docker-compose.yml").read_text())


def test_logitserve_service_builds_cuda_target_with_all_gpus(compose):
    svc = compose["services"]["logitserve"]
    assert svc["build"]["target"] == "cuda"
    assert svc["build"]["context"] == "."
    assert any(str(p).endswith(":8000") for p in svc["ports"])
    env = svc["environment"]
    assert env["LOGITSERVE_TP"] == "${LOGITSERVE_TP:-1}"
    assert env["LOGITSERVE_DEVICE"] == "cuda"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # NCCL needs far more than Docker's default 64 MB of /dev/shm.
    shm = str(svc["shm_size"]).lower()
    assert shm.endswith("gb") and int(shm[:-2]) >= 1
    health = svc["healthcheck"]["test"]
    assert "/ready" in " ".join(health)
    assert "profiles" not in svc, "the server itself runs without any profile"


def test_env_names_are_serve_settings(compose):
    known = serve_setting_env_names()
    used = {k for k in compose["services"]["logitserve"]["environment"] if k.startswith("LOGITSERVE_")}
    assert used and used <= known, f"unknown settings: {sorted(used - known)}"


def test_monitoring_profile(compose, root):
    prom, graf = compose["services"]["prometheus"], compose["services"]["grafana"]
    assert prom["profiles"] == ["monitoring"] and graf["profiles"] == ["monitoring"]
    mounts = " ".join(prom["volumes"])
    assert "./deploy/prometheus/prometheus.yml:" in mounts
    config = yaml.safe_load((root / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["logitserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "logitserve:8000" in job["static_configs"][0]["targets"]

    gmounts = " ".join(graf["volumes"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in gmounts
    assert "./deploy/grafana/dashboards:" in gmounts
    ds = yaml.safe_load((root / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((root / "deploy/grafana/provisioning/dashboards/logitserve.yml").read_text())
    dash_path = prov["providers"][0]["options"]["path"]
    graf_dash_mount = next(v for v in graf["volumes"] if v.startswith("./deploy/grafana/dashboards:"))
    assert graf_dash_mount.split(":")[1] == dash_path, "the provider reads where the dashboards are mounted"
    assert (root / "deploy/grafana/dashboards/logitserve.json").is_file()


def _compose_cli():
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.parametrize("profile", [None, "monitoring"])
def test_compose_config_validates(root, profile):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose implementation installed (docker-compose or the docker compose plugin)")
    cmd = cli + ["-f", str(root / "docker-compose.yml")]
    if profile:
        cmd += ["--profile", profile]
    env = {**os.environ, "LOGITSERVE_TP": "2"}
    proc = subprocess.run(cmd + ["config"], capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    svc = resolved["services"]["logitserve"]
    assert str(svc["environment"]["LOGITSERVE_TP"]) == "2", "LOGITSERVE_TP is taken from the environment"
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    services = subprocess.run(cmd + ["config", "--services"], capture_output=True, text=True, cwd=root, env=env,
                              timeout=120)
    assert services.returncode == 0, services.stderr
    names = set(services.stdout.split())
    assert "logitserve" in names
    if profile == "monitoring":
        assert {"prometheus", "grafana"} <= names
