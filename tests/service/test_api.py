"""/v1/logits and /v1/hidden_states against the model, through a real uvicorn server (tp=1)."""

from __future__ import annotations

import concurrent.futures as cf
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from tests.service.reference import check_hidden_response, check_logits_response, hf_logits, hf_logprob

SEQS = [[1, 17, 42, 99, 5, 250, 7], [1, 3], [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 3], [9]]


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return start_server(tiny_checkpoint, "--max-batch-tokens", "64")


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


LOGITS_CASES = [
    {},
    {"return_logits": "all", "target_logprobs": True},
    {"return_logits": "variable", "return_n_logits": 3, "top_k": 5, "logits": False},
    {"return_logits": "all", "logits": False, "target_logprobs": True, "top_k": 3},
    {"return_hidden_states": "last"},
    {"return_hidden_states": "all", "logits": False},
    {"return_hidden_states": "last_normalized", "top_k": 1},
    {"return_logits": "variable", "return_n_logits": 2, "return_hidden_states": "all_normalized", "target_logprobs": True},
]


@pytest.mark.parametrize("options", LOGITS_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_logits_fields_match_runner(client, reference_runner, options):
    body = {"input_ids": SEQS, "model": "anything", **options}
    r = client.post("/v1/logits", json=body)
    assert r.status_code == 200, r.text
    assert float(r.headers["x-queue-time"]) >= 0 and float(r.headers["x-inference-time"]) > 0
    resp = r.json()
    assert resp["model"] == client.get("/v1/models").json()["data"][0]["id"]
    check_logits_response(reference_runner, body, SEQS, resp)


def test_logits_match_transformers(client, hf_reference):
    body = {"input_ids": SEQS, "return_logits": "all", "target_logprobs": True, "top_k": 4}
    resp = client.post("/v1/logits", json=body).json()
    for item, seq in zip(resp["data"], SEQS):
        ref = hf_logits(hf_reference, seq)
        np.testing.assert_allclose(np.array(item["logits"]), ref.numpy(), atol=1e-3, rtol=1e-3)
        want = [hf_logprob(ref, seq, p) for p in range(len(seq))]
        got = [np.nan if v is None else v for v in item["target_logprobs"]]
        np.testing.assert_allclose(got, want, atol=1e-3, equal_nan=True)
        assert item["target_logprobs"][-1] is None
        top = torch.log_softmax(ref, -1).topk(4, -1)
        np.testing.assert_allclose(item["top_k"]["logprobs"], top.values.numpy(), atol=1e-3)


@pytest.mark.parametrize("options", [
    {},
    {"return_hidden_states": "all", "layers": [0, 1, -1]},
    {"return_hidden_states": "last_normalized", "layers": [3, -2]},
    {"return_hidden_states": "all_normalized", "layers": [2]},
])
def test_hidden_states_fields_match_runner(client, reference_runner, options):
    body = {"input_ids": SEQS, **options}
    r = client.post("/v1/hidden_states", json=body)
    assert r.status_code == 200, r.text
    check_hidden_response(reference_runner, body, SEQS, r.json())


def test_text_inputs_are_tokenized(client, tiny_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    texts = ["The quick brown fox", "Logits are"]
    for special in (True, False):
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=special)]
        by_text = client.post("/v1/logits", json={"inputs": texts, "add_special_tokens": special}).json()
        by_ids = client.post("/v1/logits", json={"input_ids": ids}).json()
        assert [d["num_tokens"] for d in by_text["data"]] == [len(i) for i in ids]
        np.testing.assert_allclose(np.array(by_text["data"][0]["logits"]), np.array(by_ids["data"][0]["logits"]), atol=1e-5)
    one = client.post("/v1/hidden_states", json={"inputs": "The quick brown fox"}).json()
    assert len(one["data"]) == 1


