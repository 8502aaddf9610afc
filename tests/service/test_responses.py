"""The response encoders and the client's decoders, driven by the output kinds table, without a server: every kind
goes out (JSON and safetensors) and comes back per sequence as it went in, and a kind added to the table (the next
one, whatever it is, with -1 as JSON null or not) needs no change to either side."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from model.runtime.outputs import OUTPUT_KINDS, OutputKind, Rows
from service import client, responses
from service.engine import Scored
from service.inputs import PackedInputs
from service.packing import pack_ids
from service.workers import RequestOutputs

LENGTHS = [3, 5]
LOGIT_ROWS = [1, 5]  # last token of the first sequence, every row of the second
HIDDEN_ROWS = [3, 5]


def scored(extra: dict[str, np.ndarray] | None = None) -> Scored:
    rng = np.random.default_rng(0)
    r, rh = sum(LOGIT_ROWS), sum(HIDDEN_ROWS)
    target = rng.standard_normal(r).astype(np.float32)
    target[[0, r - 1]] = np.nan  # the last position of each sequence has no next token
    arrays = {
        "positions": np.array([2, 0, 1, 2, 3, 4]),
        "logits": rng.standard_normal((r, 11)).astype(np.float32),
        "target_logprobs": target,
        "top_k_ids": rng.integers(0, 11, (r, 2)),
        "top_k_logprobs": rng.standard_normal((r, 2)).astype(np.float32),
        "vocab_logprobs": rng.standard_normal((r, 3)).astype(np.float32),
        "target_ranks": np.array([-1, 1, 7, 2, 3, -1]),
        "entropy": np.linspace(0, 1, r, dtype=np.float32),
        "hidden_states": rng.standard_normal((2, rh, 4)).astype(np.float32),
        "hidden_positions": np.array([0, 1, 2, 0, 1, 2, 3, 4]),
        **(extra or {}),
    }
    ids, _ = pack_ids([[1] * n for n in LENGTHS])
    inputs = PackedInputs(ids, LENGTHS, [[1] * n for n in LENGTHS])
    return Scored(RequestOutputs(arrays, LOGIT_ROWS, HIDDEN_ROWS, (3, 1)), inputs, 0.001, 0.002)


def per_sequence(s: Scored, kind: OutputKind, i: int) -> np.ndarray:
    a, b = s.outputs.offsets(kind.rows)[i : i + 2]
    return s.outputs[kind][(slice(None),) * kind.row_dim + (slice(a, b),)]


def round_trip(s: Scored) -> tuple[client.Result, client.Result]:
    meta = {"model": "m", "return_logits": "all", "return_hidden_states": "all"}
    body = b"".join(bytes(p) for p in responses.scoring_safetensors(s, (Rows.LOGIT, Rows.HIDDEN), "float32", meta))
    from_json = client.parse_json(orjson.loads(b"".join(responses.iter_json(responses.logits_json(s, "m")))), "np",
                                  {"return_hidden_states": "all"})
    return client.parse_binary(body), from_json


def test_every_kind_round_trips_per_sequence():
    s = scored()
    binary, from_json = round_trip(s)
    for kind in OUTPUT_KINDS:
        for i in range(len(LENGTHS)):
            want = per_sequence(s, kind, i)
            np.testing.assert_array_equal(getattr(binary[i], kind.name), want, err_msg=kind.name)
            np.testing.assert_array_equal(getattr(from_json[i], kind.name), want, err_msg=kind.name)
    assert binary[0].layers == [3, 1]
    item = orjson.loads(b"".join(responses.iter_json(responses.logits_json(s, "m"))))["data"][0]
    assert list(item) == ["index", "num_tokens", "positions", "logits", "target_logprobs", "top_k", "vocab_logprobs",
                          "target_ranks", "entropy", "hidden_states"]
    assert item["target_logprobs"] == [None] and item["target_ranks"] == [None]
    item = orjson.loads(b"".join(responses.iter_json(responses.logits_json(s, "m"))))["data"][1]
    assert item["target_ranks"] == [1, 7, 2, 3, None]  # -1 (no next token) is null in JSON


def test_a_kind_added_to_the_table_reaches_both_encodings_and_the_client(monkeypatch):
    entropy = OutputKind("margin", Rows.LOGIT, "float32", json=("margin",))
    ranks = OutputKind("argmax_ids", Rows.LOGIT, "int64", json=("argmax_ids",), json_null=-1)
    kinds = OUTPUT_KINDS[:-2] + (ranks, entropy) + OUTPUT_KINDS[-2:]
    for module in (responses, client):
        monkeypatch.setattr(module, "OUTPUT_KINDS", kinds)
    r = sum(LOGIT_ROWS)
    s = scored({"margin": np.linspace(0, 1, r, dtype=np.float32), "argmax_ids": np.array([-1, 1, 7, 2, 3, -1])})
    binary, from_json = round_trip(s)
    for kind in (entropy, ranks):
        for i in range(len(LENGTHS)):
            want = per_sequence(s, kind, i)
            np.testing.assert_array_equal(getattr(binary[i], kind.name), want, err_msg=kind.name)
            np.testing.assert_array_equal(getattr(from_json[i], kind.name), want, err_msg=kind.name)
    item = orjson.loads(b"".join(responses.iter_json(responses.logits_json(s, "m"))))["data"][1]
    assert item["argmax_ids"] == [1, 7, 2, 3, None]  # -1 is null in JSON
    assert list(item)[-3:] == ["argmax_ids", "margin", "hidden_states"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_request_dtype_applies_to_the_kinds_that_follow_it(dtype):
    import torch
    from safetensors.torch import load

    s = scored()
    meta = {"model": "m", "return_logits": "all", "return_hidden_states": "all"}
    body = b"".join(bytes(p) for p in responses.scoring_safetensors(s, (Rows.LOGIT, Rows.HIDDEN), dtype, meta))
    t = load(body)
    for kind in OUTPUT_KINDS:
        want = torch.from_numpy(s.outputs[kind])
        if kind.follows_dtype:
            want = want.to(getattr(torch, dtype))
        torch.testing.assert_close(t[kind.name], want, rtol=0, atol=0, equal_nan=True, msg=kind.name)


def test_bfloat16_of_a_read_only_view_warns_nothing(recwarn):
    """Result tensors are read-only views of the workers' shared memory; converting them must not warn."""
    view = np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), dtype=np.float32)
    assert not view.flags.writeable
    responses.cast(view, "bfloat16")
    assert not [w for w in recwarn if "not writable" in str(w.message)]
