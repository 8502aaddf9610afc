"""The output kinds table (model/runtime/outputs.py) is the declaration of every output: the dataclasses that carry
outputs between layers, the score reducer's fields and the runner's slicing agree with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.runtime.outputs import (
    OUTPUT_KINDS,
    OUTPUT_REQUEST_FIELDS,
    SCORE_KINDS,
    VOCABULARY_FIELDS,
    OutputSpec,
    ReturnHiddenStates,
    SequenceOutput,
)
from model.runtime.scores import RowScores, ScoreAsk
from model.task import Task

SPEC_FIELDS = {f.name for f in dataclasses.fields(OutputSpec)}


def test_every_kind_is_a_sequence_output_field_and_asked_for_by_a_spec_field():
    output_fields = {f.name for f in dataclasses.fields(SequenceOutput)}
    for kind in OUTPUT_KINDS:
        assert kind.name in output_fields, kind.name
        assert kind.request is None or kind.request in SPEC_FIELDS, kind.name
        assert all(name in SPEC_FIELDS or name in ("columns", "hidden") for name in kind.per_row), kind.name
    assert {k.name for k in OUTPUT_KINDS} | {"layers"} == output_fields  # nothing undeclared travels


def test_the_score_reducer_computes_exactly_the_vocabulary_kinds():
    assert list(RowScores.kinds()) == [k.name for k in SCORE_KINDS]
    # a score's width per row comes from the spec alone (the runner cuts [R, widest] rows to it)
    assert all(name in SPEC_FIELDS for k in SCORE_KINDS for name in k.per_row)
    # the reducer's boolean asks are set from the request fields of the same name
    assert set(ScoreAsk.flags()) <= set(VOCABULARY_FIELDS)


def test_the_one_refusal_list_is_the_table_s():
    assert VOCABULARY_FIELDS == ("target_logprobs", "top_k", "vocab_ids", "target_ranks", "entropy")
    assert set(VOCABULARY_FIELDS) < set(OUTPUT_REQUEST_FIELDS)
    everything = OutputSpec(target_logprobs=True, top_k=2, vocab_ids=(1,), target_ranks=True, entropy=True)
    assert everything.unsupported_fields(Task.CLASSIFICATION) == VOCABULARY_FIELDS
    assert everything.unsupported_fields(Task.CAUSAL_LM) == ()
    assert OutputSpec().unsupported_fields(Task.CLASSIFICATION) == ()  # logits: a classifier's labels' scores
    assert OutputSpec(logits=False, top_k=3).vocabulary_fields == ("top_k",)


@pytest.mark.parametrize("spec, asked", [
    (OutputSpec(), {"positions", "logits"}),
    (OutputSpec(logits=False, top_k=2, entropy=True), {"positions", "top_k_ids", "top_k_logprobs", "entropy"}),
    (OutputSpec(logits=False, vocab_ids=(4, 4, 1), return_hidden_states=ReturnHiddenStates.LAST),
     {"positions", "vocab_logprobs", "hidden_states", "hidden_positions"}),
])
def test_asked_by_follows_the_request_field(spec, asked):
    assert {k.name for k in OUTPUT_KINDS if k.asked_by(spec)} == asked


def test_needs_vocab_is_logits_or_a_vocabulary_field():
    assert not OutputSpec(logits=False).needs_vocab
    assert not OutputSpec(logits=False, return_hidden_states="all").needs_vocab
    for name, value in (("logits", True), ("target_logprobs", True), ("top_k", 1), ("vocab_ids", (0,)),
                        ("target_ranks", True), ("entropy", True)):
        assert OutputSpec(**{"logits": False, name: value}).needs_vocab, name


def test_the_task_enum_reads_and_writes_its_names():
    assert Task("causal-lm") is Task.CAUSAL_LM and Task("classification") is Task.CLASSIFICATION
    assert Task.CAUSAL_LM == "causal-lm" and Task.CAUSAL_LM.has_vocabulary and not Task.CLASSIFICATION.has_vocabulary
    import orjson

    assert orjson.dumps({"task": Task.CLASSIFICATION}) == b'{"task":"classification"}'


def test_runner_slices_each_score_kind_to_its_sequence_s_width(llama_runner):
    """Sequences asking for different widths in one batch: each gets its own columns, as alone."""
    runner = llama_runner
    ids = torch.tensor([1, 5, 9, 12, 3, 7, 7, 2])
    offsets = torch.tensor([0, 3, 8])
    specs = [OutputSpec(return_logits="all", logits=False, top_k=3, vocab_ids=(5, 6)),
             OutputSpec(return_logits="all", logits=False, top_k=1, vocab_ids=(1, 2, 3, 4), entropy=True)]
    together = runner.run(ids, offsets, specs)
    for b, spec in enumerate(specs):
        alone = runner.run(ids[offsets[b] : offsets[b + 1]], torch.tensor([0, offsets[b + 1] - offsets[b]]), [spec])[0]
        for kind in OUTPUT_KINDS:
            mine, theirs = getattr(together[b], kind.name), getattr(alone, kind.name)
            assert (mine is None) == (theirs is None) == (not kind.asked_by(spec)), kind.name
            if mine is not None:
                assert torch.equal(mine, theirs), kind.name
    assert together[0].top_k_ids.shape == (3, 3) and together[1].vocab_logprobs.shape == (5, 4)
    assert together[0].entropy is None


@pytest.fixture(scope="module")
def llama_runner(checkpoint_factory):
    from model.runtime.runner import ModelRunner

    return ModelRunner.load(checkpoint_factory("llama"), dtype="float32")
