"""The request schema against the output kinds table: /v1/logits asks for exactly the table's outputs, under the
OutputSpec field names, and the Python client sends exactly those."""

from __future__ import annotations

import dataclasses

import pytest

from model.runtime.outputs import OUTPUT_REQUEST_FIELDS, OutputSpec
from service.client import Client
from service.routes.scoring import logits_spec
from service.schemas import LogitsRequest

SPEC_FIELDS = {f.name for f in dataclasses.fields(OutputSpec)}
ROW_CHOICE = {"return_logits", "return_n_logits"}  # which rows, not which outputs


def test_logits_request_asks_for_exactly_the_table_s_outputs():
    passed_on = set(LogitsRequest.model_fields) & SPEC_FIELDS
    assert passed_on - ROW_CHOICE == set(OUTPUT_REQUEST_FIELDS)


def test_every_output_field_reaches_the_spec(monkeypatch):
    class Served:
        class config:
            vocab_size, num_layers = 50, 2

    asks = {"logits": False, "target_logprobs": True, "top_k": 3, "vocab_ids": [4, 4], "target_ranks": True,
            "entropy": True, "return_hidden_states": "last"}
    assert set(asks) == set(OUTPUT_REQUEST_FIELDS)
    spec = logits_spec(LogitsRequest(input_ids=[[1, 2]], **asks), Served)
    for name, value in asks.items():
        got = getattr(spec, name)
        assert (list(got) if isinstance(got, tuple) else got) == value, name


def test_the_client_sends_the_table_s_output_fields_and_refuses_others():
    sent = []
    client = Client("http://test")
    client._send = lambda call: sent.append(call[2])  # (method, path, body, headers, parse)
    import numpy as np

    client.logits(input_ids=[[1, 2]], target_ranks=True, vocab_ids=np.array([3, 4]), top_k=np.int64(2))
    assert {k: sent[0][k] for k in ("target_ranks", "vocab_ids", "top_k")} == {
        "target_ranks": True, "vocab_ids": [3, 4], "top_k": 2}
    assert "entropy" not in sent[0]  # not asked: the server's default
    LogitsRequest(**sent[0])  # a body the schema accepts
    with pytest.raises(TypeError, match="entropie"):
        client.logits(input_ids=[[1, 2]], entropie=True)
