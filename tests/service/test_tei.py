"""Text Embeddings Inference's routes, driven by the real TEI clients from PyPI (LlamaIndex's TEI embedding and
rerank classes, Haystack's Hugging Face API embedders and TEI ranker, huggingface_hub's InferenceClient): each
client's result equals our own endpoint's for the same input. Also TEI's error body and status codes, truncation
(TEI's `truncate` and `--auto-truncate`), and the TEI `Info` fields of /info. One embedding server and one reranker
server for the module."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.service.shared_servers import shared_server

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Logits are unnormalized log-probabilities.",
         "Tensor parallelism splits each weight matrix."]
QUERY = "What do language models score?"
MAX_SEQ_LEN = 64
LONG = "Language models score text by predicting the next token. " * 16  # well past MAX_SEQ_LEN tokens


@pytest.fixture(scope="module")
def embedder(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint, "--max-seq-len", str(MAX_SEQ_LEN), api_key=None)


@pytest.fixture(scope="module")
def reranker(start_server, checkpoint_factory):
    return shared_server(start_server, checkpoint_factory("llama-classifier"), "--max-seq-len", str(MAX_SEQ_LEN),
                         api_key=None)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def embeddings_of(server, texts: list[str], **extra) -> np.ndarray:
    r = post(server, "/v1/embeddings", {"input": texts, **extra})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


# --------------------------------------------------------------------------------------------------- /embed


def test_embed_equals_v1_embeddings(embedder):
    r = post(embedder, "/embed", {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    assert np.array_equal(np.array(r.json(), dtype=np.float32), embeddings_of(embedder, TEXTS))
    one = post(embedder, "/embed", {"inputs": TEXTS[0]}).json()
    assert len(one) == 1 and one[0] == r.json()[0]
    raw = np.array(post(embedder, "/embed", {"inputs": TEXTS, "normalize": False}).json())
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), r.json(), atol=1e-6)


def test_embed_truncate_keeps_the_tokens_it_would_keep(embedder, tiny_checkpoint):
    from tokenizers import Tokenizer

    refused = post(embedder, "/embed", {"inputs": LONG})
    assert refused.status_code == 422
    assert refused.json()["error_type"] == "validation" and "max-seq-len" in refused.json()["error"]
    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    ids = tok.encode(LONG).ids
    for direction, kept in (("right", ids[:MAX_SEQ_LEN]), ("left", ids[-MAX_SEQ_LEN:])):
        r = post(embedder, "/embed", {"inputs": LONG, "truncate": True, "truncation_direction": direction})
        assert r.status_code == 200, r.text
        if direction == "left":
            # transformers' truncation keeps the special tokens the tokenizer adds: BOS, then the last tokens
            kept = [ids[0]] + ids[-(MAX_SEQ_LEN - 1):]
        r_ids = post(embedder, "/embed", {"inputs": [kept]})
        assert r.json() == r_ids.json()
    # vLLM's truncate_prompt_tokens on /v1/embeddings keeps the last k (and usage counts them)
    r = post(embedder, "/v1/embeddings", {"input": LONG, "truncate_prompt_tokens": 10})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10


def test_auto_truncate_flag(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, "--max-seq-len", str(MAX_SEQ_LEN), "--auto-truncate")
    r = post(server, "/embed", {"inputs": LONG})
    assert r.status_code == 200, r.text
    # an explicit truncate false is TEI's refusal even under --auto-truncate
    assert post(server, "/embed", {"inputs": LONG, "truncate": False}).status_code == 422
    assert httpx.get(server.url + "/info").json()["auto_truncate"] is True


def test_embed_all_is_every_tokens_final_state(embedder):
    r = post(embedder, "/embed_all", {"inputs": TEXTS[:2]})
    assert r.status_code == 200, r.text
    h = httpx.post(embedder.url + "/v1/hidden_states", json={"inputs": TEXTS[:2],
                                                             "return_hidden_states": "all_normalized"}).json()
    for got, want in zip(r.json(), h["data"]):
        assert np.array_equal(np.array(got, dtype=np.float32), np.array(want["hidden_states"][0], dtype=np.float32))


def test_similarity_is_cosine_of_embeddings(embedder):
    r = post(embedder, "/similarity", {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}})
    assert r.status_code == 200, r.text
    e = embeddings_of(embedder, TEXTS).astype(np.float64)
    assert np.allclose(r.json(), e[1:] @ e[0], atol=1e-6)


def test_tei_errors_and_refusals(embedder, reranker):
    empty = post(embedder, "/embed", {"inputs": []})
    assert empty.status_code == 400 and empty.json() == {"error": "`inputs` cannot be empty", "error_type": "empty"}
    wrong = post(embedder, "/rerank", {"query": "q", "texts": ["a"]})
    assert wrong.status_code == 424 and wrong.json()["error_type"] == "backend"
    assert post(reranker, "/embed", {"inputs": "a"}).status_code == 424
    assert post(embedder, "/predict", {"inputs": "a"}).status_code == 424
    sparse = post(embedder, "/embed_sparse", {"inputs": "a"})
    assert sparse.status_code == 424 and "SPLADE" in sparse.json()["error"]
    bad = post(embedder, "/embed", {"input": "a"})
    assert bad.status_code == 422 and set(bad.json()) == {"error", "error_type"}


def test_tokenize_both_forms_and_decode(embedder, tiny_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    text = "The quick brown fox"
    tei = post(embedder, "/tokenize", {"inputs": text}).json()
    enc = tok.encode(text)
    assert [t["id"] for t in tei[0]] == enc.ids
    assert tei[0][0] == {"id": enc.ids[0], "text": "<s>", "special": True, "start": None, "stop": None}
    assert "".join(t["text"] for t in tei[0][1:]) == text and tei[0][-1]["stop"] == len(text)
    vllm = post(embedder, "/tokenize", {"prompt": text}).json()
    assert vllm["tokens"] == enc.ids
    assert post(embedder, "/decode", {"ids": enc.ids}).json() == [text]
    assert post(embedder, "/decode", {"ids": [enc.ids, enc.ids[1:]], "skip_special_tokens": False}).json() == [
        tok.decode(enc.ids, skip_special_tokens=False), text]


def test_info_carries_tei_fields(embedder, reranker):
    info = httpx.get(embedder.url + "/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "lasttoken"}}
    assert info["max_input_length"] == MAX_SEQ_LEN and info["auto_truncate"] is False
    assert {"model_id", "model_dtype", "max_client_batch_size", "max_batch_tokens"} <= set(info)
    assert "reranker" in httpx.get(reranker.url + "/info").json()["model_type"]


# ---------------------------------------------------------------------------------------- rerank and predict


def rerank_scores(server, query, documents, **extra) -> list[float]:
    r = post(server, "/v1/rerank", {"query": query, "documents": documents, **extra})
    assert r.status_code == 200, r.text
    scores = [0.0] * len(documents)
    for result in r.json()["results"]:
        scores[result["index"]] = result["relevance_score"]
    return scores


def test_rerank_equals_v1_rerank(reranker):
    r = post(reranker, "/rerank", {"query": QUERY, "texts": TEXTS, "return_text": True})
    assert r.status_code == 200, r.text
    ranks = r.json()
    want = rerank_scores(reranker, QUERY, TEXTS)
    assert [x["score"] for x in ranks] == sorted(want, reverse=True)
    assert all(x["score"] == want[x["index"]] and x["text"] == TEXTS[x["index"]] for x in ranks)
    raw = post(reranker, "/rerank", {"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
    raw_want = rerank_scores(reranker, QUERY, TEXTS, use_activation=False)
    assert all(x["score"] == raw_want[x["index"]] and "text" not in x for x in raw)
    # the root route of a reranker's body is /rerank
    assert post(reranker, "/", {"query": QUERY, "texts": TEXTS, "return_text": True}).json() == ranks


def test_rerank_truncation_keeps_the_query(reranker, checkpoint_factory):
    from transformers import PreTrainedTokenizerFast

    folder = checkpoint_factory("llama-classifier")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert post(reranker, "/rerank", {"query": QUERY, "texts": [LONG]}).status_code == 422
    r = post(reranker, "/rerank", {"query": QUERY, "texts": [LONG], "truncate": True})
    assert r.status_code == 200, r.text
    kept = hf(QUERY, LONG, truncation="only_second", max_length=MAX_SEQ_LEN)["input_ids"]
    assert len(kept) == MAX_SEQ_LEN
    logits = post(reranker, "/v1/logits", {"input_ids": [kept]}).json()["data"][0]["logits"][0][0]
    assert r.json()[0]["score"] == pytest.approx(1 / (1 + np.exp(-logits)), abs=1e-6)


def test_predict_single_pair_and_batch(reranker):
    classify = httpx.post(reranker.url + "/v1/classify", json={"input": TEXTS[0]}).json()["data"][0]
    single = post(reranker, "/predict", {"inputs": TEXTS[0]}).json()
    assert single == [{"score": pytest.approx(classify["probs"][0], abs=1e-6), "label": classify["label"]}]
    batch = post(reranker, "/predict", {"inputs": [[TEXTS[0]], [QUERY, TEXTS[1]]], "raw_scores": True}).json()
    assert batch[0][0]["score"] == pytest.approx(classify["logits"][0], abs=1e-6)
    pair_score = rerank_scores(reranker, QUERY, [TEXTS[1]], use_activation=False)[0]
    assert batch[1][0]["score"] == pytest.approx(pair_score, abs=1e-6)


# -------------------------------------------------------------------------------------- the real clients


def test_llama_index_tei_embedding(embedder):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    model = TextEmbeddingsInference(model_name="tiny", base_url=embedder.url, embed_batch_size=2, timeout=60)
    got = np.array(model.get_text_embedding_batch(TEXTS), dtype=np.float32)
    assert np.array_equal(got, np.array(post(embedder, "/embed", {"inputs": TEXTS}).json(), dtype=np.float32))
    assert np.array_equal(np.array(model.get_query_embedding(TEXTS[0]), dtype=np.float32), got[0])


def test_llama_index_tei_rerank(reranker):
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in TEXTS]
    ranked = TextEmbeddingInference(base_url=reranker.url, top_n=3).postprocess_nodes(nodes, query_str=QUERY)
    want = rerank_scores(reranker, QUERY, TEXTS)
    assert [(n.node.get_content(), n.score) for n in ranked] == sorted(
        zip(TEXTS, want), key=lambda x: -x[1])


def test_haystack_tei_embedders_and_ranker(embedder, reranker):
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.embedders.huggingface_api import (
        HuggingFaceAPIDocumentEmbedder,
        HuggingFaceAPITextEmbedder,
    )
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    params = {"url": embedder.url}
    text = HuggingFaceAPITextEmbedder(api_type="text_embeddings_inference", api_params=params, token=None)
    embedding = text.run(text=TEXTS[0])["embedding"]
    want = post(embedder, "/embed", {"inputs": TEXTS, "normalize": False}).json()
    assert np.array_equal(np.array(embedding, dtype=np.float32), np.array(want[0], dtype=np.float32))
    docs = HuggingFaceAPIDocumentEmbedder(api_type="text_embeddings_inference", api_params=params,
                                          token=None).run(documents=[Document(content=t) for t in TEXTS])
    assert np.array_equal(np.array([d.embedding for d in docs["documents"]], dtype=np.float32),
                          np.array(want, dtype=np.float32))
    ranker = HuggingFaceTEIRanker(url=reranker.url, top_k=3, token=Secret.from_token("unused"))
    ranked = ranker.run(query=QUERY, documents=[Document(content=t) for t in TEXTS])["documents"]
    scores = rerank_scores(reranker, QUERY, TEXTS)
    assert [(d.content, d.score) for d in ranked] == sorted(zip(TEXTS, scores), key=lambda x: -x[1])


def test_inference_client(embedder, reranker):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=embedder.url)
    features = client.feature_extraction(TEXTS[0])
    want = np.array(post(embedder, "/embed", {"inputs": TEXTS[0]}).json(), dtype=np.float32)
    assert np.array_equal(features, want)
    similarity = client.sentence_similarity(TEXTS[0], other_sentences=TEXTS[1:])
    assert similarity == post(embedder, "/similarity", {"inputs": {"source_sentence": TEXTS[0],
                                                                   "sentences": TEXTS[1:]}}).json()
    # a classifier's root route is /predict; the client keeps the first of TEI's (sorted) predictions
    top = InferenceClient(model=reranker.url).text_classification(TEXTS[0])
    predicted = post(reranker, "/predict", {"inputs": TEXTS[0]}).json()
    got = top if isinstance(top, list) else [top]
    assert [(p.label, p.score) for p in got] == [(p["label"], p["score"]) for p in predicted[:len(got)]]
