"""The prefix cache across requests on the served path (--prefix-cache-bytes): every endpoint kind's body is the
same bytes cold, warm, with the cache off and alone; concurrent requests hit one entry; with two replicas a repeat
goes to the replica holding its prefix; a restarted worker starts with an empty cache and serves nothing wrong.

Bodies are compared as bytes once the fields that differ between any two responses (`id`, `created`) are dropped:
the floats are the JSON text the server wrote, so equal bytes are equal bits.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import time
from pathlib import Path

import httpx
import orjson
import pytest

from model.layers.attention_stable import BLOCK

from tests.checkpoints import make_checkpoint, make_tokenizer
from tests.service.test_labels import extend_tokenizer

HITS = "logitserve_prefix_cache_hit_tokens_total"
VOLATILE = ("id", "created")
WORDS = ("policy user message scored shown anyone else model reward answer question context every before after "
         "the a of to is must never always").split()


def cache_bytes(replica: int) -> str:
    return f'logitserve_prefix_cache_bytes{{replica="{replica}"}}'


def batches(replica: int) -> str:
    return f'logitserve_replica_batches_total{{replica="{replica}"}}'


def num_tokens(server, text: str) -> int:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def preamble(seed: int, words: int = 40) -> str:
    """A text no other test sends (so that its first request is cold), about 200 tokens of the tiny tokenizer."""
    rng = random.Random(seed)
    return f"[{seed}] " + " ".join(rng.choice(WORDS) for _ in range(words))


TEXTS = [" Is it safe?", " The answer is no.", " yes", " Tell me everything about the reward model."]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    """A tiny Llama with the rerankers' label words (for --reranker qwen3) and room for long prompts."""
    folder = tmp_path_factory.mktemp("cache-llama")
    make_checkpoint(folder, "llama", vocab_size=make_tokenizer().get_vocab_size() + 8, max_position_embeddings=1024)
    extend_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory) -> Path:
    """A tiny one-label LlamaForSequenceClassification (a reward model) with a tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("cache-reward"), "llama-classifier", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def chat(start_server, chat_folder):
    """The same model with the cache on (its default) and off."""
    return (start_server(chat_folder, "--reranker", "qwen3"),
            start_server(chat_folder, "--reranker", "qwen3", "--prefix-cache-bytes", "0"))


@pytest.fixture(scope="module")
def reward(start_server, reward_folder):
    return start_server(reward_folder), start_server(reward_folder, "--prefix-cache-bytes", "0")


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = orjson.loads(r.content)
    for key in VOLATILE:
        out.pop(key, None)
    return out


def items(path: str, body: dict) -> list[bytes]:
    """Each scored sequence's part of a body, as bytes, in the order of the request's inputs."""
    if path == "/v1/completions":
        return [orjson.dumps({k: v for k, v in c.items() if k != "index"}) for c in body["choices"]]
    if path == "/v1/score":
        return [orjson.dumps(s) for s in body["scores"]]
    if path == "/v1/rerank":
        return [orjson.dumps(r["relevance_score"]) for r in sorted(body["results"], key=lambda r: r["index"])]
    return [orjson.dumps({k: v for k, v in d.items() if k != "index"}) for d in body["data"]]  # logits, classify


# (server pair, path, the request for a preamble and some texts): every endpoint kind.
ENDPOINTS = {
    "completions": ("chat", "/v1/completions", lambda pre, texts: {
        "prompt": [pre + t for t in texts], "max_tokens": 0, "echo": True, "logprobs": 3}),
    "logits": ("chat", "/v1/logits", lambda pre, texts: {
        "inputs": [pre + t for t in texts], "return_logits": "all", "logits": False, "target_logprobs": True,
        "top_k": 4, "vocab_ids": [3, 250], "target_ranks": True, "entropy": True, "return_hidden_states": "last"}),
    "score": ("chat", "/v1/score", lambda pre, texts: {
        "query": pre, "items": texts, "label_token_ids": [3, 4]}),
    "rerank": ("chat", "/v1/rerank", lambda pre, texts: {
        "query": pre, "documents": texts, "return_documents": False}),
    "classify": ("reward", "/v1/classify", lambda pre, texts: {"input": [pre + t for t in texts]}),
}


def test_info_reports_the_limit_in_force(chat, reward):
    for on, off in (chat, reward):
        assert on.info()["prefix_cache_bytes"] == 1 << 30  # the default where prefix sharing is in force
        assert off.info()["prefix_cache_bytes"] == 0


@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_bodies_are_the_same_bytes_cold_warm_off_and_alone(request, kind):
    pair, path, make = ENDPOINTS[kind]
    on, off = request.getfixturevalue(pair)
    pre = preamble(seed=list(ENDPOINTS).index(kind))
    body = make(pre, TEXTS)
    cold = post(on, path, body)
    hits = on.metric(HITS)
    warm = post(on, path, body)
    assert on.metric(HITS) > hits  # the whole preamble, at least, came from the cache
    unc = post(off, path, body)
    assert off.metric(HITS) == 0
    assert orjson.dumps(cold) == orjson.dumps(warm) == orjson.dumps(unc)
    parts = items(path, cold)
    assert len(parts) == len(TEXTS)
    for i, text in enumerate(TEXTS):
        hits = on.metric(HITS)
        alone = items(path, post(on, path, make(pre, [text])))
        assert on.metric(HITS) > hits
        assert alone == [parts[i]], (kind, i)
        assert items(path, post(off, path, make(pre, [text]))) == [parts[i]], (kind, i)


def test_concurrent_requests_hit_one_entry(chat):
    on, off = chat
    pre = preamble(seed=100)
    make = ENDPOINTS["completions"][2]
    post(on, "/v1/completions", make(pre, TEXTS[:1]))  # the entry
    texts = [f" question {i}: {w}?" for i, w in enumerate(WORDS[:8])]
    hits = on.metric(HITS)
    with cf.ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(lambda t: post(on, "/v1/completions", make(pre, [t])), texts))
    # At least one whole preamble not recomputed (how often it counts when several of them share a batch as well
    # is the runner's business); its last token or two may merge with a text's first characters.
    assert on.metric(HITS) - hits >= num_tokens(on, pre) - 2
    for t, body in zip(texts, got):
        assert orjson.dumps(body) == orjson.dumps(post(off, "/v1/completions", make(pre, [t])))


def test_a_repeat_goes_to_the_replica_holding_its_prefix(start_server, chat_folder, chat):
    _, off = chat
    two = start_server(chat_folder, "--replicas", "2", "--reranker", "qwen3")
    make = ENDPOINTS["completions"][2]
    first, second = preamble(seed=200), preamble(seed=201)

    def send(pre: str, text: str) -> tuple[int, float]:
        """The replica that ran the request (the one whose batch count moved) and the hit tokens it had."""
        before = [two.metric(batches(r)) for r in (0, 1)]
        hits = two.metric(HITS)
        body = post(two, "/v1/completions", make(pre, [text]))
        assert orjson.dumps(body) == orjson.dumps(post(off, "/v1/completions", make(pre, [text])))
        moved = [r for r in (0, 1) if two.metric(batches(r)) > before[r]]
        assert len(moved) == 1
        return moved[0], two.metric(HITS) - hits

    holder_a, hit_a = send(first, TEXTS[0])
    holder_b, hit_b = send(second, TEXTS[0])
    # (the second prefix may go where the first is: both start with the BOS token and "[20", which that replica caches)
    assert two.metric(cache_bytes(holder_a)) > 0
    for text in TEXTS[1:]:
        for pre, holder in ((first, holder_a), (second, holder_b)):
            replica, hits = send(pre, text)
            # the cache keeps whole 64-token blocks: every full block of the preamble is a hit
            assert replica == holder and hits >= num_tokens(two, pre) // BLOCK * BLOCK > 0, (text, pre[:8])


def test_a_restarted_worker_starts_with_an_empty_cache(chat):
    """Last in this module: it kills the cache-on server's worker."""
    on, off = chat
    pre = preamble(seed=300)
    body = ENDPOINTS["logits"][2](pre, TEXTS)
    want = orjson.dumps(post(off, "/v1/logits", body))
    assert orjson.dumps(post(on, "/v1/logits", body)) == want
    assert on.metric(cache_bytes(0)) > 0
    pids, restarts = on.worker_pids(), on.metric("logitserve_worker_restarts_total")
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 90
    while not (on.metric("logitserve_worker_restarts_total") > restarts and httpx.get(on.url + "/ready").status_code == 200):
        assert time.monotonic() < deadline, on.log()
        time.sleep(0.2)
    assert on.worker_pids() != pids and on.metric(cache_bytes(0)) == 0
    hits = on.metric(HITS)
    assert orjson.dumps(post(on, "/v1/logits", body)) == want
    assert on.metric(HITS) == hits  # nothing of the preamble survived the restart
    assert on.metric(cache_bytes(0)) > 0
    assert orjson.dumps(post(on, "/v1/logits", body)) == want
    assert on.metric(HITS) > hits
