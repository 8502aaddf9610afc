"""Bounded memory (the results budget, --max-result-bytes): a request's result size is known before it runs and
matches what the worker writes; streamed JSON is today's JSON byte for byte; the batcher holds batches back while
the budget is spent and splits batches by result bytes; a real server refuses an oversize response before any
forward, frees a disconnected client's results, and keeps its process tree's memory within the budget under
concurrent large requests from slow readers, answering every one in full; a reader that stops reading is dropped
after the send timeout and its results released, while a slow reader that keeps reading is served in full."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import orjson
import pytest
import torch

from model.runtime.outputs import OutputSpec
from service import responses
from service.batcher import Batcher, Work
from service.budget import ResultBudget, ResultDims, result_bytes
from service.engine import Scored
from service.metrics import Metrics
from service.workers.wire import MappedBatch, write_results
from service.workers.protocol import BatchDone, RequestSpan

SAFETENSORS = "application/x-safetensors"

SPECS = [
    OutputSpec(),
    OutputSpec(return_logits="all", target_logprobs=True, top_k=3),
    OutputSpec(return_logits="variable", return_n_logits=4, logits=False, top_k=2),
    OutputSpec(return_logits="all", logits=False, target_logprobs=True),
    OutputSpec(logits=False, return_hidden_states="all", layers=(0, 2, 3)),
    OutputSpec(return_logits="all", return_hidden_states="last_normalized", layers=(1,)),
    OutputSpec(return_logits="all", logits=False, vocab_ids=(3, 5, 7), target_ranks=True, entropy=True),
]


# ------------------------------------------------------------------------------------------ sizes and encoding


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_result_bytes_is_what_the_worker_writes(spec, reference_runner, tiny_checkpoint):
    """The size the batcher reserves before dispatch is the size of the request's shared-memory segment, from the
    output kinds table alone."""
    from model.families.config import ModelConfig
    from service.packing import pack_ids

    lengths = [3, 7, 2]
    ids, offsets = pack_ids([list(range(5, 5 + n)) for n in lengths])
    outs = reference_runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), [spec] * len(lengths))
    name = f"logitserve_test_{time.monotonic_ns()}"
    [result] = write_results(outs, [RequestSpan(0, len(lengths))], name)
    mapped = MappedBatch(BatchDone(0, [result], 0.0, 0))  # maps and unlinks the segment
    dims = ResultDims.of(ModelConfig.from_pretrained(str(tiny_checkpoint)))
    assert result_bytes(spec, dims, lengths) == result.nbytes
    assert sum(a.nbytes for a in mapped.outputs(0).arrays.values()) <= result.nbytes


def test_streamed_json_is_the_same_bytes():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((40, 3000)).astype(np.float32)  # 12 KB rows: streamed row by row
    logits[3, 7] = np.nan
    hidden = rng.standard_normal((3, 50, 200)).astype(np.float32)
    obj = {"object": "logits", "data": [
        {"index": 0, "positions": np.arange(40), "logits": logits, "top_k": {"ids": rng.integers(0, 9, (40, 2))}},
        {"index": 1, "logits": logits[:0], "hidden_states": hidden[:, 5:45], "none": None, "t": [1.5, "é\"x"], "id2label": {0: "no", 1: "yes"}},
    ], "usage": {"prompt_tokens": 3}}
    whole = orjson.dumps(_contiguous(obj), option=responses.JSON_OPTIONS)
    chunks = list(responses.iter_json(obj, chunk=1 << 14))
    # no chunk holds more than the chunk size and one leaf array's text (at most ~3 characters per byte)
    assert len(chunks) > 10 and max(map(len, chunks)) < (1 << 14) + 3 * responses.JSON_LEAF_BYTES
    assert b"".join(chunks) == whole


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_cast_as_it_is_sent(dtype):
    """A large array's half-precision bytes are made a slice at a time, equal to the whole cast."""
    arr = np.random.default_rng(1).standard_normal((700, 411)).astype(np.float32)  # > STREAM_BYTES, odd sizes
    arr[5, 5] = np.nan
    view = np.frombuffer(arr.tobytes(), dtype=np.float32).reshape(arr.shape)  # read-only, as shared memory is
    lazy, code = responses.wire_array(view, dtype)
    assert isinstance(lazy, responses.CastBytes) and code in ("F16", "BF16")
    whole, _ = responses.cast(view, dtype)

    async def streamed():
        return b"".join([piece async for piece in responses._slices([lazy], responses.STREAM_BYTES)])

    assert asyncio.run(streamed()) == whole.tobytes() == lazy[0 : len(lazy)]


