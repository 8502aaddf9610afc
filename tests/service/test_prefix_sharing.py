"""--prefix-sharing on the served path: a sequence's outputs are the same bits with sharing on, off and alone; the
counter of tokens not recomputed moves; /info says what is in force."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load as st_load

from model.runtime.outputs import OUTPUT_KINDS

SHARED = "logitserve_prefix_shared_tokens_total"
# Every output kind on every row (the server is batch-invariant, the CPU default: alone and batched run their
# matmuls on whole groups of 4 rows).
BODY = {"return_logits": "all", "target_logprobs": True, "top_k": 4, "vocab_ids": [3, 250], "target_ranks": True,
        "entropy": True, "return_hidden_states": "all"}


def prompts(seed: int = 0) -> list[list[int]]:
    """A context with four continuations, another context with two, a sequence that is a prefix of another, one
    sharing nothing: 8 prompts, as lm-evaluation-harness sends them."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, 300) for _ in range(n)]

    context, other = tokens(90), tokens(40)
    seqs = [context + tokens(n) for n in (1, 4, 9, 12)] + [other + tokens(n) for n in (2, 30)]
    return seqs + [context[:70], tokens(25)]


def trie_nodes(seqs: list[list[int]]) -> int:
    return len({tuple(s[: p + 1]) for s in seqs for p in range(len(s))})


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    # Widths of multiples of 64: element-wise kernels take no scalar tail inside a row.
    return checkpoint_factory("llama", with_tokenizer=False, hidden_size=128, num_heads=4, num_kv_heads=2,
                              intermediate_size=256, vocab_size=300)


@pytest.fixture(scope="module")
def servers(start_server, model_path):
    return start_server(model_path), start_server(model_path, "--prefix-sharing", "off")


def binary(server, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    with server.client() as client:
        r = client.post("/v1/logits", json={"input_ids": seqs, **BODY}, headers={"Accept": "application/x-safetensors"})
    assert r.status_code == 200, r.text
    return st_load(r.content)


def per_sequence(tensors: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    out = {}
    for kind in OUTPUT_KINDS:
        if kind.name in tensors:
            offsets = tensors[kind.rows.offsets]
            out[kind.name] = tensors[kind.name].narrow(kind.row_dim, int(offsets[b]), int(offsets[b + 1] - offsets[b]))
    return out


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where) -> None:
    assert a.keys() == b.keys() and len(a) == len(OUTPUT_KINDS), where
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, (where, name)
        if x.is_floating_point():  # NaN (no next token) where the other has NaN
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(0.5), y.nan_to_num(0.5)), (where, name)
        else:
            assert torch.equal(x, y), (where, name)


def test_info_reports_what_is_in_force(servers):
    on, off = servers
    assert on.info()["prefix_sharing"] is True
    assert off.info()["prefix_sharing"] is False


def test_a_served_sequence_has_the_same_bits_with_sharing_on_off_and_alone(servers):
    on, off = servers
    seqs = prompts()
    before = on.metric(SHARED)
    shared = binary(on, seqs)  # one request: one batch (nothing else is queued)
    assert on.metric(SHARED) - before == sum(map(len, seqs)) - trie_nodes(seqs) > 0
    unshared = binary(off, seqs)
    assert off.metric(SHARED) == 0
    for b, seq in enumerate(seqs):
        assert_same_bits(per_sequence(shared, b), per_sequence(unshared, b), (b, "off"))
        assert_same_bits(per_sequence(shared, b), per_sequence(binary(on, [seq]), 0), (b, "alone"))
