"""Abandoned work stops (service/batcher.py, service/workers/): a request whose client has gone is never computed,
a batch whose every request has gone stops at the next block, SIGTERM ends a long batch within seconds, a
request larger than the whole queue is refused, and workers never outlive the front end.

A long batch is made with the worker's fault injection LOGITSERVE_FAULT_SLOW_BLOCK_S: every block of a forward
takes that much longer (12 blocks of 1 s: a 13 s batch).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import psutil
import pytest

SLOW = {"LOGITSERVE_FAULT_SLOW_BLOCK_S": "1"}
LAYERS = 12
BODY = {"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8]]}


@pytest.fixture(scope="module")
def slow_checkpoint(checkpoint_factory):
    return checkpoint_factory("llama", num_layers=LAYERS, with_tokenizer=False)


@pytest.fixture(scope="module")
def server(start_server, slow_checkpoint):
    server = start_server(slow_checkpoint, "--max-queue-tokens", "64", env=SLOW)
    yield server
    server.stop()


def _post(server, body=BODY, timeout=60.0):
    return httpx.post(server.url + "/v1/logits", json=body, timeout=timeout)


def _gives_up(server, after: float) -> None:
    with pytest.raises(httpx.ReadTimeout):
        _post(server, timeout=after)


def _wait_metric(server, name: str, value: float, within: float) -> float:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.metric(name) >= value:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"{name} is {server.metric(name)} after {within}s, not {value}")


def test_an_abandoned_running_batch_stops_within_5s(server):
    cancelled = server.metric("logitserve_cancelled_batches_total")
    done = server.metric("logitserve_inference_duration_seconds_count")
    _gives_up(server, after=2.0)
    t_gone = time.monotonic()
    stopped = _wait_metric(server, "logitserve_cancelled_batches_total", cancelled + 1, within=5)
    assert stopped - t_gone < 5
    assert server.metric("logitserve_inference_duration_seconds_count") == done  # no batch ran to its end
    r = _post(server, {"input_ids": [[1, 2]]})  # the replica is free again: a full batch of 12 slow blocks
    assert r.status_code == 200, r.text


def test_abandoned_queued_and_prefetched_requests_never_run(server):
    cancelled = server.metric("logitserve_cancelled_batches_total")
    dispatched = server.metric("logitserve_batch_sequences_count")
    done = server.metric("logitserve_inference_duration_seconds_count")
    with cf.ThreadPoolExecutor(3) as pool:
        running = pool.submit(_gives_up, server, 6.0)  # running on the replica
        time.sleep(0.7)
        prefetched = pool.submit(_gives_up, server, 5.0)  # in the replica's pipe, behind it
        time.sleep(0.7)
        queued = pool.submit(_gives_up, server, 1.0)  # no free slot: waits in the front end's queue
        queued.result()
        prefetched.result()
        running.result()
    _wait_metric(server, "logitserve_cancelled_batches_total", cancelled + 2, within=5)
    time.sleep(0.5)
    assert server.metric("logitserve_batch_sequences_count") - dispatched == 2  # the queued one was never sent
    assert server.metric("logitserve_inference_duration_seconds_count") == done
    assert server.metric("logitserve_queue_tokens") == 0


def test_a_request_larger_than_the_whole_queue_is_413(server):
    r = _post(server, {"input_ids": [[1] * 65]})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["type"] == "payload_too_large" and "--max-queue-tokens 64" in err["message"]


def test_sigterm_during_a_long_batch_exits_within_10s(start_server, slow_checkpoint):
    server = start_server(slow_checkpoint, env=SLOW)
    with cf.ThreadPoolExecutor(1) as pool:
        held = pool.submit(_post, server)
        time.sleep(1.5)  # the batch is running: 13 s left
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=10)
        exited = time.monotonic() - t0
        r = held.result()
    assert exited < 10, exited
    assert server.proc.returncode == 0
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_9_of_the_front_end_leaves_no_worker(start_server, slow_checkpoint):
    server = start_server(slow_checkpoint, env=SLOW)
    pids = server.worker_pids()
    with cf.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: httpx.post(server.url + "/v1/logits", json=BODY, timeout=30))
        time.sleep(1.5)  # the worker is inside a long batch
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [p for p in pids if _alive(p)]
    for p in alive:  # leave nothing behind whatever the outcome
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the front end"