def _contiguous(obj):
    if isinstance(obj, dict):
        return {k: _contiguous(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_contiguous(v) for v in obj]
    return np.ascontiguousarray(obj) if isinstance(obj, np.ndarray) else obj


# ------------------------------------------------------------------------------------------------ the batcher


class _Replica:
    index = 0

    def __init__(self):
        self.batches, self.futures = [], []

    @property
    def free_slots(self):
        return 2 - sum(not f.done() for f in self.futures)

    def submit(self, batch):
        fut = asyncio.get_running_loop().create_future()
        self.batches.append(batch)
        self.futures.append(fut)
        return fut


class _Pool:
    def __init__(self, replica):
        self.replica = replica

    def pick(self):
        return self.replica if self.replica.free_slots > 0 else None


class _Answer:
    def __init__(self, batch):
        from service.workers.protocol import RequestResult

        self.done = BatchDone(0, [RequestResult() for _ in batch.spans], 0.001, 0)

    def outputs(self, index, reservation=None):
        return None


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_batcher_holds_batches_back_while_the_budget_is_spent():
    async def main():
        loop = asyncio.get_running_loop()
        metrics, wake = Metrics(), asyncio.Event()
        budget = ResultBudget(100, metrics.result_bytes, on_release=wake.set)  # batches hold at most 25 bytes
        replica = _Replica()
        b = Batcher(_Pool(replica), max_batch_tokens=1000, max_queue_tokens=10_000, metrics=metrics, budget=budget,
                    wake=wake)
        b.start()
        ws = [Work(np.arange(4), [4], None, loop.create_future(), result_bytes=n) for n in (10, 10, 60, 35, 10)]
        for w in ws:
            b.submit(w)
        await _settle()
        # 10 + 10 in one batch; 60 alone (over a batch's share); 35 would pass the budget: held back
        assert [len(bt.spans) for bt in replica.batches] == [2, 1]
        assert budget.used == 80 and metrics.result_bytes._value.get() == 80
        for fut, bt in zip(replica.futures, replica.batches):
            fut.set_result(_Answer(bt))
        await _settle()
        assert budget.used == 80  # answered but not yet sent: still held, nothing new goes
        assert len(replica.batches) == 2
        ws[0].future.result().reservation.release()
        ws[0].future.result().reservation.release()  # idempotent
        await _settle()
        assert len(replica.batches) == 2  # 70 + 35 > 100: still waiting
        ws[2].future.result().reservation.release()
        await _settle()
        assert [len(bt.spans) for bt in replica.batches] == [2, 1, 1, 1]  # 35, then 10 (35 + 10 > 25)
        assert budget.used == 10 + 35 + 10
        # a request abandoned while its batch runs gives its bytes back when the batch ends
        ws[4].future.cancel()
        replica.futures[3].set_result(_Answer(replica.batches[3]))
        await _settle()
        assert budget.used == 10 + 35
        await b.stop()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ a real server

VOCAB = 16384  # 64 KB of logits per row
TOKENS = 500  # one request: 500 rows, 32 MiB of logits, ~90 MB of JSON text
REQUEST_BYTES = TOKENS * VOCAB * 4
BUDGET = 2 * REQUEST_BYTES + (4 << 20)  # two such requests at a time


@pytest.fixture(scope="module")
def wide_server(checkpoint_factory, start_server):
    model = checkpoint_factory("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                               num_heads=2, num_kv_heads=1, max_position_embeddings=4096)
    return start_server(model, "--max-result-bytes", str(BUDGET), "--max-batch-tokens", "2048")


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


def _batches(server) -> float:
    return server.metric('logitserve_replica_batches_total{replica="0"}')


def test_too_large_is_refused_before_any_forward(wide_server):
    before = _batches(wide_server)
    with wide_server.client() as c:
        r = c.post("/v1/logits", json={"input_ids": [_ids(1200, 0)], "return_logits": "all"})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["type"] == "response_too_large"
        assert str(1200 * VOCAB * 4 + 1200 * 8) in error["message"] and "logits: false" in error["message"]
        # the same rows without full logits fit
        assert c.post("/v1/logits", json={"input_ids": [_ids(1200, 0)], "return_logits": "all", "logits": False,
                                          "top_k": 2}).status_code == 200
    assert _batches(wide_server) == before + 1  # only the second request ran


def test_streamed_json_equals_the_binary_results(wide_server):
    body = {"input_ids": [_ids(TOKENS, 1), _ids(30, 2)], "return_logits": "all", "target_logprobs": True,
            "top_k": 3}
    with wide_server.client() as c:
        r = c.post("/v1/logits", json=body)
        b = c.post("/v1/logits", json=body, headers={"accept": SAFETENSORS})
        half = c.post("/v1/logits", json={**body, "dtype": "bfloat16"}, headers={"accept": SAFETENSORS})
    assert r.status_code == 200 and b.status_code == 200 and half.status_code == 200
    assert "content-length" not in r.headers  # streamed
    from service.client import read_safetensors

    data = orjson.loads(r.content)["data"]
    binary, _ = read_safetensors(b.content)
    logits = np.concatenate([np.asarray(d["logits"], dtype=np.float32) for d in data])
    assert np.array_equal(logits, binary["logits"])  # float32 text round-trips to the same bits
    widened = torch.from_numpy(binary["logits"].copy()).to(torch.bfloat16).float().numpy()
    assert np.array_equal(read_safetensors(half.content)[0]["logits"], widened)  # cast a slice at a time
    ids = binary["top_k_ids"]
    assert [d["top_k"]["ids"] for d in data] == [ids[:TOKENS].tolist(), ids[TOKENS:].tolist()]
    assert _wait_gauge(wide_server, 0)


def _wait_gauge(server, value: float, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric("logitserve_result_bytes") == value:
            return True
        time.sleep(0.05)
    return False


def test_a_disconnect_frees_its_results(wide_server):
    with httpx.Client(base_url=wide_server.url, timeout=60) as c:
        with c.stream("POST", "/v1/logits", json={"input_ids": [_ids(TOKENS, 3)], "return_logits": "all"}) as r:
            assert r.status_code == 200
            chunks = r.iter_bytes()
            next(chunks)
            assert wide_server.metric("logitserve_result_bytes") >= REQUEST_BYTES  # held while it is being read
            chunks.close()
    # the client is gone with most of the body unread
    assert _wait_gauge(wide_server, 0), wide_server.metric("logitserve_result_bytes")
    with wide_server.client() as c:  # and the server answers the next request in full
        assert c.post("/v1/logits", json={"input_ids": [_ids(40, 4)], "return_logits": "all"}).status_code == 200
        assert c.post("/v1/embeddings", json={"input": [_ids(40, 5)]}).status_code == 200
    assert _wait_gauge(wide_server, 0)  # nothing held once the answers are sent


def _tree_pss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


@pytest.mark.slow
def test_budget_holds_under_slow_readers(wide_server):
    """Six clients ask at once for 32 MiB of logits each as JSON and read slowly; the budget holds two at a time.
    The server tree's memory (PSS, sampled every 20 ms) stays within the budget plus one request's working copy
    in the worker and a fixed allowance, below what six requests' results alone would take; every body arrives
    in full and parses."""
    clients = 6
    pid = wide_server.proc.pid
    with wide_server.client() as c:  # warm: the worker's first batch sizes its allocator
        c.post("/v1/logits", json={"input_ids": [_ids(TOKENS, 9)], "return_logits": "all", "logits": False})
    baseline = _tree_pss(pid)
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_pss(pid))
            time.sleep(0.02)

    held = []

    def slow_client(i: int):
        with httpx.Client(base_url=wide_server.url, timeout=120) as c:
            with c.stream("POST", "/v1/logits", json={"input_ids": [_ids(TOKENS, 100 + i)], "return_logits": "all"}) as r:
                time.sleep(1.0)  # a slow reader: its results are held meanwhile
                held.append(wide_server.metric("logitserve_result_bytes"))
                body = b"".join(r.iter_bytes(1 << 16))
            return r.status_code, body

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(slow_client, range(clients)))
    stop.set()
    sampler.join()
    for status, body in answers:
        assert status == 200
        [item] = orjson.loads(body)["data"]
        assert item["num_tokens"] == TOKENS and len(item["logits"]) == TOKENS and len(item["logits"][0]) == VOCAB
    assert max(held) <= BUDGET
    growth = peak[0] - baseline
    allowance = 64 << 20  # JSON chunks in flight, allocator slack
    print(f"baseline {baseline / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB, "
          f"budget {BUDGET / 2**20:.0f} MiB, six requests' results {clients * REQUEST_BYTES / 2**20:.0f} MiB")
    assert growth <= BUDGET + REQUEST_BYTES + allowance
    assert growth < clients * REQUEST_BYTES
    assert _wait_gauge(wide_server, 0)


def test_streamed_completions_echo_equals_prompt_by_prompt(wide_server):
    """/v1/completions with echo + logprobs over long prompts is streamed a prompt at a time; each choice is the
    one the same prompt gets alone (built whole)."""
    from service.routes.openai import ECHO_STREAM_TOKENS

    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 290, 1100).tolist() for _ in range(4)]  # ids the tiny tokenizer decodes
    assert sum(map(len, prompts)) > ECHO_STREAM_TOKENS > 1100
    ask = {"model": "m", "echo": True, "logprobs": 2, "max_tokens": 1}
    with wide_server.client() as c:
        r = c.post("/v1/completions", json={**ask, "prompt": prompts})
        alone = [c.post("/v1/completions", json={**ask, "prompt": [p]}) for p in prompts]
    assert r.status_code == 200 and "content-length" not in r.headers
    assert all(a.status_code == 200 and "content-length" in a.headers for a in alone)
    choices = orjson.loads(r.content)["choices"]
    for i, a in enumerate(alone):
        [one] = a.json()["choices"]
        assert choices[i] == {**one, "index": i}
    assert _wait_gauge(wide_server, 0)