def _binary(client, path, body):
    r = client.post(path, json=body, headers={"Accept": "application/x-safetensors"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-safetensors")
    import json
    import struct

    n = struct.unpack("<Q", r.content[:8])[0]
    metadata = json.loads(r.content[8 : 8 + n])["__metadata__"]
    return st_load(r.content), metadata


def test_binary_logits_equal_json(client):
    body = {"input_ids": SEQS, "return_logits": "variable", "return_n_logits": 4, "target_logprobs": True, "top_k": 3,
            "return_hidden_states": "all"}
    js = client.post("/v1/logits", json=body).json()
    t, meta = _binary(client, "/v1/logits", body)
    assert set(t) == {"input_row_offsets", "positions", "logit_offsets", "logits", "target_logprobs", "top_k_ids",
                      "top_k_logprobs", "hidden_states", "hidden_offsets", "hidden_positions"}
    assert meta["return_logits"] == "variable" and meta["return_hidden_states"] == "all" and meta["model"] == js["model"]
    assert t["input_row_offsets"].tolist() == list(np.cumsum([0] + [len(s) for s in SEQS]))
    assert t["logits"].dtype == torch.float32 and t["top_k_ids"].dtype == torch.int64
    lo, ho = t["logit_offsets"].tolist(), t["hidden_offsets"].tolist()
    for i, item in enumerate(js["data"]):
        a, b = lo[i], lo[i + 1]
        assert t["positions"][a:b].tolist() == item["positions"]
        assert torch.equal(t["logits"][a:b], torch.tensor(item["logits"], dtype=torch.float32))
        tl = [float("nan") if v is None else v for v in item["target_logprobs"]]
        assert torch.equal(t["target_logprobs"][a:b], torch.tensor(tl, dtype=torch.float32), ) or torch.allclose(
            t["target_logprobs"][a:b], torch.tensor(tl), equal_nan=True, atol=0, rtol=0)
        assert t["top_k_ids"][a:b].tolist() == item["top_k"]["ids"]
        assert torch.equal(t["top_k_logprobs"][a:b], torch.tensor(item["top_k"]["logprobs"], dtype=torch.float32))
        h0, h1 = ho[i], ho[i + 1]
        assert t["hidden_positions"][h0:h1].tolist() == list(range(len(SEQS[i])))
        assert torch.equal(t["hidden_states"][:, h0:h1], torch.tensor(item["hidden_states"], dtype=torch.float32))


def test_binary_only_requested_tensors_and_dtypes(client):
    js = client.post("/v1/logits", json={"input_ids": SEQS}).json()
    for dtype, tdt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        t, meta = _binary(client, "/v1/logits", {"input_ids": SEQS, "dtype": dtype})
        assert set(t) == {"input_row_offsets", "positions", "logit_offsets", "logits"}
        assert t["logits"].dtype == tdt
        want = torch.tensor([d["logits"][0] for d in js["data"]], dtype=torch.float32).to(tdt)
        assert torch.equal(t["logits"], want)
    body = {"input_ids": SEQS, "return_hidden_states": "last_normalized", "layers": [0, -1], "dtype": "bfloat16"}
    js = client.post("/v1/hidden_states", json=body).json()
    t, meta = _binary(client, "/v1/hidden_states", body)
    assert set(t) == {"input_row_offsets", "hidden_states", "hidden_offsets", "hidden_positions"}
    assert meta["layers"] == "[0, 3]" and meta["return_hidden_states"] == "last_normalized"
    assert t["hidden_states"].shape == (2, len(SEQS), 64) and t["hidden_states"].dtype == torch.bfloat16
    want = torch.tensor([d["hidden_states"] for d in js["data"]]).squeeze(2).permute(1, 0, 2).to(torch.bfloat16)
    assert torch.equal(t["hidden_states"], want)


def test_concurrent_clients_with_mixed_options_get_their_own_answers(server, reference_runner):
    rng = random.Random(0)
    jobs = []
    for i in range(24):
        seqs = [[rng.randrange(300) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(1, 3))]
        if i % 4 == 3:
            body = {"input_ids": seqs, "return_hidden_states": rng.choice(["last", "all"]), "layers": [rng.randint(-4, 3)]}
            jobs.append(("/v1/hidden_states", body, seqs))
        else:
            body = {"input_ids": seqs, "return_logits": rng.choice(["last_token", "all", "variable"]),
                    "return_n_logits": rng.randint(1, 5), "logits": rng.random() < 0.5,
                    "target_logprobs": rng.random() < 0.5, "top_k": rng.choice([0, 2, 7]),
                    "return_hidden_states": rng.choice(["none", "last", "all_normalized"])}
            jobs.append(("/v1/logits", body, seqs))

    def call(job):
        path, body, _ = job
        with server.client() as c:
            return c.post(path, json=body)

    batches_before = server.metric("logitserve_batch_sequences_count")
    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, jobs))
    for (path, body, seqs), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        if path == "/v1/logits":
            check_logits_response(reference_runner, body, seqs, r.json())
        else:
            check_hidden_response(reference_runner, body, seqs, r.json())
    # requests shared forward passes
    assert server.metric("logitserve_batch_sequences_count") - batches_before < len(jobs)


def test_a_request_larger_than_the_batch_budget_runs_alone(client, reference_runner):
    seqs = [[(7 * i) % 300 for i in range(60)], [(11 * i) % 300 for i in range(50)]]  # 110 tokens > budget 64
    body = {"input_ids": seqs, "target_logprobs": True}
    r = client.post("/v1/logits", json=body)
    assert r.status_code == 200, r.text
    check_logits_response(reference_runner, body, seqs, r.json())


