"""use_subgraphs: one torch.compile'd block per layer group, reused for each layer of the group, equals eager."""

import torch

from model import ModelRunner, OutputSpec, ReturnLogits
from tests.model.helpers import ragged


def test_regional_compile_equals_eager(checkpoint_factory):
    path = checkpoint_factory("qwen3", with_tokenizer=False)
    eager = ModelRunner.load(path)
    groups = [[0, 1], [2]]
    compiled = ModelRunner.load(path, use_subgraphs=True, subgraph_layer_groups=groups)
    spec = [OutputSpec(return_logits=ReturnLogits.ALL)] * 3
    for seed, lengths in enumerate([[3, 17, 8], [30, 1, 12]]):  # a second shape reuses the dynamic graphs
        _, ids, offsets = ragged(lengths, eager.config.vocab_size, seed=seed)
        for a, b in zip(eager.run(ids, offsets, spec), compiled.run(ids, offsets, spec)):
            torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    # one compiled function per group, shared by that group's layers
    assert sorted(compiled.model._compiled_groups) == [0, 1]
    assert compiled.model.layers[0].self_attn.attention_fn is compiled.model.layers[1].self_attn.attention_fn
