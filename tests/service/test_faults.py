"""Faults under load: a rank SIGKILLed while requests stream in, a hung rank, out-of-memory in a batch, SIGTERM.

The promise checked each time: every request gets an answer (a correct 200, or a 503 with Retry-After when it
was in the failing batch or refused), none hangs, no request is lost silently, and the server serves correctly
afterwards. (test_lifecycle.py covers the single-request versions: a killed idle worker, 504, drain of paused
work.)

The fault server runs tp=2 so that a fault hits one rank of a replica, with `LOGITSERVE_WORKER_TIMEOUT=3` (a hung
rank is detected in 3 s) and `LOGITSERVE_FAULT_OOM_TOKENS=64` (a forward over >= 64 tokens raises
torch.OutOfMemoryError: the test-only hook of service/workers.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import threading
import time

import httpx
import pytest

from tests.service.reference import check_hidden_response, check_logits_response

OOM_TOKENS = 64


@pytest.fixture(scope="module")
def server(start_server, checkpoint):
    server = start_server(checkpoint, "--tp", "2", env={"LOGITSERVE_WORKER_TIMEOUT": "3",
                                                        "LOGITSERVE_FAULT_OOM_TOKENS": str(OOM_TOKENS)})
    yield server
    server.stop()


def _body(rng: random.Random) -> tuple[str, dict]:
    seqs = [[rng.randrange(1, 250) for _ in range(rng.randint(2, 10))] for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.7:
        return "/v1/logits", {"input_ids": seqs, "return_logits": "all", "logits": False, "target_logprobs": True,
                              "top_k": 2}
    return "/v1/hidden_states", {"input_ids": seqs, "return_hidden_states": "last", "layers": [-1, 1]}


def _check(runner, path: str, body: dict, r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    if path == "/v1/logits":
        check_logits_response(runner, body, body["input_ids"], r.json())
    else:
        check_hidden_response(runner, body, body["input_ids"], r.json())


def _load(server, stop: threading.Event, seed: int, fresh_connections: bool = False) -> list:
    """Send requests until `stop`; each outcome is (path, body, response or the exception)."""
    rng = random.Random(seed)
    out = []
    with server.client(timeout=60) as c:
        while not stop.is_set():
            path, body = _body(rng)
            try:
                if fresh_connections:
                    r = httpx.post(server.url + path, json=body, headers=server.headers, timeout=60)
                else:
                    r = c.post(path, json=body)
                out.append((path, body, r))
            except httpx.HTTPError as exc:
                out.append((path, body, exc))
                if fresh_connections and isinstance(exc, httpx.ConnectError):
                    time.sleep(0.05)
    return out


def test_sigkill_rank_under_load(server, runner):
    pids = server.worker_pids()
    restarts = server.metric("logitserve_worker_restarts_total")
    stop = threading.Event()
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_load, server, stop, seed) for seed in range(4)]
        time.sleep(1.5)
        os.kill(pids[1], signal.SIGKILL)  # rank 1 of the replica, while batches stream through it
        server.wait_ready(timeout=90)
        time.sleep(1.5)  # and keep the load on the restarted replica
        stop.set()
        outcomes = [o for f in futures for o in f.result(timeout=120)]
    failed = [r for _, _, r in outcomes if not isinstance(r, httpx.Response)]
    assert not failed, failed[:3]  # nothing hung or was dropped
    statuses = [r.status_code for _, _, r in outcomes]
    assert set(statuses) <= {200, 503}, statuses
    assert 1 <= statuses.count(503) <= 4, statuses  # only the batch that was running on the dead replica
    for path, body, r in outcomes:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "worker_failed" and int(r.headers["Retry-After"]) >= 1
        else:
            _check(runner, path, body, r)
    assert statuses.count(200) > 20
    assert server.worker_pids() != pids
    assert server.metric("logitserve_worker_restarts_total") == restarts + 1
    print(f"\nSIGKILL under load: {len(outcomes)} requests, {statuses.count(200)} correct, "
          f"{statuses.count(503)} x 503, 0 lost")


def test_hung_rank_is_detected_by_the_worker_timeout(server, runner):
    pids = server.worker_pids()
    body = {"input_ids": [[5, 6, 7, 8]], "return_logits": "all"}
    os.kill(pids[1], signal.SIGSTOP)  # rank 1 hangs; rank 0 blocks in a collective with it
    try:
        t0 = time.monotonic()
        with server.client(timeout=60) as c:
            r = c.post("/v1/logits", json=body)
        elapsed = time.monotonic() - t0
    finally:
        try:
            os.kill(pids[1], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "worker_failed" and "hung" in r.json()["error"]["message"]
    assert 2.5 < elapsed < 20, elapsed
    server.wait_ready(timeout=90)
    assert server.worker_pids() != pids
    with server.client() as c:
        _check(runner, "/v1/logits", body, c.post("/v1/logits", json=body))


def test_out_of_memory_batch_is_split_and_the_culprit_fails_alone(server, runner):
    pids = server.worker_pids()
    restarts = server.metric("logitserve_worker_restarts_total")
    retries = server.metric("logitserve_oom_retries_total")
    rng = random.Random(7)
    small = [{"input_ids": [[rng.randrange(1, 250) for _ in range(12)]], "return_logits": "all",
              "target_logprobs": True, "top_k": 3} for _ in range(5)]
    huge = {"input_ids": [[rng.randrange(1, 250) for _ in range(OOM_TOKENS + 6)]]}
    bodies = small[:3] + [huge] + small[3:]  # 5 x 12 + 70 tokens: one batch over the limit

    def post(body):
        with server.client(timeout=60) as c:
            return c.post("/v1/logits", json=body)

    with cf.ThreadPoolExecutor(8) as pool:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            fillers = [pool.submit(post, {"input_ids": [[1, 2]]}) for _ in range(2)]  # running + prefetched
            time.sleep(0.5)
            futures = []
            for body in bodies:  # queued behind them, in this order: they leave the queue as one batch
                futures.append(pool.submit(post, body))
                time.sleep(0.05)
            time.sleep(0.5)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert all(f.result(timeout=60).status_code == 200 for f in fillers)
        results = [f.result(timeout=60) for f in futures]
    for body, r in zip(bodies, results):
        if body is huge:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "out_of_memory" and int(r.headers["Retry-After"]) >= 1
            assert "70 tokens" in r.json()["error"]["message"]
        else:
            _check(runner, "/v1/logits", body, r)
    assert server.metric("logitserve_oom_retries_total") > retries  # the batch was split and retried
    assert server.metric("logitserve_worker_restarts_total") == restarts  # no restart for an OOM
    assert server.worker_pids() == pids
    body = {"input_ids": [[3, 4, 5]], "return_logits": "all"}
    with server.client() as c:
        _check(runner, "/v1/logits", body, c.post("/v1/logits", json=body))


def test_sigterm_under_load_loses_nothing(start_server, checkpoint, runner):
    server = start_server(checkpoint)
    stop = threading.Event()
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_load, server, stop, seed, True) for seed in range(4)]
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
        time.sleep(0.3)
        stop.set()
        outcomes = [o for f in futures for o in f.result(timeout=60)]
    assert code == 0
    answered = [(p, b, r) for p, b, r in outcomes if isinstance(r, httpx.Response)]
    refused = [r for _, _, r in outcomes if isinstance(r, httpx.ConnectError)]
    lost = [r for _, _, r in outcomes if not isinstance(r, (httpx.Response, httpx.ConnectError))]
    assert not lost, lost[:3]  # every request was answered, or refused before the server read it
    for path, body, r in answered:
        if r.status_code == 503:
            assert r.json()["error"]["message"] == "the server is draining"
        else:
            _check(runner, path, body, r)
    assert sum(r.status_code == 200 for _, _, r in answered) >= 4 and refused
    print(f"\nSIGTERM under load: {len(answered)} answered "
          f"({sum(r.status_code == 200 for _, _, r in answered)} x 200), {len(refused)} refused at connect, 0 lost")
