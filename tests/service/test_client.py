"""service.client against a live server: every endpoint, binary and JSON responses, numpy and torch, sync and async."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from service.client import AsyncClient, Client, LogitserveError
from tests.service.reference import logits_spec, run
from tests.service.shared_servers import API_KEY, shared_server

SEQS = [[1, 17, 42, 99, 5, 250, 7], [1, 3], [9, 120, 33, 250, 17]]
FIELDS = ("positions", "logits", "target_logprobs", "top_k_ids", "top_k_logprobs", "hidden_states", "hidden_positions")


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, api_key=API_KEY) as c:
        yield c


def _np(x):
    return None if x is None else (x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64))


@pytest.mark.parametrize("binary", [True, False], ids=["safetensors", "json"])
def test_logits(client, reference_runner, binary):
    opts = dict(return_logits="all", target_logprobs=True, top_k=3, return_hidden_states="last_normalized")
    res = client.logits(input_ids=SEQS, binary=binary, **opts)
    want = run(reference_runner, SEQS, logits_spec(reference_runner, opts))
    assert len(res) == 3 and res.inference_ms > 0 and res.model
    for seq, out, ids in zip(res, want, SEQS):
        assert seq.num_tokens == len(ids)
        assert isinstance(seq.logits, np.ndarray) and seq.logits.dtype == np.float32
        for name in FIELDS:
            np.testing.assert_allclose(_np(getattr(seq, name)), _np(getattr(out, name)), atol=2e-4, rtol=1e-4,
                                       equal_nan=True, err_msg=name)


def test_json_and_binary_agree_and_dtypes(client, server):
    b = client.logits(input_ids=SEQS, return_logits="variable", return_n_logits=2, top_k=2)
    j = client.logits(input_ids=SEQS, return_logits="variable", return_n_logits=2, top_k=2, binary=False)
    for x, y in zip(b, j):
        for name in ("positions", "logits", "top_k_ids", "top_k_logprobs"):
            np.testing.assert_allclose(getattr(x, name), getattr(y, name), atol=1e-6)
    half = client.logits(input_ids=SEQS, dtype="bfloat16")
    assert half[0].logits.dtype == np.float32  # numpy has no bfloat16: widened
    np.testing.assert_allclose(half[0].logits, b[0].logits[-1:], atol=0.1)
    with Client(server.url, api_key=API_KEY, tensors="pt") as pt:
        bf = pt.logits(input_ids=SEQS, dtype="bfloat16")
        assert bf[0].logits.dtype == torch.bfloat16 and isinstance(bf[1].positions, torch.Tensor)
        f16 = pt.logits(input_ids=SEQS, dtype="float16", binary=False)  # JSON is float32 whatever the dtype
        assert f16[2].logits.dtype == torch.float32


@pytest.mark.parametrize("binary", [True, False], ids=["safetensors", "json"])
def test_hidden_states(server, reference_runner, binary):
    from model.runtime.outputs import OutputSpec, ReturnHiddenStates

    with Client(server.url, api_key=API_KEY, tensors="pt") as c:
        res = c.hidden_states(input_ids=SEQS, return_hidden_states="all", layers=[0, -1], binary=binary)
    want = run(reference_runner, SEQS, OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL,
                                                  layers=(0, -1)))
    for seq, out in zip(res, want):
        assert isinstance(seq.hidden_states, torch.Tensor) and seq.hidden_states.shape == out.hidden_states.shape
        torch.testing.assert_close(seq.hidden_states, out.hidden_states.float(), atol=2e-4, rtol=1e-4)
        assert seq.positions.tolist() == out.hidden_positions.tolist() and seq.layers == list(out.layers)


def test_text_inputs_embeddings_completions_tokenizer(client, tiny_checkpoint):
    ids = client.tokenize("The quick brown fox")
    assert ids[0] == 1 and client.detokenize(ids) == "<s>The quick brown fox"
    assert client.tokenize("fox", add_special_tokens=False)[0] != 1
    assert client.tokenizer_info()["eos_token"] == "</s>"
    by_text = client.logits(inputs=["The quick brown fox"], top_k=1, logits=False)
    by_ids = client.logits(input_ids=[ids], top_k=1, logits=False)
    assert by_text[0].top_k_ids.tolist() == by_ids[0].top_k_ids.tolist()
    emb_b = client.embeddings(["The quick brown fox", "jumps"])
    emb_j = client.embeddings(["The quick brown fox", "jumps"], binary=False)
    assert emb_b.shape == (2, 64) and np.array_equal(emb_b, emb_j)
    np.testing.assert_allclose(np.linalg.norm(emb_b, axis=1), 1, atol=1e-5)
    out = client.completions([ids], echo=True, logprobs=1, max_tokens=1)
    assert out["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert client.health() == {"status": "ok"} and client.ready() == {"status": "ready"}
    assert client.info()["tokenizer"] is True and client.models()["data"][0]["id"]
    assert "logitserve_requests_total" in client.metrics()


def test_errors(client, server):
    with pytest.raises(LogitserveError) as e:
        client.logits(input_ids=[[1, 10**6]])
    assert e.value.status == 422 and e.value.param == "input_ids"
    with pytest.raises(LogitserveError) as e:
        client.completions("x", max_tokens=3)
    assert e.value.status == 400
    with Client(server.url) as anon, pytest.raises(LogitserveError) as e:
        anon.info()
    assert e.value.status == 401
    with pytest.raises(ValueError):
        client.logits()


def test_async_client(server, reference_runner):
    async def main():
        async with AsyncClient(server.url, api_key=API_KEY) as c:
            results = await asyncio.gather(
                c.logits(input_ids=SEQS, return_logits="all", logits=False, target_logprobs=True),
                c.logits(input_ids=SEQS, return_logits="all", logits=False, target_logprobs=True, binary=False),
                c.hidden_states(input_ids=SEQS[:1]),
                c.embeddings([SEQS[0]]),
                c.completions(SEQS, max_tokens=1),
                c.tokenize("hi"), c.detokenize([1, 50]), c.tokenizer_info(),
                c.health(), c.ready(), c.info(), c.models(), c.metrics())
            return results

    res = asyncio.run(main())
    want = run(reference_runner, SEQS, logits_spec(reference_runner, {"return_logits": "all", "logits": False,
                                                                      "target_logprobs": True}))
    for r in res[:2]:
        for seq, out in zip(r, want):
            np.testing.assert_allclose(seq.target_logprobs, out.target_logprobs, atol=2e-4, equal_nan=True)
    assert res[2][0].hidden_states.shape == (1, 1, 64) and res[3].shape == (1, 64)
    assert len(res[4]["choices"]) == 3 and res[5][0] == 1 and res[6].startswith("<s>")


def test_read_safetensors_views_the_body_without_copying():
    from safetensors.numpy import save

    from service.client import read_safetensors

    logits = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    positions = np.arange(5, dtype=np.int64)
    bf16 = torch.randn(3, 4).to(torch.bfloat16)
    body = save({"logits": logits, "positions": positions,
                 "h": bf16.view(torch.int16).numpy()}, metadata={"model": "m"})
    # Mark the last tensor as BF16 in the header, as the server writes it.
    n = int.from_bytes(body[:8], "little")
    header = body[8 : 8 + n].replace(b'"dtype":"I16"', b'"dtype":"BF16"')
    body = len(header).to_bytes(8, "little") + header + body[8 + n :]
    out, meta = read_safetensors(body)
    assert meta == {"model": "m"}
    np.testing.assert_array_equal(out["logits"], logits)
    np.testing.assert_array_equal(out["positions"], positions)
    np.testing.assert_array_equal(out["h"], bf16.float().numpy())
    whole = np.frombuffer(body, np.uint8)
    assert np.shares_memory(out["logits"], whole) and np.shares_memory(out["positions"], whole)
    assert not out["logits"].flags.writeable  # a view of immutable bytes
