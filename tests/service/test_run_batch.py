"""`logitserve run-batch`: every line's body is what the live server answers the same request (apart from ids and
timestamps), bad lines become error entries, and --resume finishes a cut-off output."""

from __future__ import annotations

import json
import subprocess
import sys

import orjson
import pytest

from tests.service.conftest import REPO

MESSAGES = [[{"role": "user", "content": "hi there"}]]

CAUSAL_REQUESTS = [
    ("/v1/logits", {"inputs": ["hello world", "the cat sat"], "return_logits": "all", "logits": False,
                    "target_logprobs": True, "top_k": 3, "target_ranks": True, "entropy": True}),
    ("/v1/logits", {"input_ids": [[1, 5, 9, 4]], "return_logits": "variable", "return_n_logits": 2}),
    ("/v1/logits", {"input_ids": [[]]}),  # refused: 422
    ("/v1/logits", {"input_ids": [[1, 2]], "return_logit": "all"}),  # unknown field: 422
    ("/v1/hidden_states", {"inputs": "a b c", "return_hidden_states": "all", "layers": [0, -1]}),
    ("/v1/completions", {"prompt": ["hello there", "one two"], "echo": True, "logprobs": 2, "max_tokens": 0}),
    ("/v1/embeddings", {"input": ["first text", "second"]}),
    ("/v1/score", {"query": "is it", "items": ["yes", "no"], "label_token_ids": [3, 4]}),
    ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),  # no reranker: 400
    ("/v1/classify", {"input": "text"}),  # a causal LM: 400
    ("/tokenize", {"prompt": "hello world"}),
    ("/v1/nothing", {"inputs": "x"}),  # no route: 404
]

CLASSIFIER_REQUESTS = [
    ("/v1/classify", {"input": ["good", "bad movie"]}),
    ("/v1/rerank", {"query": "what", "documents": ["this", "that one"], "top_n": 1}),
    ("/v2/rerank", {"query": "what", "documents": ["this", "that one"], "return_documents": False}),
    ("/v1/logits", {"inputs": ["good", "bad movie"]}),
]

VOLATILE = ("id", "created")  # per-request ids and timestamps differ between any two answers


def _stable(body):
    return {k: v for k, v in body.items() if k not in VOLATILE} if isinstance(body, dict) else body


def _write_requests(path, requests) -> None:
    lines = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
             for i, (url, body) in enumerate(requests)]
    lines.insert(2, "this line is not JSON")
    lines.insert(4, json.dumps({"custom_id": "no-url", "method": "POST", "body": {}}))
    path.write_text("\n".join(lines) + "\n")


def _run_batch(model, requests_path, results_path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "run-batch", "-i", str(requests_path), "-o",
                           str(results_path), "--model", str(model), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def _check_against_server(server, requests, results_path) -> None:
    entries = [orjson.loads(line) for line in results_path.read_bytes().splitlines()]
    assert len(entries) == len(requests) + 2
    by_id = {e["custom_id"]: e for e in entries if e["custom_id"] is not None}
    with server.client() as client:
        for i, (url, body) in enumerate(requests):
            entry = by_id[f"req-{i}"]
            live = client.post(url, json=body)
            assert entry["error"] is None
            assert entry["response"]["status_code"] == live.status_code, (url, body)
            assert _stable(entry["response"]["body"]) == _stable(live.json()), (url, body)
            if "id" not in live.json():  # no volatile field: the same bytes
                line = next(l for l in results_path.read_bytes().splitlines() if f'"req-{i}"'.encode() in l)
                assert line.endswith(b',"body":' + live.content + b'},"error":null}')
    unreadable = [e for e in entries if e["response"] is None]
    assert len(unreadable) == 2 and all(e["error"]["code"] == "invalid_request" for e in unreadable)


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_run_batch_bodies_equal_live_server(kind, tiny_checkpoint, checkpoint_factory, start_server, tmp_path):
    model = tiny_checkpoint if kind == "causal" else checkpoint_factory("llama-classifier")
    requests = CAUSAL_REQUESTS if kind == "causal" else CLASSIFIER_REQUESTS
    requests_path, results_path = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    _write_requests(requests_path, requests)
    done = _run_batch(model, requests_path, results_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tok_s" in done.stderr  # the progress bar's tokens/s
    server = start_server(model)
    _check_against_server(server, requests, results_path)


def test_run_batch_resume_skips_answered(tiny_checkpoint, start_server, tmp_path):
    requests = CAUSAL_REQUESTS
    requests_path, results_path = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    _write_requests(requests_path, requests)
    assert _run_batch(tiny_checkpoint, requests_path, results_path).returncode == 0
    lines = results_path.read_bytes().splitlines(keepends=True)
    # Cut off as by a kill: three whole lines and half of the fourth.
    results_path.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    done = _run_batch(tiny_checkpoint, requests_path, results_path, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 already done" in done.stderr
    entries = [orjson.loads(line) for line in results_path.read_bytes().splitlines()]
    assert sorted(e["id"].split("-")[1] for e in entries) == sorted(str(n) for n in range(1, len(requests) + 3))
    server = start_server(tiny_checkpoint)
    _check_against_server(server, requests, results_path)
