"""vLLM's dialect: pair scoring on /score and /v1/score (the body decides between vLLM's pairs and SGLang's labels),
`prompt_logprobs` on /v1/completions, `truncate_prompt_tokens`. Each equals our own endpoint's answer for the same
sequences: /v1/rerank's scores, the cosine of /v1/embeddings, echo log-probs and /v1/logits' top-k and ranks."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.service.shared_servers import shared_server
from tests.service.test_tei import MAX_SEQ_LEN, QUERY, TEXTS, embeddings_of, post, rerank_scores


@pytest.fixture(scope="module")
def embedder(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint, "--max-seq-len", str(MAX_SEQ_LEN), api_key=None)


@pytest.fixture(scope="module")
def reranker(start_server, checkpoint_factory):
    return shared_server(start_server, checkpoint_factory("llama-classifier"), "--max-seq-len", str(MAX_SEQ_LEN),
                         api_key=None)


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
@pytest.mark.parametrize("names", [("text_1", "text_2"), ("queries", "documents")])
def test_pair_scores_equal_rerank(reranker, path, names):
    r = post(reranker, path, {"model": "x", names[0]: QUERY, names[1]: TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["id"].startswith("score-")
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"score"}
    assert [d["score"] for d in body["data"]] == rerank_scores(reranker, QUERY, TEXTS)
    # pairwise lists: each pair as its own rerank
    firsts = [QUERY, TEXTS[0], QUERY]
    pairwise = post(reranker, path, {"text_1": firsts, "text_2": TEXTS}).json()["data"]
    for pair, (a, b) in zip(pairwise, zip(firsts, TEXTS)):
        assert pair["score"] == rerank_scores(reranker, a, [b])[0]
    assert post(reranker, path, {"text_1": [QUERY, QUERY], "text_2": TEXTS}).status_code == 422


def test_pair_scores_of_an_embedding_model_are_cosines(embedder):
    r = post(embedder, "/score", {"text_1": TEXTS[0], "text_2": TEXTS[1:]})
    assert r.status_code == 200, r.text
    e = embeddings_of(embedder, TEXTS).astype(np.float64)
    assert np.allclose([d["score"] for d in r.json()["data"]], e[1:] @ e[0], atol=1e-6)
    # the SGLang body still does label scoring on the same path
    sglang = post(embedder, "/v1/score", {"query": "The quick", "items": [" brown"], "label_token_ids": [5, 6]})
    assert sglang.status_code == 200 and sglang.json()["object"] == "scoring"


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_equal_echo_logprobs_and_top_k(embedder, k):
    prompt = TEXTS[0]
    r = post(embedder, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": max(k, 1),
                                           "prompt_logprobs": k})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    plp, echoed = choice["prompt_logprobs"], choice["logprobs"]
    logits = httpx.post(embedder.url + "/v1/logits", json={
        "inputs": [prompt], "return_logits": "all", "logits": False, "target_logprobs": True,
        "target_ranks": True, "top_k": max(k, 1)}).json()["data"][0]
    ids = post(embedder, "/tokenize", {"prompt": prompt}).json()["tokens"]
    assert plp[0] is None and len(plp) == len(ids)
    for p in range(1, len(ids)):
        entry = plp[p]
        actual = entry[str(ids[p])]
        # /v1/logits writes float32s as float32's shortest text; completions as Python floats of the same values
        assert actual["logprob"] == echoed["token_logprobs"][p]
        assert np.float32(actual["logprob"]) == np.float32(logits["target_logprobs"][p - 1])
        assert actual["rank"] == logits["target_ranks"][p - 1]
        assert actual["decoded_token"] == echoed["tokens"][p]
        top = {str(i): v for i, v in zip(logits["top_k"]["ids"][p - 1][:k], logits["top_k"]["logprobs"][p - 1][:k])}
        assert set(entry) == set(top) | {str(ids[p])}
        for key, value in top.items():
            assert np.float32(entry[key]["logprob"]) == np.float32(value)
            if key != str(ids[p]):
                assert entry[key]["rank"] == list(top).index(key) + 1


def test_truncate_prompt_tokens_keeps_the_last_tokens(embedder):
    ids = post(embedder, "/tokenize", {"prompt": TEXTS[0]}).json()["tokens"]
    r = post(embedder, "/v1/completions", {"prompt": TEXTS[0], "echo": True, "logprobs": 1,
                                           "truncate_prompt_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5
    # as transformers' left truncation: the BOS the tokenizer adds stays, then the last 4 text tokens
    kept = post(embedder, "/v1/completions", {"prompt": [ids[0]] + ids[-4:], "echo": True, "logprobs": 1}).json()
    assert r.json()["choices"][0]["logprobs"]["token_logprobs"] == kept["choices"][0]["logprobs"]["token_logprobs"]