# ------------------------------------------------------------------------------------------ the send timeout


class _Transport:
    def __init__(self):
        self.aborted = 0

    def abort(self):
        self.aborted += 1


class _Cycle:
    """uvicorn's request cycle as the send timeout sees it: a `send` bound to an object holding the transport. Each
    body send waits `waits[i]` seconds (None: forever, a client that stopped reading) before it is written."""

    def __init__(self, waits):
        self.transport = _Transport()
        self.waits = list(waits)
        self.body = []

    async def send(self, message):
        if message["type"] == "http.response.body" and message.get("body"):
            wait = self.waits.pop(0)
            await (asyncio.Event().wait() if wait is None else asyncio.sleep(wait))
            self.body.append(message["body"])


def _guarded_response(waits, timeout_s: float):
    """Send a 10-chunk BudgetedResponse through the send timeout to a client whose sends wait `waits`."""
    from service.send_timeout import SendTimeoutGuard

    released, metrics, cycle = [], Metrics(), _Cycle(waits)

    async def chunks():
        for i in range(10):
            yield bytes([i]) * 100

    budget = ResultBudget(1000, metrics.result_bytes, on_release=lambda: released.append(True))
    results = Scored(None, None, 0.0, 0.0, budget.reserve(1000))
    response = responses.BudgetedResponse(chunks(), results)

    async def receive():  # the client never disconnects by itself
        await asyncio.Event().wait()

    async def main():
        guard = SendTimeoutGuard(lambda scope, rcv, snd: response(scope, rcv, snd), timeout_s,
                                 metrics.send_timeouts)
        t0 = time.monotonic()
        await guard({"type": "http", "method": "POST", "path": "/v1/logits", "client": ("127.0.0.1", 1)},
                    receive, cycle.send)
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    return elapsed, cycle, released, metrics.send_timeouts._value.get()


