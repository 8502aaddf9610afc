"""Expected responses, computed in-process with `ModelRunner.run` (and transformers for logits)."""

from __future__ import annotations

import math

import numpy as np
import torch

from model.runtime.outputs import OutputSpec, ReturnHiddenStates, ReturnLogits
from service.packing import pack_ids

LOGIT_FIELDS = ("return_logits", "return_n_logits", "logits", "target_logprobs", "top_k", "return_hidden_states")


def logits_spec(runner, body: dict) -> OutputSpec:
    return OutputSpec(
        return_logits=ReturnLogits(body.get("return_logits", "last_token")),
        return_n_logits=body.get("return_n_logits", 1),
        logits=body.get("logits", True),
        target_logprobs=body.get("target_logprobs", False),
        top_k=body.get("top_k", 0),
        return_hidden_states=ReturnHiddenStates(body.get("return_hidden_states", "none")),
    )


def hidden_spec(runner, body: dict) -> OutputSpec:
    return OutputSpec(
        logits=False,
        return_hidden_states=ReturnHiddenStates(body.get("return_hidden_states", "last")),
        layers=tuple(body.get("layers", [-1])),
    )


def run(runner, seqs: list[list[int]], spec: OutputSpec):
    ids, offsets = pack_ids(seqs)
    return runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), [spec] * len(seqs))


def _close(got, want, atol, what):
    got = np.array([np.nan if v is None else v for v in np.ravel(np.array(got, dtype=object))], dtype=np.float64)
    want = np.asarray(want, dtype=np.float64).ravel()
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4, equal_nan=True, err_msg=what)


def check_logits_response(runner, body: dict, seqs: list[list[int]], resp: dict, atol: float = 2e-4) -> None:
    spec = logits_spec(runner, body)
    outs = run(runner, seqs, spec)
    assert resp["object"] == "logits"
    assert resp["usage"] == {"prompt_tokens": sum(map(len, seqs)), "total_tokens": sum(map(len, seqs))}
    assert len(resp["data"]) == len(seqs)
    for i, (item, out, seq) in enumerate(zip(resp["data"], outs, seqs)):
        assert item["index"] == i and item["num_tokens"] == len(seq)
        assert item["positions"] == out.positions.tolist()
        expected_keys = {"index", "num_tokens", "positions"}
        if spec.logits:
            expected_keys.add("logits")
            _close(item["logits"], out.logits, atol, "logits")
        if spec.target_logprobs:
            expected_keys.add("target_logprobs")
            assert item["target_logprobs"][-1] is None if out.positions[-1] == len(seq) - 1 else True
            _close(item["target_logprobs"], out.target_logprobs, atol, "target_logprobs")
        if spec.top_k:
            expected_keys.add("top_k")
            _close(item["top_k"]["logprobs"], out.top_k_logprobs, atol, "top_k logprobs")
            got_ids = np.array(item["top_k"]["ids"])
            want_ids = out.top_k_ids.numpy()
            # ties between near-equal logits may swap under a different reduction order
            mismatch = got_ids != want_ids
            assert mismatch.mean() <= 0.02, "top_k ids"
        if spec.return_hidden_states != ReturnHiddenStates.NONE:
            expected_keys.add("hidden_states")
            _close(item["hidden_states"], out.hidden_states.float(), atol, "hidden_states")
        assert set(item) == expected_keys


def check_hidden_response(runner, body: dict, seqs: list[list[int]], resp: dict, atol: float = 2e-4) -> None:
    spec = hidden_spec(runner, body)
    outs = run(runner, seqs, spec)
    assert resp["object"] == "hidden_states"
    for i, (item, out, seq) in enumerate(zip(resp["data"], outs, seqs)):
        assert set(item) == {"index", "num_tokens", "positions", "layers", "hidden_states"}
        assert item["index"] == i and item["num_tokens"] == len(seq)
        assert item["positions"] == out.hidden_positions.tolist()
        assert item["layers"] == list(out.layers)
        _close(item["hidden_states"], out.hidden_states.float(), atol, "hidden_states")


def hf_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()


def hf_logprob(logits: torch.Tensor, seq: list[int], p: int) -> float:
    if p + 1 >= len(seq):
        return math.nan
    return float(torch.log_softmax(logits[p], -1)[seq[p + 1]])
