"""Batch invariance as served (--batch-invariant, on by default on the CPU): a sequence's every output is the same
bits whether its request is served alone or packed by the batcher with concurrent requests of other shapes and
options, wherever it lands in the batch, on either of two replicas, and under tp 2 (within tp 2). Compared as bits
(safetensors responses, NaN included), never with a tolerance."""

from __future__ import annotations

import concurrent.futures as cf
import random

import pytest
import torch

from service.client import Client
from tests.model.test_batch_invariance import bits

# 1-13 tokens take MKL's short-call kernels when a matmul has that many rows; 120-300 cut element-wise calls
LENGTHS = [1, 2, 3, 5, 7, 9, 13, 40, 120, 300]

# (endpoint, options): every output kind of /v1/logits, both of /v1/hidden_states
ASKS = [
    ("logits", dict(return_logits="all", target_logprobs=True, top_k=5, entropy=True)),
    ("logits", dict(return_logits="all", logits=False, target_logprobs=True, target_ranks=True, top_k=3,
                    vocab_ids=[7, 3, 250])),
    ("logits", dict()),  # last token: the last block runs on a row subset
    ("logits", dict(return_logits="all", logits=False, entropy=True, return_hidden_states="last")),
    ("hidden_states", dict(return_hidden_states="all_normalized", layers=[0, 1, -1])),
    ("hidden_states", dict(return_hidden_states="last", layers=[-1])),
]

OUTPUTS = ("logits", "target_logprobs", "top_k_ids", "top_k_logprobs", "vocab_logprobs", "target_ranks", "entropy",
           "hidden_states", "positions", "hidden_positions")


@pytest.fixture(scope="module")
def odd_checkpoint(checkpoint_factory):
    """Odd widths (intermediate 101, vocabulary 301): element-wise kernels take scalar tails."""
    return checkpoint_factory("llama", with_tokenizer=False, intermediate_size=101, vocab_size=301,
                              max_position_embeddings=512)


def workload(seed: int) -> list[tuple[str, list[int], dict]]:
    rnd = random.Random(seed)
    return [(ASKS[i % len(ASKS)][0], [rnd.randrange(301) for _ in range(n)], ASKS[i % len(ASKS)][1])
            for i, n in enumerate(LENGTHS + LENGTHS[::3])]


def call(client: Client, job) -> object:
    endpoint, ids, options = job
    return getattr(client, endpoint)(input_ids=[ids], **options)[0]


def assert_same_bits(got, want, where: str) -> None:
    for name in OUTPUTS:
        a, b = getattr(got, name, None), getattr(want, name, None)
        assert (a is None) == (b is None), (where, name)
        if a is not None:
            assert a.shape == b.shape and torch.equal(bits(a), bits(b)), (where, name)


def batch_sequences(server) -> tuple[float, float]:
    """(sequences, batches) run so far, from the batch-size histogram."""
    return server.metric("logitserve_batch_sequences_sum"), server.metric("logitserve_batch_sequences_count")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--replicas", "2"), ("--tp", "2", "--batch-invariant", "on")],
                         ids=["replicas2", "tp2"])
def test_served_outputs_are_the_same_bits_alone_and_packed(flags, start_server, odd_checkpoint):
    server = start_server(odd_checkpoint, *flags)
    try:
        assert server.info()["batch_invariant"] is True
        jobs = workload(seed=len(flags))
        with Client(server.url, api_key=server.api_key, tensors="pt") as client:
            alone = [call(client, job) for job in jobs]  # one request at a time: batches of one sequence
            seqs_before, batches_before = batch_sequences(server)
            rnd = random.Random(1)
            for round_ in range(3):
                order = rnd.sample(range(len(jobs)), len(jobs))
                with cf.ThreadPoolExecutor(len(jobs)) as pool:  # all at once: the batcher packs them
                    packed = list(pool.map(lambda i: call(client, jobs[i]), order))
                for i, got in zip(order, packed):
                    where = f"{flags} round {round_} job {i} ({jobs[i][0]}, {len(jobs[i][1])} tokens)"
                    assert_same_bits(got, alone[i], where)
        seqs_after, batches_after = batch_sequences(server)
        # the concurrent rounds were really packed: fewer batches than requests
        assert batches_after - batches_before < seqs_after - seqs_before
        if flags[0] == "--replicas":
            text = server.client().get("/metrics").text
            assert 'logitserve_replica_batches_total{replica="1"}' in text  # both replicas served
    finally:
        server.stop()


@pytest.mark.slow
def test_switch_off_is_reported(start_server, checkpoint):
    server = start_server(checkpoint, "--batch-invariant", "off")
    try:
        assert server.info()["batch_invariant"] is False
    finally:
        server.stop()