def _error(r, status, param=None, contains=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"type", "message", "param"}
    if param is not None:
        assert err["param"] == param
    if contains is not None:
        assert contains in err["message"], err["message"]
    return err


@pytest.mark.parametrize("body,param,contains", [
    ({"input_ids": []}, "input_ids", "no sequence"),
    ({"input_ids": [[1, 2], []]}, "input_ids", "sequence 1"),
    ({"input_ids": [[1, 2], [3, 300]]}, "input_ids", "sequence 1"),
    ({"input_ids": [[1, -1]]}, "input_ids", "sequence 0"),
    ({"input_ids": [[1], [2], [1] * 257]}, "input_ids", "sequence 2"),
    ({"input_ids": [[1, 2], [3, "x"]]}, "input_ids", "sequence 1"),
    ({"input_ids": [[1, 2]], "inputs": "hi"}, "input_ids", "exactly one"),
    ({}, "input_ids", "exactly one"),
    ({"inputs": ["a", ""], "add_special_tokens": False}, "inputs", "sequence 1"),
    ({"input_ids": [[1]], "return_logit": "all"}, "return_logit", "Extra inputs"),
    ({"input_ids": [[1]], "top_k": 101}, "top_k", None),
    ({"input_ids": [[1]], "return_n_logits": 0}, "return_n_logits", None),
    ({"input_ids": [[1]], "return_logits": "first"}, "return_logits", None),
    ({"input_ids": [[1]], "dtype": "float64"}, "dtype", None),
])
def test_invalid_logits_requests_are_422(client, body, param, contains):
    _error(client.post("/v1/logits", json=body), 422, param, contains)


def test_invalid_hidden_states_requests_are_422(client):
    _error(client.post("/v1/hidden_states", json={"input_ids": [[1]], "layers": [4]}), 422, "layers", "out of range")
    _error(client.post("/v1/hidden_states", json={"input_ids": [[1]], "layers": [-5]}), 422, "layers")
    _error(client.post("/v1/hidden_states", json={"input_ids": [[1]], "return_hidden_states": "none"}), 422,
           "return_hidden_states")
    _error(client.post("/v1/hidden_states", json={"input_ids": [[1]], "top_k": 2}), 422, "top_k")
    _error(client.post("/v1/hidden_states", content=b"{not json", headers={"content-type": "application/json"}), 422)
    _error(client.post("/v1/hidden_states", json=[1, 2]), 422)


def test_refused_requests_never_reach_a_worker(server, client):
    before = server.metric("logitserve_batch_sequences_count")
    for _ in range(3):
        client.post("/v1/logits", json={"input_ids": [[1, 400]]})
    assert server.metric("logitserve_batch_sequences_count") == before


def test_operations_endpoints(server, client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["tp"] == 1 and info["replicas"] == 1 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["config"]["vocab_size"] == 300 and info["limits"]["max_seq_len"] == 256
    assert info["limits"]["max_batch_tokens"] == 64 and info["version"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == info["model"]
    _error(client.get("/nope"), 404)
    client.post("/v1/logits", json={"input_ids": [[1, 2, 3]]})
    text = client.get("/metrics").text
    for name in ("request_duration_seconds_bucket", "queue_duration_seconds_bucket", "inference_duration_seconds_bucket",
                 "batch_tokens_bucket", "batch_sequences_bucket", "queue_tokens", "requests_in_flight",
                 "prompt_tokens_total", "requests_total", "worker_restarts_total", "serialization_duration_seconds_bucket",
                 "replica_batches_total"):
        assert f"logitserve_{name}" in text, name
    assert 'logitserve_requests_total{endpoint="/v1/logits",status="200"}' in text
    assert 'logitserve_requests_total{endpoint="/v1/logits",status="422"}' in text


def test_large_binary_body_is_streamed_with_its_length_and_equals_json(client):
    # 900 tokens of 300-wide logits and every hidden row: past the 1 MiB at which the body is streamed from the
    # workers' shared memory instead of joined in the front end.
    seqs = [[(7 * i + j) % 290 + 1 for j in range(30)] for i in range(30)]
    body = {"input_ids": seqs, "return_logits": "all", "return_hidden_states": "all"}
    r = client.post("/v1/logits", json=body, headers={"Accept": "application/x-safetensors"})
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == len(r.content) > 1 << 20
    t = st_load(r.content)
    js = client.post("/v1/logits", json=body).json()
    lo = t["logit_offsets"].tolist()
    for i in (0, 17, 29):
        torch.testing.assert_close(t["logits"][lo[i] : lo[i + 1]], torch.tensor(js["data"][i]["logits"]), atol=1e-6, rtol=0)
