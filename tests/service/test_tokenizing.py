"""Tokenization off the event loop, within the request limits (service/tokenizing.py)."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from tests.checkpoints import TRAINING_TEXT, make_tokenizer

EIGHT_MB = 8 << 20
# The tiny tokenizer's longest token has 5 characters: 2M tokens allow 10M characters, so the 8 MB text passes the
# character bound, is tokenized (about 5M tokens), and is then refused by the token bound.
QUEUE_TOKENS = 2_000_000


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, "--max-queue-tokens", str(QUEUE_TOKENS))
    yield server
    server.stop()


def test_health_answers_within_100ms_while_8mb_are_tokenized(server):
    text = (TRAINING_TEXT * (EIGHT_MB // len(TRAINING_TEXT) + 1))[:EIGHT_MB]
    result = {}

    def tokenize():
        result["r"] = httpx.post(server.url + "/tokenize", json={"prompt": text}, timeout=600)

    worker = threading.Thread(target=tokenize)
    latencies = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        client.get("/health")
        worker.start()
        time.sleep(1.0)  # the body is sent and tokenizing has begun
        while worker.is_alive():
            t0 = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
    r = result["r"]
    assert r.status_code == 413, r.text[:300]  # tokenized, then refused: more tokens than the whole queue
    assert f"--max-queue-tokens {QUEUE_TOKENS}" in r.json()["error"]["message"]
    assert len(latencies) > 20, latencies
    p99 = float(np.percentile(latencies, 99))
    assert p99 < 0.1, (p99, max(latencies), len(latencies))


def test_text_over_the_character_bound_is_refused_before_tokenizing(server):
    limit = QUEUE_TOKENS * 5
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/logits", json={"inputs": ["a" * (limit // 2), "b" * (limit // 2 + 1)]},
                   timeout=60)
    assert r.status_code == 413, r.text[:300]
    err = r.json()["error"]
    assert str(limit) in err["message"] and "--max-queue-tokens" in err["message"] and err["param"] == "inputs"
    assert time.monotonic() - t0 < 5  # never tokenized


def test_tokenize_still_answers_what_it_did(server):
    tok = make_tokenizer()
    for prompt in ("The quick brown fox", "héllo wörld " * 50):
        r = httpx.post(server.url + "/tokenize", json={"prompt": prompt}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tok.encode(prompt).ids and body["count"] == len(body["tokens"])
        r = httpx.post(server.url + "/tokenize", json={"prompt": prompt, "add_special_tokens": False}, timeout=30)
        assert r.json()["tokens"] == tok.encode(prompt, add_special_tokens=False).ids