def test_a_stalled_send_drops_the_connection_and_releases():
    elapsed, cycle, released, timeouts = _guarded_response([0, 0, 0, None], timeout_s=0.3)
    assert len(cycle.body) == 3 and cycle.transport.aborted == 1 and released == [True] and timeouts == 1
    assert 0.3 <= elapsed < 2


def test_a_slow_reader_within_the_send_timeout_gets_every_chunk():
    """Ten sends of 0.1 s each with a 0.3 s timeout: the body takes 1 s, three times the timeout, and completes."""
    elapsed, cycle, released, timeouts = _guarded_response([0.1] * 10, timeout_s=0.3)
    assert b"".join(cycle.body) == b"".join(bytes([i]) * 100 for i in range(10))
    assert cycle.transport.aborted == 0 and released == [True] and timeouts == 0 and elapsed >= 1.0


SEND_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def stall_server(checkpoint_factory, start_server):
    """The wide model with a 2 s send timeout."""
    model = checkpoint_factory("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                               num_heads=2, num_kv_heads=1, max_position_embeddings=4096)
    return start_server(model, "--max-result-bytes", str(BUDGET), "--max-batch-tokens", "2048",
                        env={"LOGITSERVE_SEND_TIMEOUT": str(SEND_TIMEOUT)})


def _stalled_client(server, path: str, body: dict, accept: str):
    """A raw connection with a small receive buffer that asks for a large body, reads its head and 64 KiB of it,
    then stops reading without closing. Returns the socket and the bytes read."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", server.port))
    payload = orjson.dumps(body)
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: {accept}\r\n"
                 f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
    got = b""
    while len(got) < 1 << 16:
        piece = sock.recv(1 << 14)
        assert piece, got[:300]
        got += piece
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    return sock, got


def _read_to_end(sock, limit: int) -> int:
    """Bytes the server still sends before its side is closed (the kernel's buffers hold some), up to `limit`."""
    total = 0
    try:
        while total < limit:
            piece = sock.recv(1 << 16)
            if not piece:
                break
            total += len(piece)
    except ConnectionResetError:
        pass
    return total


STALLED = {
    "safetensors": ("/v1/logits", {"input_ids": [_ids(TOKENS, 20)], "return_logits": "all"}, SAFETENSORS),
    "json": ("/v1/logits", {"input_ids": [_ids(TOKENS, 21)], "return_logits": "all"}, "application/json"),
}


@pytest.mark.parametrize("kind", STALLED)
def test_a_stalled_reader_is_dropped_after_the_send_timeout(stall_server, kind):
    """A client that stops reading a 32 MiB body without closing its connection: within the send timeout (and the
    time to fill the socket buffers) its results are released, the connection is dropped (the body ends short),
    the drop is counted and logged, and the next request is answered."""
    server = stall_server
    before = server.metric("logitserve_send_timeouts_total")
    path, body, accept = STALLED[kind]
    sock, got = _stalled_client(server, path, body, accept)
    stopped = time.monotonic()
    try:
        time.sleep(SEND_TIMEOUT / 2)
        assert server.metric("logitserve_result_bytes") >= REQUEST_BYTES  # held while the client stalls
        assert _wait_gauge(server, 0, timeout=SEND_TIMEOUT + 15), server.metric("logitserve_result_bytes")
        released_after = time.monotonic() - stopped
        assert server.metric("logitserve_send_timeouts_total") == before + 1
        rest = _read_to_end(sock, 2 * REQUEST_BYTES)
    finally:
        sock.close()
    print(f"{kind}: results released {released_after:.2f} s after the client stopped reading "
          f"(send timeout {SEND_TIMEOUT:g} s); it had read {len(got)} bytes, {rest} more were buffered")
    assert len(got) + rest < REQUEST_BYTES  # the body was cut short
    log = server.log()
    assert "(send timeout): connection dropped" in log
    assert "Exception in ASGI application" not in log and "without completing response" not in log
    with server.client() as c:
        r = c.post("/v1/logits", json={"input_ids": [_ids(40, 22)], "return_logits": "all"},
                   headers={"accept": accept})
        assert r.status_code == 200 and len(r.content) > 40 * VOCAB * 4
    assert _wait_gauge(server, 0)


def test_a_slow_reader_within_the_send_timeout_is_served_in_full(stall_server):
    """A client that reads 2 MiB every 0.5 s (4 MiB/s) of a 26 MB safetensors body: the body takes three times the
    send timeout and arrives in full, equal to a fast reader's; nothing is counted as a send timeout. (A send waits
    until the client has taken about one 1 MiB slice plus a third of the kernel's send buffer, ~2 MiB on loopback:
    here ~0.5 s of reading.)"""
    server = stall_server
    before = server.metric("logitserve_send_timeouts_total")
    body = {"input_ids": [_ids(400, 23)], "return_logits": "all"}
    with server.client() as c:
        fast = c.post("/v1/logits", json=body, headers={"accept": SAFETENSORS})
        assert fast.status_code == 200 and len(fast.content) > 26e6
        t0 = time.monotonic()
        with c.stream("POST", "/v1/logits", json=body, headers={"accept": SAFETENSORS}) as r:
            assert r.status_code == 200
            chunks = []
            for chunk in r.iter_bytes(2 << 20):
                chunks.append(chunk)
                time.sleep(0.5)
        elapsed = time.monotonic() - t0
    print(f"slow reader: {len(fast.content)} bytes in {elapsed:.1f} s (send timeout {SEND_TIMEOUT:g} s)")
    assert b"".join(chunks) == fast.content
    assert elapsed > 2 * SEND_TIMEOUT
    assert server.metric("logitserve_send_timeouts_total") == before
    assert _wait_gauge(server, 0)
