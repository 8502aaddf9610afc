"""Schema fuzzing: schemathesis generates requests from the server's own /openapi.json, for every endpoint.

Each generated case (valid and invalid bodies, query strings and headers) is sent to a live server; checks: no 5xx,
the status code is one the schema documents for that operation, the content type and body match the documented
response schema. After all cases the server must still be ready and answer a correct request.

Bounded for CI: `LOGITSERVE_FUZZ_EXAMPLES` cases per operation and mode (default 20); the counts land in
`docs/reliability.md` when run with a larger value.
"""

from __future__ import annotations

import collections
import os

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.shared_servers import API_KEY, shared_server

EXAMPLES = int(os.environ.get("LOGITSERVE_FUZZ_EXAMPLES", "20"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
SEEN: collections.Counter = collections.Counter()  # (operation, status) -> cases


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint)


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=server.headers)
    return schema


def test_openapi_documents_every_endpoint(server):
    """Bodies and responses are documented, so the fuzzing below is not vacuous."""
    doc = httpx.get(server.url + "/openapi.json", headers=server.headers).json()
    expected = {"/v1/logits", "/v1/hidden_states", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize",
                "/tokenizer_info", "/health", "/ready", "/metrics", "/info", "/v1/models", "/v1/score", "/v1/rerank",
                "/v2/rerank", "/v1/classify"}
    assert expected <= set(doc["paths"])
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for media, doc_ in op["responses"]["200"]["content"].items():
                schema = doc_["schema"]
                assert schema.get("$ref") or schema.get("type") == "string", (path, method, media, schema)
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]["schema"]
                assert body.get("properties"), (path, body)
                for code in ("401", "413", "422"):
                    assert op["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith(
                        "/ErrorResponse"), (path, code)


OPERATIONS = ["POST /v1/logits", "POST /v1/hidden_states", "POST /v1/completions", "POST /v1/embeddings",
              "POST /tokenize", "POST /detokenize", "GET /tokenizer_info", "GET /health", "GET /ready",
              "GET /metrics", "GET /info", "GET /v1/models", "POST /v1/score", "POST /v1/rerank", "POST /v2/rerank",
              "POST /v1/classify"]


CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if op.startswith("POST")]  # a GET has nothing to break


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{op}-{m.value}" for op, m in CASES])
def test_fuzz(api_schema, server, label, mode):
    method, path = label.split(" ")
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {API_KEY}"}

    config = server.info()["config"]
    vocab, layers = config["vocab_size"], config["num_layers"]
    # Random token ids are almost never inside the vocabulary: half of the positive cases of the scoring
    # endpoints get valid ids (and valid layers), so that the fuzzed options reach the workers too.
    valid_ids = st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12), min_size=1, max_size=4)
    valid_layers = st.lists(st.integers(-layers - 1, layers), min_size=1, max_size=3)

    @given(case=operation.as_strategy(generation_mode=mode), patch=st.booleans(), ids=valid_ids,
           layer_list=valid_layers)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              database=None, phases=[Phase.explicit, Phase.generate])
    def run(case, patch, ids, layer_list):
        if patch and mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
            if path in ("/v1/logits", "/v1/hidden_states"):
                case.body.pop("inputs", None)
                case.body["input_ids"] = ids
                if "layers" in case.body:
                    case.body["layers"] = layer_list
            elif path in ("/v1/completions", "/v1/embeddings"):
                case.body["prompt" if "prompt" in case.body else "input"] = ids
        response = case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS, timeout=60)
        SEEN[(label, response.status_code)] += 1

    run()


def test_server_still_ready_after_fuzzing(server, reference_runner):
    from tests.service.reference import check_logits_response

    total = sum(SEEN.values())
    by_op: dict = collections.defaultdict(collections.Counter)
    for (op, status), n in SEEN.items():
        by_op[op][status] += n
    print(f"\nfuzzed {total} cases over {len(by_op)} operations")
    for op, statuses in sorted(by_op.items()):
        print(f"  {op}: {dict(sorted(statuses.items()))}")
    if SEEN:  # run after the fuzz test (not when selected alone)
        assert len(by_op) == len(OPERATIONS), by_op
    assert httpx.get(server.url + "/ready").status_code == 200
    body = {"input_ids": [[1, 2, 3, 4]], "return_logits": "all", "target_logprobs": True, "top_k": 3}
    r = httpx.post(server.url + "/v1/logits", json=body, headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    check_logits_response(reference_runner, body, body["input_ids"], r.json())
