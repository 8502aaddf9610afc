"""/v1/logits `vocab_ids`, `target_ranks` and `entropy` against transformers, as JSON and safetensors, tp 1 and 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load

from tests.service.reference import hf_logits

SEQS = [[1, 17, 42, 99, 5, 250, 7], [1, 3], [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 3], [9]]


@pytest.fixture(scope="module", params=[(), ("--tp", "2")], ids=["tp1", "tp2"])
def server(request, start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, *request.param)
    yield server
    server.stop()


def expected(hf_model, seq: list[int], vocab_ids: list[int]):
    """(log-softmax at vocab_ids [n, k], ranks [n] with -1 last, entropy [n]) from transformers' full rows."""
    logits = hf_logits(hf_model, seq)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(seq[1:] + [0])
    ranks = 1 + (logits > logits.gather(1, targets[:, None])).sum(-1)
    ranks[-1] = -1
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs[:, vocab_ids].numpy(), ranks.numpy(), entropy.numpy()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "safetensors"])
@pytest.mark.parametrize("return_logits", ["all", "last_token"])
def test_new_kinds_match_transformers(server, hf_reference, binary, return_logits):
    vocab = server.info()["config"]["vocab_size"]
    vocab_ids = [0, vocab - 1, 42, 42, 7]
    body = {"input_ids": SEQS, "return_logits": return_logits, "logits": False, "vocab_ids": vocab_ids,
            "target_ranks": True, "entropy": True}
    headers = {"accept": "application/x-safetensors"} if binary else {}
    with server.client() as c:
        r = c.post("/v1/logits", json=body, headers=headers)
    assert r.status_code == 200, r.text
    if binary:
        t = st_load(r.content)
        assert set(t) == {"input_row_offsets", "positions", "logit_offsets", "vocab_logprobs", "target_ranks",
                          "entropy"}
        assert t["vocab_logprobs"].dtype == np.float32 and t["target_ranks"].dtype == np.int64
        assert t["entropy"].dtype == np.float32
        offsets = t["logit_offsets"]
        items = [{"vocab_logprobs": t["vocab_logprobs"][a:b], "target_ranks": t["target_ranks"][a:b],
                  "entropy": t["entropy"][a:b], "positions": t["positions"][a:b]}
                 for a, b in zip(offsets[:-1], offsets[1:])]
    else:
        items = r.json()["data"]
        assert all(set(item) == {"index", "num_tokens", "positions", "vocab_logprobs", "target_ranks", "entropy"}
                   for item in items)
    for item, seq in zip(items, SEQS):
        rows = list(item["positions"])
        want_vocab, want_ranks, want_entropy = (a[rows] for a in expected(hf_reference, seq, vocab_ids))
        np.testing.assert_allclose(np.array(item["vocab_logprobs"], dtype=np.float64), want_vocab, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.array(item["entropy"], dtype=np.float64), want_entropy, atol=1e-4, rtol=0)
        ranks = [(-1 if v is None else v) for v in list(item["target_ranks"])]
        assert ranks == want_ranks.tolist()
        if not binary:
            assert item["target_ranks"][-1] is None  # the last position has no next token


@pytest.mark.parametrize("vocab_ids,message", [
    (list(range(1025)), "at most 1024"),
    ([], "at least 1"),
    ([3, 100000], "outside"),
    ([-1], "outside"),
])
def test_bad_vocab_ids_are_422_naming_the_field(server, vocab_ids, message):
    with server.client() as c:
        r = c.post("/v1/logits", json={"input_ids": SEQS, "vocab_ids": vocab_ids})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "vocab_ids" and message in err["message"]
