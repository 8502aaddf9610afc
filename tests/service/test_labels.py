"""/v1/score, /v1/rerank (and /v2), /v1/classify, chat `messages` and embeddings `dimensions` through live servers,
against transformers computed independently; the Cohere SDK against /v2/rerank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer

from service.rerankers import BGE_GEMMA_BODY, BGE_GEMMA_DEFAULT_INSTRUCTION, QWEN3_BODY, QWEN3_DEFAULT_INSTRUCTION
from service.rerankers import QWEN3_PREFIX, QWEN3_SUFFIX
from tests.checkpoints import load_reference, make_checkpoint, make_tokenizer

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QUERY = "What does a softmax do?"
DOCUMENTS = ["a softmax turns logits into a distribution over the vocabulary", "The quick brown fox jumps",
             "", "Tensor parallelism splits each weight matrix across devices"]


def extend_tokenizer(folder: Path) -> Tokenizer:
    """The tiny tokenizer plus the chat markers (special) and the rerankers' label words, inside the model's
    vocabulary; a tokenizer_config.json with a chat template and the special tokens."""
    tok = make_tokenizer()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.add_tokens(["yes", "no", "Yes"])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat-llama")
    vocab = make_tokenizer().get_vocab_size() + 8
    make_checkpoint(folder, "llama", vocab_size=vocab, max_position_embeddings=1024)  # the rerank prompts are long
    extend_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(chat_folder):
    return load_reference(chat_folder)


@pytest.fixture(scope="module")
def hf_tokenizer(chat_folder):
    return transformers.AutoTokenizer.from_pretrained(chat_folder)


@pytest.fixture(scope="module")
def qwen3_server(start_server, chat_folder):
    server = start_server(chat_folder, "--reranker", "qwen3")
    yield server
    server.stop()


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double()


# ------------------------------------------------------------------------------------------------ /v1/score


@pytest.mark.parametrize("item_first", [False, True])
@pytest.mark.parametrize("apply_softmax", [False, True])
def test_score_text_matches_transformers(qwen3_server, hf_model, hf_tokenizer, item_first, apply_softmax):
    items = ["Paris", "the vocabulary", "a distribution over tokens"]
    labels = [5, 17, 250, 17]
    body = {"query": QUERY, "items": items, "label_token_ids": labels, "apply_softmax": apply_softmax,
            "item_first": item_first, "model": "x"}
    r = httpx.post(qwen3_server.url + "/v1/score", json=body, timeout=60)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["object"] == "scoring" and len(resp["scores"]) == len(items)
    total = 0
    for item, got in zip(items, resp["scores"]):
        first, second = (item, QUERY) if item_first else (QUERY, item)
        ids = hf_tokenizer(first)["input_ids"] + hf_tokenizer(second, add_special_tokens=False)["input_ids"]
        total += len(ids)
        logits = last_logits(hf_model, ids)
        want = torch.softmax(logits[labels], -1) if apply_softmax else torch.softmax(logits, -1)[labels]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
        if apply_softmax:
            assert abs(sum(got) - 1) < 1e-6
    assert resp["usage"] == {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0}


def test_score_token_ids_and_empty_items(qwen3_server, hf_model):
    query, items = [1, 40, 41, 42], [[7, 8], [9], [100, 101, 102]]
    r = httpx.post(qwen3_server.url + "/v1/score", json={"query": query, "items": items, "label_token_ids": [3, 4]})
    assert r.status_code == 200, r.text
    for item, got in zip(items, r.json()["scores"]):
        want = torch.softmax(last_logits(hf_model, query + item), -1)[[3, 4]]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    r = httpx.post(qwen3_server.url + "/v1/score", json={"query": "q", "items": [], "label_token_ids": [3]})
    assert r.status_code == 200 and r.json()["scores"] == []
    one = httpx.post(qwen3_server.url + "/v1/score", json={"query": QUERY, "items": "Paris", "label_token_ids": [3]})
    assert one.status_code == 200 and len(one.json()["scores"]) == 1  # a string is one item


@pytest.mark.parametrize("body,param", [
    ({"query": "q", "items": ["a"], "label_token_ids": []}, "label_token_ids"),
    ({"query": "q", "items": ["a"]}, "label_token_ids"),
    ({"query": "q", "items": ["a"], "label_token_ids": [3, 10**6]}, "label_token_ids"),
    ({"query": "q", "items": [[1, 2]], "label_token_ids": [3]}, "items"),
    ({"query": [1, 2], "items": ["a"], "label_token_ids": [3]}, "items"),
    ({"query": [1, 2], "items": [[1, 10**6]], "label_token_ids": [3]}, "items"),
])
def test_score_bad_inputs_are_422_naming_the_field(qwen3_server, body, param):
    r = httpx.post(qwen3_server.url + "/v1/score", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


# ------------------------------------------------------------------------------------------------ /v1/rerank


def qwen3_raw(hf_model, hf_tokenizer, query: str, document: str) -> float:
    text = QWEN3_PREFIX + QWEN3_BODY.format(instruction=QWEN3_DEFAULT_INSTRUCTION, query=query,
                                            document=document) + QWEN3_SUFFIX
    logits = last_logits(hf_model, hf_tokenizer(text, add_special_tokens=False)["input_ids"])
    yes, no = hf_tokenizer.convert_tokens_to_ids(["yes", "no"])
    return float(logits[yes] - logits[no])


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_qwen3_matches_transformers(qwen3_server, hf_model, hf_tokenizer, path):
    raw = [qwen3_raw(hf_model, hf_tokenizer, QUERY, d) for d in DOCUMENTS]
    r = httpx.post(qwen3_server.url + path, json={"query": QUERY, "documents": DOCUMENTS, "model": "m"}, timeout=60)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["id"].startswith("rerank-") and [x["index"] for x in resp["results"]] == list(np.argsort(raw)[::-1])
    for result in resp["results"]:
        want = 1 / (1 + np.exp(-raw[result["index"]]))  # the softmax of (no, yes): yes's probability
        assert abs(result["relevance_score"] - want) < 1e-4
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert resp["usage"]["prompt_tokens"] == resp["usage"]["total_tokens"] > 0
    top = httpx.post(qwen3_server.url + path, json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2,
                                                   "return_documents": False, "use_activation": False}).json()
    assert [x["index"] for x in top["results"]] == [x["index"] for x in resp["results"][:2]]
    assert all(set(x) == {"index", "relevance_score"} for x in top["results"])
    assert abs(top["results"][0]["relevance_score"] - max(raw)) < 1e-4
    empty = httpx.post(qwen3_server.url + path, json={"query": QUERY, "documents": []})
    assert empty.status_code == 200 and empty.json()["results"] == []


def test_rerank_bge_gemma_matches_transformers(start_server, chat_folder, hf_model, hf_tokenizer):
    server = start_server(chat_folder, "--reranker", "bge-gemma")
    try:
        r = httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS[:2]}, timeout=60)
        assert r.status_code == 200, r.text
        yes = hf_tokenizer("Yes", add_special_tokens=False)["input_ids"]
        assert len(yes) == 1
        for result in r.json()["results"]:
            # FlagEmbedding's prompt, BOS first (the tokenizer's bos, which is not its pad token)
            text = "<s>" + BGE_GEMMA_BODY.format(query=QUERY, document=DOCUMENTS[result["index"]],
                                                 instruction=BGE_GEMMA_DEFAULT_INSTRUCTION)
            raw = last_logits(hf_model, hf_tokenizer(text, add_special_tokens=False)["input_ids"])[yes[0]]
            assert abs(result["relevance_score"] - float(torch.sigmoid(raw))) < 1e-4
    finally:
        server.stop()


def test_cohere_sdk_reranks(qwen3_server, hf_model, hf_tokenizer):
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(base_url=qwen3_server.url, api_key="unused")
    resp = client.rerank(model="tiny", query=QUERY, documents=DOCUMENTS, top_n=3)
    raw = [qwen3_raw(hf_model, hf_tokenizer, QUERY, d) for d in DOCUMENTS]
    assert [x.index for x in resp.results] == list(np.argsort(raw)[::-1][:3])
    for x in resp.results:
        assert abs(x.relevance_score - 1 / (1 + np.exp(-raw[x.index]))) < 1e-4


def test_a_server_that_cannot_rerank_names_the_flag(start_server, tiny_checkpoint):
    from tests.service.shared_servers import shared_server

    server = shared_server(start_server, tiny_checkpoint)
    r = server.client().post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "unsupported_option"
    assert r.json()["error"]["param"] == "--reranker" and "--reranker" in r.json()["error"]["message"]
    r = server.client().post("/v1/classify", json={"input": "some text"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "unsupported_option"
    info = server.info()
    assert info["task"] == "causal-lm" and info["num_labels"] is None
    # the tiny checkpoint has no chat template
    r = server.client().post("/v1/logits", json={"messages": [[{"role": "user", "content": "hi"}]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


# ----------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_messages_give_apply_chat_template_ids(qwen3_server, hf_model, hf_tokenizer, add_generation_prompt):
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a logit?"}],
                     [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi."}]]
    body = {"messages": conversations, "add_generation_prompt": add_generation_prompt, "return_logits": "all"}
    r = httpx.post(qwen3_server.url + "/v1/logits", json=body, timeout=60)
    assert r.status_code == 200, r.text
    for conversation, item in zip(conversations, r.json()["data"]):
        ids = hf_tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=add_generation_prompt)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert item["num_tokens"] == len(ids)
        with torch.no_grad():
            want = hf_model(torch.tensor([ids])).logits[0]
        np.testing.assert_allclose(np.array(item["logits"]), want.numpy(), atol=1e-4, rtol=0)
    hidden = httpx.post(qwen3_server.url + "/v1/hidden_states", json={"messages": conversations[:1],
                                                                  "add_generation_prompt": add_generation_prompt}).json()
    assert hidden["data"][0]["num_tokens"] == r.json()["data"][0]["num_tokens"]
    both = httpx.post(qwen3_server.url + "/v1/logits", json={"messages": conversations, "inputs": "x"})
    assert both.status_code == 422 and "messages" in both.json()["error"]["message"]


# --------------------------------------------------------------------------------------------- embeddings


def test_embeddings_dimensions_truncate_then_normalize(qwen3_server, hf_model):
    ids = [[1, 40, 41, 42, 43], [1, 9]]
    hidden = qwen3_server.info()["config"]["hidden_size"]
    r = httpx.post(qwen3_server.url + "/v1/embeddings", json={"input": ids, "dimensions": 16})
    assert r.status_code == 200, r.text
    for seq, item in zip(ids, r.json()["data"]):
        with torch.no_grad():
            h = hf_model(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0, -1, :16].double()
        assert len(item["embedding"]) == 16
        np.testing.assert_allclose(item["embedding"], (h / h.norm()).numpy(), atol=1e-4, rtol=0)
    too_big = httpx.post(qwen3_server.url + "/v1/embeddings", json={"input": ids, "dimensions": hidden + 1})
    assert too_big.status_code == 422 and too_big.json()["error"]["param"] == "dimensions"


# ---------------------------------------------------------------------------------------- a classifier head


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory) -> Path:
    """A tiny LlamaForSequenceClassification with one label (a reward model), its tokenizer and a chat template."""
    folder = tmp_path_factory.mktemp("reward-llama")
    tok = make_tokenizer()
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=112,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, num_labels=1,
                                      id2label={0: "reward"}, label2id={"reward": 0})
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "bos_token": "<s>", "eos_token": "</s>",
                                                              "chat_template": template}))
    return folder


def test_reward_model_classify_rerank_and_logits_match_transformers(start_server, reward_folder):
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(reward_folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(reward_folder)

    def reward(ids: list[int]) -> float:
        with torch.no_grad():
            return float(hf(torch.tensor([ids])).logits[0, 0])

    server = start_server(reward_folder)
    try:
        info = server.info()
        assert info["task"] == "classification" and info["num_labels"] == 1
        texts = ["The quick brown fox jumps", "Logits are unnormalized log-probabilities"]
        r = httpx.post(server.url + "/v1/classify", json={"input": texts, "model": "m"}, timeout=60)
        assert r.status_code == 200, r.text
        resp = r.json()
        assert resp["object"] == "list" and resp["id"].startswith("classify-")
        for text, item in zip(texts, resp["data"]):
            want = reward(hf_tok(text)["input_ids"])
            assert item["num_classes"] == 1 and item["label"] == "reward"
            assert abs(item["logits"][0] - want) < 1e-4 and abs(item["probs"][0] - 1 / (1 + np.exp(-want))) < 1e-4
        raw = httpx.post(server.url + "/v1/classify", json={"input": texts, "use_activation": False}).json()
        assert [d["probs"] for d in raw["data"]] == [d["logits"] for d in raw["data"]]
        conversation = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi."}]
        chat = httpx.post(server.url + "/v1/classify", json={"messages": [conversation]}).json()
        ids = hf_tok.apply_chat_template(conversation, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert abs(chat["data"][0]["logits"][0] - reward(ids)) < 1e-4
        # /tokenize renders a conversation as /v1/classify does (the playground shows its tokens' texts)
        tokenized = httpx.post(server.url + "/tokenize", json={"messages": conversation}).json()
        assert tokenized["tokens"] == list(ids)
        both = httpx.post(server.url + "/tokenize", json={"messages": conversation, "prompt": "x"})
        assert both.status_code == 422 and both.json()["error"]["param"] == "prompt"
        # /v1/logits last_token rows of a classifier are the pooled row, num_labels wide
        logits = httpx.post(server.url + "/v1/logits", json={"inputs": texts}).json()
        assert [len(d["logits"][0]) for d in logits["data"]] == [1, 1]
        # rerank: the pair encoding transformers' tokenizer(query, document) builds
        rr = httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS[:2]}).json()
        for result in rr["results"]:
            want = reward(hf_tok(QUERY, DOCUMENTS[result["index"]])["input_ids"])
            assert abs(result["relevance_score"] - 1 / (1 + np.exp(-want))) < 1e-4
    finally:
        server.stop()


def test_a_classifier_refuses_every_vocabulary_output_on_every_route(start_server, reward_folder):
    """A classifier's rows are its labels' scores, not a next-token distribution: every output the table marks as
    needing a vocabulary is 400 unsupported_option wherever it is asked for, before any worker runs it. Before the
    one refusal list, /v1/score (vocab_ids) answered 200 with the label column clamped in for every id, and
    /v1/completions with logprobs (target_logprobs, top_k) failed its whole batch in the worker (500)."""
    from model.runtime.outputs import VOCABULARY_FIELDS

    server = start_server(reward_folder)
    try:
        with server.client() as c:
            for name in VOCABULARY_FIELDS:
                value = [3, 4] if name == "vocab_ids" else 2 if name == "top_k" else True
                r = c.post("/v1/logits", json={"input_ids": [[1, 5, 6]], "logits": False, name: value})
                assert r.status_code == 400, (name, r.text)
                assert r.json()["error"]["type"] == "unsupported_option" and r.json()["error"]["param"] == name
            r = c.post("/v1/score", json={"query": [1, 5], "items": [[6], [7]], "label_token_ids": [3, 4]})
            assert r.status_code == 400 and r.json()["error"]["type"] == "unsupported_option", r.text
            r = c.post("/v1/completions", json={"prompt": [[1, 5, 6]], "echo": True, "logprobs": 1})
            assert r.status_code == 400 and r.json()["error"]["type"] == "unsupported_option", r.text
            # what a classifier does serve still answers, from the same worker
            assert c.post("/v1/logits", json={"input_ids": [[1, 5, 6]]}).status_code == 200
            assert c.post("/v1/classify", json={"input": [[1, 5, 6]]}).status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- the client


def test_python_client_new_calls(qwen3_server, hf_model, hf_tokenizer):
    from service.client import Client

    vocab = qwen3_server.info()["config"]["vocab_size"]
    with Client(qwen3_server.url) as c:
        ids = [1, 40, 41, 42, 43, 44]
        for binary in (True, False):
            out = c.logits(input_ids=[ids], return_logits="all", logits=False, vocab_ids=[3, vocab - 1],
                           target_ranks=True, entropy=True, binary=binary)[0]
            with torch.no_grad():
                logprobs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)
            np.testing.assert_allclose(out.vocab_logprobs, logprobs[:, [3, vocab - 1]].numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(out.entropy, -(logprobs.exp() * logprobs).sum(-1).numpy(), atol=1e-4, rtol=0)
            assert out.target_ranks.dtype == np.int64 and out.target_ranks[-1] == -1
        conversation = [{"role": "user", "content": "Hello there!"}]
        chat = c.logits(messages=conversation, add_generation_prompt=True)[0]
        assert chat.num_tokens == len(hf_tokenizer.apply_chat_template(conversation, tokenize=True,
                                                                        add_generation_prompt=True)["input_ids"])
        scores = c.score(QUERY, ["Paris", "Rome"], [3, 4], apply_softmax=True)
        assert scores.shape == (2, 2) and np.allclose(scores.sum(1), 1)
        results = c.rerank(QUERY, DOCUMENTS, top_n=2, return_documents=False)
        assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
        assert c.embeddings([[1, 5, 6]], dimensions=8).shape == (1, 8)
