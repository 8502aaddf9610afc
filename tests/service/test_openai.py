"""The official `openai` SDK against a live server: embeddings (float and base64) and scoring completions, checked
against the model run in-process; plus the tokenizer endpoints and the errors in OpenAI's shape."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from model.runtime.outputs import OutputSpec, ReturnHiddenStates, ReturnLogits
from tests.service.reference import run
from tests.service.shared_servers import API_KEY, shared_server

openai = pytest.importorskip("openai")

SEQS = [[1, 17, 42, 99, 5, 250, 7], [1, 3], [9, 120, 33, 250, 17, 80, 81, 82, 83]]
TEXTS = ["The quick brown fox jumps", "Logits are unnormalized log-probabilities"]


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint)


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from model.families.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


def expected_embeddings(runner, seqs, pooling="last"):
    mode = ReturnHiddenStates.ALL_NORMALIZED if pooling == "mean" else ReturnHiddenStates.LAST_NORMALIZED
    outs = run(runner, seqs, OutputSpec(logits=False, return_hidden_states=mode, layers=(-1,)))
    vecs = []
    for out in outs:
        h = out.hidden_states[0].double()
        v = h.mean(0) if pooling == "mean" else h[-1]
        vecs.append((v / v.norm()).float().numpy())
    return np.stack(vecs)


def vec(embedding):
    """An explicit encoding_format="base64" leaves the string to the caller (the SDK decodes only its default)."""
    return np.frombuffer(base64.b64decode(embedding), dtype="<f4") if isinstance(embedding, str) else embedding


def test_embeddings_float_and_base64(sdk, reference_runner, tokenizer):
    want = expected_embeddings(reference_runner, SEQS)
    as_float = sdk.embeddings.create(model="tiny", input=SEQS, encoding_format="float")
    as_b64 = sdk.embeddings.create(model="tiny", input=SEQS, encoding_format="base64")
    default = sdk.embeddings.create(model="tiny", input=SEQS)  # the SDK asks for base64 and decodes it
    for resp in (as_float, as_b64, default):
        got = np.array([vec(d.embedding) for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert resp.usage.prompt_tokens == sum(map(len, SEQS))
    # float and base64 carry the same float32 values
    assert np.array_equal(np.array([d.embedding for d in as_float.data], np.float32),
                          np.array([vec(d.embedding) for d in as_b64.data], np.float32))
    # text input (a single string, a list) and a single id list
    one = sdk.embeddings.create(model="tiny", input=TEXTS[0]).data[0].embedding
    ids = tokenizer.encode(TEXTS[0]).ids
    np.testing.assert_allclose(one, expected_embeddings(reference_runner, [ids])[0], atol=1e-5)
    single_ids = sdk.embeddings.create(model="tiny", input=ids).data[0].embedding
    np.testing.assert_allclose(single_ids, one, atol=1e-6)


def test_embeddings_base64_is_little_endian_float32(server):
    r = httpx.post(server.url + "/v1/embeddings", headers=server.headers,
                   json={"input": SEQS[:1], "encoding_format": "base64"})
    r2 = httpx.post(server.url + "/v1/embeddings", headers=server.headers, json={"input": SEQS[:1]})
    raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(raw, np.array(r2.json()["data"][0]["embedding"], dtype=np.float32))
    assert r.json()["object"] == "list" and r.json()["data"][0]["object"] == "embedding"


@pytest.fixture(scope="module")
def plain_server(start_server, checkpoint_factory):
    """The same weights without tokenizer.json, mean pooling, no API key: one more start covers all three."""
    return shared_server(start_server, checkpoint_factory("llama", with_tokenizer=False), "--pooling", "mean",
                         api_key=None)


def test_mean_pooling(plain_server, reference_runner):
    server = plain_server
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        resp = c.embeddings.create(model="tiny", input=SEQS)
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected_embeddings(reference_runner, SEQS, "mean"), atol=1e-5)


def reference_rows(runner, seqs, k):
    spec = OutputSpec(return_logits=ReturnLogits.ALL, logits=True, target_logprobs=True, top_k=k)
    return run(runner, seqs, spec)


@pytest.mark.parametrize("k", [1, 5])
def test_scoring_completions_with_echo(sdk, reference_runner, tokenizer, k):
    resp = sdk.completions.create(model="tiny", prompt=SEQS, echo=True, logprobs=k, max_tokens=1, temperature=0,
                                  extra_body={"seed": 1234})
    outs = reference_rows(reference_runner, SEQS, k)
    assert [c.index for c in resp.choices] == list(range(len(SEQS)))
    assert resp.usage.prompt_tokens == sum(map(len, SEQS)) and resp.usage.completion_tokens == len(SEQS)
    for choice, seq, out in zip(resp.choices, SEQS, outs):
        lp = choice.logprobs
        n = len(seq)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        np.testing.assert_allclose(lp.token_logprobs[1:n], out.target_logprobs[: n - 1].numpy(), atol=1e-5)
        # the greedy next token is the argmax of the last row
        greedy = int(out.logits[-1].argmax())
        assert lp.token_logprobs[n] == pytest.approx(float(torch.log_softmax(out.logits[-1], -1)[greedy]), abs=1e-5)
        assert lp.tokens[n] == tokenizer.decode([greedy], skip_special_tokens=False) or lp.tokens[n]
        for p in range(1, n + 1):
            top = lp.top_logprobs[p]
            assert 1 <= len(top) <= k + 1  # k most likely (distinct texts: the first of equal texts wins) + actual
            actual_text = lp.tokens[p]
            # the actual token's entry carries the very float of token_logprobs, unless a more likely token among
            # the top decodes to the same text (partial UTF-8 bytes, "\ufffd"): then the key keeps the larger value
            assert top[actual_text] == lp.token_logprobs[p] or top[actual_text] > lp.token_logprobs[p]
            if "\ufffd" not in actual_text:
                assert top[actual_text] == lp.token_logprobs[p]
            ref_top = out.top_k_logprobs[p - 1].numpy()
            assert max(top.values()) == pytest.approx(float(ref_top[0]), abs=1e-5)
            allowed = np.append(ref_top, lp.token_logprobs[p])
            assert all(np.abs(allowed - v).min() < 1e-5 for v in top.values())
            is_argmax = seq[p] == int(out.logits[p - 1].argmax()) if p < n else True
            assert (lp.token_logprobs[p] == max(top.values())) == is_argmax
        # echoed text and offsets
        assert choice.text == "".join(lp.tokens)
        assert lp.text_offset == np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]).tolist()
        assert choice.finish_reason == "length"


def test_scoring_text_prompts(sdk, reference_runner, tokenizer):
    resp = sdk.completions.create(model="tiny", prompt=TEXTS, echo=True, logprobs=2, max_tokens=1)
    encs = tokenizer.encode_batch(TEXTS)
    outs = reference_rows(reference_runner, [e.ids for e in encs], 2)
    for choice, text, enc, out in zip(resp.choices, TEXTS, encs, outs):
        lp = choice.logprobs
        n = len(enc.ids)
        assert choice.text == text + lp.tokens[-1]
        assert lp.text_offset == [o[0] for o in enc.offsets] + [len(text)]
        assert "".join(lp.tokens[1:n]) == text  # byte-level BPE: the tokens decode back to the prompt
        np.testing.assert_allclose(lp.token_logprobs[1:n], out.target_logprobs[: n - 1].numpy(), atol=1e-5)


def test_completions_without_echo(sdk, reference_runner):
    resp = sdk.completions.create(model="tiny", prompt=SEQS[0], logprobs=3, max_tokens=1)
    (choice,) = resp.choices
    (out,) = reference_rows(reference_runner, SEQS[:1], 3)
    greedy_lp = float(out.top_k_logprobs[-1][0])
    assert choice.logprobs.token_logprobs == [pytest.approx(greedy_lp, abs=1e-5)]
    assert len(choice.logprobs.tokens) == 1 and choice.text == choice.logprobs.tokens[0]
    # max_tokens 0 without echo: nothing to return
    empty = sdk.completions.create(model="tiny", prompt=SEQS, max_tokens=0)
    assert [c.text for c in empty.choices] == ["", "", ""] and all(c.logprobs is None for c in empty.choices)
    # echo without logprobs gives the prompt text back
    echoed = sdk.completions.create(model="tiny", prompt="hello world", max_tokens=0, echo=True)
    assert echoed.choices[0].text == "hello world" and echoed.choices[0].logprobs is None


def test_openai_errors(sdk, server):
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        sdk.completions.create(model="tiny", prompt=[[1, 5], [1, 100000]], max_tokens=0, echo=True, logprobs=0)
    assert "sequence 1" in e.value.body["message"] and e.value.body["param"] == "prompt"
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.completions.create(model="tiny", prompt=[], max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.completions.create(model="tiny", prompt="x", logprobs=21)
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.embeddings.create(model="tiny", input=[[]])
    with pytest.raises(openai.UnprocessableEntityError):  # larger than the hidden size
        sdk.embeddings.create(model="tiny", input="x", dimensions=100000)
    with pytest.raises(openai.AuthenticationError):
        with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad:
            bad.embeddings.create(model="tiny", input="x")


def test_tokenizer_endpoints(server, tokenizer):
    c = server.client()
    r = c.post("/tokenize", json={"prompt": "The quick brown fox</s>", "add_special_tokens": False}).json()
    want = tokenizer.encode("The quick brown fox</s>", add_special_tokens=False).ids
    assert r["tokens"] == want and r["count"] == len(want) and want[-1] == 2
    assert c.post("/tokenize", json={"prompt": "hi"}).json()["tokens"][0] == 1  # add_special_tokens defaults true
    assert c.post("/detokenize", json={"tokens": want}).json() == {"prompt": "The quick brown fox</s>"}
    info = c.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", None)
    assert c.post("/detokenize", json={"tokens": [5, 10**6]}).status_code == 422
    assert c.post("/tokenize", json={"text": "x"}).status_code == 422
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401


def test_no_tokenizer(plain_server):
    server = plain_server
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [[1, 5, 6]], "echo": True, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["1", "5", "6"] and r.json()["choices"][0]["text"] == "156"
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "text"}).status_code == 400
    assert httpx.post(server.url + "/tokenize", json={"prompt": "text"}).status_code == 400
