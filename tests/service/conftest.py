"""Real servers for the service tests: `python -m service serve` in a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, *args: str, log_dir: Path, env: dict | None = None, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_dir / f"server-{self.port}.log"
        # model None: no --model flag, the embedded default model is served
        model_flag = ["--model", str(model)] if model is not None else []
        cmd = [sys.executable, "-m", "service", "serve", *model_flag, "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITSERVE_")}
        full_env.update(env or {})
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)

    def wait_http(self, timeout: float = 60) -> None:
        self._wait(lambda r: r.status_code == 200, "/health", timeout)

    def wait_ready(self, timeout: float = 90) -> None:
        self._wait(lambda r: r.status_code == 200, "/ready", timeout)

    def _wait(self, ok, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if ok(httpx.get(self.url + path, timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not ok after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def info(self) -> dict:
        return httpx.get(self.url + "/info", headers=self.headers, timeout=10).json()

    def worker_pids(self, replica: int = 0) -> list[int]:
        return self.info()["workers"][replica]["pids"]

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line == name:
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(model, *flags, ready=True, env=None, api_key=None) -> ServerProcess, stopped at session end."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    started: list[ServerProcess] = []

    def start(model, *args, ready: bool = True, env: dict | None = None, api_key: str | None = None) -> ServerProcess:
        server = ServerProcess(model, *args, log_dir=log_dir, env=env, api_key=api_key)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def reference_runner(tiny_checkpoint):
    """The model run in-process by the same runner the workers use: exact reference values."""
    from model.runtime.runner import ModelRunner

    return ModelRunner.load(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_reference(tiny_checkpoint):
    from tests.checkpoints import load_reference

    return load_reference(tiny_checkpoint)


@pytest.fixture(scope="session")
def checkpoint(checkpoint_factory):
    """A tiny Llama without a tokenizer (token-id input only): the fault and lifecycle servers' model."""
    return checkpoint_factory("llama", with_tokenizer=False)


@pytest.fixture(scope="session")
def runner(checkpoint):
    """`checkpoint` run in-process by the workers' runner: the reference for answers under faults."""
    from model.runtime.runner import ModelRunner

    return ModelRunner.load(checkpoint, device="cpu", dtype="float32")
