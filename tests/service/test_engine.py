"""Results owned end to end: `Engine.score` hands out a handle (`Scored`) that is closed exactly once, by the route
that took it or by the streamed response it handed it to; every route releases its results through it, before
the garbage collector could (the test keeps each handle and its views alive); the mapping's finalizer, the
safety net, logs when it has to release a handle nobody closed."""

from __future__ import annotations

import asyncio
import gc
import logging
import mmap

import pytest

from service.budget import ResultBudget
from service.engine import Scored
from service.metrics import Metrics
from service.workers.wire import release_when_collected
from tests.service.in_process import served

SAFETENSORS = "application/x-safetensors"
LONG = [[(7 * i + j) % 250 + 3 for j in range(250)] for i in range(5)]  # 1250 tokens: 1.5 MB of full logits

CAUSAL_ROUTES = {
    "logits json": ("/v1/logits", {"input_ids": [[1, 2, 3, 4], [5, 6]], "return_logits": "all", "top_k": 2}, None),
    "logits json, streamed": ("/v1/logits", {"input_ids": LONG, "return_logits": "all"}, None),
    "logits safetensors, streamed": ("/v1/logits", {"input_ids": LONG, "return_logits": "all"}, SAFETENSORS),
    "hidden_states": ("/v1/hidden_states", {"input_ids": [[1, 2, 3]], "return_hidden_states": "all"}, None),
    "completions": ("/v1/completions", {"prompt": "hello world", "max_tokens": 1, "logprobs": 2, "echo": True}, None),
    "completions, streamed": ("/v1/completions", {"prompt": LONG * 4, "logprobs": 1, "echo": True}, None),  # 5000
    "embeddings": ("/v1/embeddings", {"input": ["hello", "world"]}, None),
    "score": ("/v1/score", {"query": "a b", "items": ["c", "d e"], "label_token_ids": [5, 6]}, None),
}
CLASSIFIER_ROUTES = {
    "classify": ("/v1/classify", {"input": ["hello", "world"]}, None),
    "rerank": ("/v1/rerank", {"query": "q", "documents": ["a b", "c"]}, None),
}


def _check_released(path: str, body: dict, accept: str | None, checkpoint, runner, streamed: bool) -> None:
    async def main():
        async with served(checkpoint, runner) as (app, client, handles):
            headers = {"accept": accept} if accept else {}
            r = await client.post(path, json=body, headers=headers)
            assert r.status_code == 200, r.text
            assert len(handles) == 1
            assert handles[0]._handed_over == streamed  # a streamed body owns its results: it closed them
            # Still referenced here, with the views of its results: only its close can have released them.
            assert handles[0].closed and handles[0].reservation.released
            assert app.state.engine.budget.used == 0 and app.state.metrics.result_bytes._value.get() == 0

    asyncio.run(main())


@pytest.mark.parametrize("route", CAUSAL_ROUTES)
def test_every_route_closes_its_results_handle(route, tiny_checkpoint, reference_runner):
    _check_released(*CAUSAL_ROUTES[route], tiny_checkpoint, reference_runner, streamed="streamed" in route)


@pytest.fixture(scope="module")
def classifier(checkpoint_factory):
    from model.runtime.runner import ModelRunner

    path = checkpoint_factory("llama-classifier")  # one label: it classifies and reranks
    return path, ModelRunner.load(path, device="cpu", dtype="float32")


@pytest.mark.parametrize("route", CLASSIFIER_ROUTES)
def test_every_label_route_closes_its_results_handle(route, classifier):
    _check_released(*CLASSIFIER_ROUTES[route], *classifier, streamed=False)


def _budgeted(nbytes: int = 100):
    released = []
    budget = ResultBudget(1000, Metrics().result_bytes, on_release=lambda: released.append(budget.used))
    return budget, released, Scored(None, None, 0.0, 0.0, budget.reserve(nbytes))


def test_a_handle_closed_twice_releases_once():
    budget, released, handle = _budgeted()
    assert handle.close() is True and handle.close() is False
    with handle:
        pass
    assert released == [0] and budget.used == 0 and handle.closed


def test_a_with_block_closes_unless_the_handle_was_handed_over():
    budget, released, handle = _budgeted()
    with handle:
        handle.hand_over()  # a streamed response owns it now
    assert not handle.closed and budget.used == 100
    handle.close()  # the response, once its body is sent
    assert released == [0]
    budget, released, handle = _budgeted()
    with pytest.raises(RuntimeError), handle:
        handle.hand_over()
        raise RuntimeError("the response is never sent")
    assert handle.closed and released == [0]


def test_the_budget_calls_back_when_bytes_come_back():
    calls = []
    budget = ResultBudget(100, Metrics().result_bytes, on_release=lambda: calls.append(budget.used))
    a, b = budget.reserve(30), budget.reserve(50)
    assert calls == [] and budget.free == 20
    b.release()
    b.release()
    a.release()
    assert calls == [30, 0]


def test_a_leaked_handle_is_released_by_the_finalizer_and_logged(caplog):
    budget = ResultBudget(1000, Metrics().result_bytes)
    closed, leaked = budget.reserve(64), budget.reserve(64)
    buffers = [mmap.mmap(-1, 64), mmap.mmap(-1, 64)]
    release_when_collected(buffers[0], closed)
    release_when_collected(buffers[1], leaked)
    closed.release()  # its handle was closed: the finalizer has nothing to do
    with caplog.at_level(logging.WARNING, logger="logitserve.workers"):
        del buffers
        gc.collect()
    assert budget.used == 0
    warnings = [r for r in caplog.records if "not by their handle" in r.getMessage()]
    assert len(warnings) == 1
