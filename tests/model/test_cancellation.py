"""`ModelRunner.run(..., should_stop)`: asked before each block; True stops the forward there with `Cancelled`,
False changes no output bit."""

from __future__ import annotations

import pytest
import torch

from model.errors import Cancelled
from model.runtime.outputs import OutputSpec
from model.runtime.runner import ModelRunner


@pytest.fixture(scope="module")
def runner(checkpoint_factory):
    return ModelRunner.load(checkpoint_factory("llama", num_layers=4, with_tokenizer=False), dtype="float32")


def _batch():
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7], dtype=torch.int64)
    return ids, torch.tensor([0, 3, 7], dtype=torch.int64), [OutputSpec(return_logits="all")] * 2


def test_should_stop_is_asked_before_each_block_and_stops_there(runner):
    asked = []

    def stop_at_third() -> bool:
        asked.append(1)
        return len(asked) == 3

    with pytest.raises(Cancelled, match="before block 2 of 4"):
        runner.run(*_batch(), should_stop=stop_at_third)
    assert len(asked) == 3 and runner.model.should_stop is None  # the hook is the run's only


def test_never_stopping_changes_no_bit(runner):
    plain = runner.run(*_batch())
    asked = []
    checked = runner.run(*_batch(), should_stop=lambda: asked.append(1) or False)
    assert len(asked) == 4
    for a, b in zip(plain, checked):
        assert torch.equal(a.logits, b.logits)
