"""Error statuses, back-pressure, timeouts, disconnects, worker failure and drain, each from real requests.

A worker is paused with SIGSTOP to hold a batch in flight deterministically, then resumed (SIGCONT) or killed.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest

from tests.service.reference import check_logits_response

KEY = "sekret"
SEQ8 = [[1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def server(start_server, checkpoint):
    server = start_server(checkpoint, "--max-queue-tokens", "40", "--request-timeout", "4",
                          "--max-request-bytes", "2000", api_key=KEY)
    yield server
    server.stop()


def _status(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"type", "message", "param"}
    return r


class paused:
    """SIGSTOP the replica's ranks for the duration of the block."""

    def __init__(self, server, replica: int = 0):
        self.pids = server.worker_pids(replica)

    def __enter__(self):
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _post(server, body, path="/v1/logits", timeout=30):
    with server.client(timeout=timeout) as c:
        return c.post(path, json=body)


def test_api_key(server):
    _status(httpx.post(server.url + "/v1/logits", json={"input_ids": SEQ8}), 401)
    _status(httpx.post(server.url + "/v1/logits", json={"input_ids": SEQ8}, headers={"Authorization": "Bearer nope"}), 401)
    _status(httpx.get(server.url + "/info"), 401)
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200
    assert _post(server, {"input_ids": SEQ8}).status_code == 200


def test_unsupported_option_400(server):
    r = _status(_post(server, {"inputs": "no tokenizer here"}), 400)
    assert r.json()["error"]["param"] == "inputs"


def test_body_too_large_413(server):
    r = _status(_post(server, {"input_ids": [[1] * 200] * 5}), 413)
    assert "2000" in r.json()["error"]["message"]


def test_queue_full_429_while_admitted_requests_succeed(server, runner):
    body = {"input_ids": SEQ8, "target_logprobs": True}
    with cf.ThreadPoolExecutor(16) as pool:
        with paused(server):
            # running + prefetched in the paused replica: one after the other, so that they are two batches
            held = [pool.submit(_post, server, body)]
            time.sleep(0.5)
            held.append(pool.submit(_post, server, body))
            time.sleep(0.5)
            flood = [pool.submit(_post, server, body) for _ in range(12)]
            deadline = time.monotonic() + 2  # refusals are immediate; admitted requests wait for the paused worker
            while sum(f.done() for f in flood) < 12 - 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [f.result() for f in flood if f.done() and f.result().status_code == 429]
            assert len(refused) >= 12 - 5, [f.done() for f in flood]
            for r in refused:
                _status(r, 429)
                assert int(r.headers["Retry-After"]) >= 1
    results = [f.result() for f in held + flood]
    ok = [r for r in results if r.status_code == 200]
    assert len(ok) == len(results) - len(refused) >= 2 + 5 - 1
    for r in ok:
        check_logits_response(runner, body, SEQ8, r.json())


def test_request_timeout_504(server):
    with paused(server):
        t0 = time.monotonic()
        r = _post(server, {"input_ids": SEQ8})
        _status(r, 504)
        assert 3.5 < time.monotonic() - t0 < 10
    assert _post(server, {"input_ids": SEQ8}).status_code == 200


def test_disconnected_client_work_is_dropped_before_a_worker(server):
    before = server.metric("logitserve_batch_sequences_count")
    with cf.ThreadPoolExecutor(4) as pool:
        with paused(server):
            # running + prefetched in the paused replica: one after the other, so that they are two batches (sent
            # together the batcher may pack them into one, leaving a slot that would take the request below)
            held = [pool.submit(_post, server, {"input_ids": SEQ8})]
            time.sleep(0.5)
            held.append(pool.submit(_post, server, {"input_ids": SEQ8}))
            time.sleep(0.5)
            with pytest.raises(httpx.ReadTimeout):
                _post(server, {"input_ids": [[9] * 20]}, timeout=0.5)
            deadline = time.monotonic() + 2
            while server.metric("logitserve_queue_tokens") != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.metric("logitserve_queue_tokens") == 0
    assert all(f.result().status_code == 200 for f in held)
    time.sleep(0.3)
    assert server.metric("logitserve_batch_sequences_count") - before == 2  # the dropped request never ran


def test_killed_worker_503_then_recovers(server, runner):
    pids = server.worker_pids()
    with cf.ThreadPoolExecutor(2) as pool:
        with paused(server):
            held = pool.submit(_post, server, {"input_ids": SEQ8})
            time.sleep(0.5)
            os.kill(pids[0], signal.SIGKILL)
        r = held.result()
    _status(r, 503)
    assert r.json()["error"]["type"] == "worker_failed" and int(r.headers["Retry-After"]) >= 1
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503 and "restarting" in ready.json()["error"]["message"]
    server.wait_ready(timeout=90)
    assert server.worker_pids() != pids
    assert server.metric("logitserve_worker_restarts_total") == 1
    body = {"input_ids": SEQ8 + [[5, 6, 7]], "return_logits": "all", "top_k": 3}
    r = _post(server, body)
    assert r.status_code == 200, r.text
    check_logits_response(runner, body, body["input_ids"], r.json())


def test_loading_503_then_sigterm_drains(start_server, checkpoint, runner):
    server = start_server(checkpoint, ready=False)
    server.wait_http()
    r = httpx.post(server.url + "/v1/logits", json={"input_ids": SEQ8})
    _status(r, 503)
    assert int(r.headers["Retry-After"]) >= 1
    assert httpx.get(server.url + "/ready").status_code == 503
    server.wait_ready()
    body = {"input_ids": SEQ8, "return_logits": "all"}
    with cf.ThreadPoolExecutor(6) as pool:
        with paused(server):
            inflight = [pool.submit(_post, server, body) for _ in range(5)]
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.HTTPError):
                r = httpx.post(server.url + "/v1/logits", json=body, timeout=2)
                assert r.status_code == 503  # refused either way
                raise httpx.ConnectError("refused with 503")
        for f in inflight:
            r = f.result()
            assert r.status_code == 200, r.text
            check_logits_response(runner, body, SEQ8, r.json())
    assert server.proc.wait(timeout=30) == 0
