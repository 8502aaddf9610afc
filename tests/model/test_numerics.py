"""Numerics decided once (model/runtime/numerics.py): what resolve_numerics makes of the requests, and a model whose
modules are built with what it decided (each attention with its kernel, each MoE block with the switch)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import ModelConfig, ModelRunner, OutputSpec, ReturnLogits
from model.layers import modules
from model.layers.attention_kernels import AttentionKind
from model.layers.attention_stable import prefix_stable_attention
from model.layers.moe import SparseMoeBlock
from model.runtime import prefix_sharing
from model.runtime.numerics import DEFAULT_PREFIX_CACHE_BYTES, resolve_numerics
from service.packing import pack_ids

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def configs(checkpoint_factory) -> dict[str, ModelConfig]:
    return {arch: ModelConfig.from_pretrained(checkpoint_factory(arch, with_tokenizer=False))
            for arch in ("llama", "gemma2", "phi3")}


def test_defaults_on_the_cpu(configs):
    n = resolve_numerics(configs["llama"], CPU)
    assert (n.dtype, n.batch_invariant, n.attention, n.prefix_sharing, n.prefix_cache_bytes, n.reason) == (
        "float32", True, AttentionKind.PREFIX_STABLE, True, DEFAULT_PREFIX_CACHE_BYTES, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.prefix_sharing = False


@pytest.mark.parametrize("arch, why", [("gemma2", "soft-capped eager attention"), ("phi3", "longrope")])
def test_a_family_that_cannot_share_says_why(configs, arch, why):
    n = resolve_numerics(configs[arch], CPU, prefix_cache_bytes=4096)
    assert not n.prefix_sharing and n.prefix_cache_bytes == 0 and why in n.reason
    assert n.attention == (AttentionKind.EAGER if arch == "gemma2" else AttentionKind.SDPA)
    with pytest.raises(ValueError, match="prefix sharing is supported"):
        resolve_numerics(configs[arch], CPU, prefix_sharing=True)


def test_cuda_keeps_transformers_attention_and_refuses_invariance(configs):
    n = resolve_numerics(configs["llama"], CUDA)
    assert (n.batch_invariant, n.attention, n.prefix_sharing, n.prefix_cache_bytes) == (
        False, AttentionKind.SDPA, False, 0)
    assert "CPU only" in n.reason
    with pytest.raises(ValueError, match="CPU only"):
        resolve_numerics(configs["llama"], CUDA, batch_invariant=True)


def test_switches_off(configs):
    """Sharing off: transformers' attention, unless the server's promise keeps the bits under invariance; the cache
    extends sharing across batches, so a size asked for with sharing (or invariance) off is refused, saying why."""
    llama = configs["llama"]
    off = resolve_numerics(llama, CPU, prefix_sharing=False)
    assert (off.attention, off.prefix_sharing, off.prefix_cache_bytes, off.reason) == (AttentionKind.SDPA, False, 0, None)
    kept = resolve_numerics(llama, CPU, prefix_sharing=False, switches_keep_bits=True)
    assert (kept.attention, kept.prefix_sharing, kept.prefix_cache_bytes) == (AttentionKind.PREFIX_STABLE, False, 0)
    variant = resolve_numerics(llama, CPU, prefix_sharing=False, batch_invariant=False, switches_keep_bits=True)
    assert variant.attention == AttentionKind.SDPA
    cache_only = resolve_numerics(llama, CPU, prefix_sharing=False, prefix_cache_bytes=4096)
    assert (cache_only.attention, cache_only.prefix_cache_bytes) == (AttentionKind.SDPA, 0)
    assert "prefix cache needs prefix sharing and batch invariance" in cache_only.reason
    variant_cache = resolve_numerics(llama, CPU, batch_invariant=False, prefix_cache_bytes=4096)
    assert (variant_cache.prefix_sharing, variant_cache.prefix_cache_bytes) == (True, 0) and variant_cache.reason
    assert resolve_numerics(llama, CPU, prefix_cache_bytes=0).prefix_cache_bytes == 0


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_moe_blocks_are_built_with_the_switch(checkpoint_factory, batch_invariant):
    """With batch invariance off the MoE block takes the unpadded path (transformers' bits, its docstring); on, its
    router and experts pad every matmul to whole groups of 4 rows."""
    path = checkpoint_factory("qwen3_moe", with_tokenizer=False, vocab_size=300)
    runner = ModelRunner.load(path, dtype="float32", batch_invariant=batch_invariant)
    blocks = [m for m in runner.model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks
    want = 4 if batch_invariant else 1
    assert all(b.gate.row_multiple == want and b.experts.row_multiple == want for b in blocks)


@pytest.mark.parametrize("sharing, kernel", [(None, prefix_stable_attention), (False, modules.ragged_attention)])
def test_each_attention_is_built_with_its_kernel(checkpoint_factory, monkeypatch, sharing, kernel):
    """The kernel an attention runs is the one it was constructed with: nothing swaps it after construction."""
    built = []
    init = modules.Attention.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append((self, kwargs.get("kernel")))

    monkeypatch.setattr(modules.Attention, "__init__", recording_init)
    runner = ModelRunner.load(checkpoint_factory("llama", with_tokenizer=False), prefix_sharing=sharing)
    layers = [layer.self_attn for layer in runner.model.layers]
    assert [a for a, _ in built] == layers
    assert all(k is kernel and a.attention_fn is kernel for a, k in built)
    assert not hasattr(prefix_sharing, "enable_prefix_sharing") and not hasattr(prefix_sharing, "use_prefix_stable_attention")


def test_runner_numerics_cannot_be_set_and_sharing_needs_the_stable_attention(checkpoint_factory):
    path = checkpoint_factory("llama", with_tokenizer=False)
    runner = ModelRunner.load(path)
    with pytest.raises(AttributeError):
        runner.prefix_sharing = False
    unshared = runner.with_numerics(dataclasses.replace(runner.numerics, prefix_sharing=False))
    assert unshared.model is runner.model and not unshared.prefix_sharing and runner.prefix_sharing
    spec = [OutputSpec(return_logits=ReturnLogits.ALL)] * 3
    ids, offsets = (torch.from_numpy(a) for a in pack_ids([list(range(1, 9)), list(range(1, 12)), [3, 4]]))
    shared = runner.run(ids, offsets, spec)
    assert runner.prefix_shared_tokens == 8 and unshared.prefix_shared_tokens == 0
    for a, b in zip(shared, unshared.run(ids, offsets, spec)):
        assert torch.equal(a.logits, b.logits)
    with pytest.raises(ValueError, match="a runner may change only"):
        runner.with_numerics(dataclasses.replace(runner.numerics, batch_invariant=False))
