"""tp=2 and replicas=2 servers answer what tp=1 answers."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.service.reference import check_hidden_response, check_logits_response

SEQS = [[1, 17, 42, 99, 5, 250, 7], [1, 3], [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 3]]
LOGITS = {"input_ids": SEQS, "return_logits": "all", "target_logprobs": True, "top_k": 5, "return_hidden_states": "last"}
HIDDEN = {"input_ids": SEQS, "return_hidden_states": "all_normalized", "layers": [0, 2, -1]}


@pytest.fixture(scope="module", params=[("--tp", "2"), ("--replicas", "2")], ids=["tp2", "replicas2"])
def server(request, start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, *request.param)
    yield server
    server.stop()


def test_same_answers_as_tp1(server, reference_runner):
    info = server.info()
    assert (info["tp"], info["replicas"]) in ((2, 1), (1, 2))
    assert sum(len(w["pids"]) for w in info["workers"]) == 2

    def call(job):
        path, body = job
        with server.client() as c:
            return c.post(path, json=body)

    jobs = [("/v1/logits", LOGITS), ("/v1/hidden_states", HIDDEN)] * 4
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, jobs))
    for (path, body), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        if path == "/v1/logits":
            check_logits_response(reference_runner, body, SEQS, r.json(), atol=5e-4)
        else:
            check_hidden_response(reference_runner, body, SEQS, r.json(), atol=5e-4)
    if info["replicas"] == 2:
        text = server.client().get("/metrics").text
        assert 'logitserve_replica_batches_total{replica="0"}' in text
        assert 'logitserve_replica_batches_total{replica="1"}' in text  # least-loaded dispatch used both
