"""The pieces of the Gemma, Gemma 2, Gemma 3, Phi-3, OLMo 2 and SmolLM3 decoders against transformers' own modules
(float32 bit for bit unless a test says otherwise): norms, activation, embedding scale, soft-capped eager
attention, LongRoPE and partial rotary, per-layer-type rotary, NoPE layers, OLMo 2's whole-projection q/k norm
(also sharded across ranks), classifier pooling, and how each family's config.json fields are read."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    Olmo2Config,
    Phi3Config,
    SmolLM3Config,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma import modeling_gemma as gemma1
from transformers.models.gemma2 import modeling_gemma2 as gemma2
from transformers.models.gemma3 import modeling_gemma3 as gemma3
from transformers.models.olmo2 import modeling_olmo2 as olmo2
from transformers.models.phi3 import modeling_phi3 as phi3
from transformers.models.smollm3 import modeling_smollm3 as smollm3

import model.layers.modules as modules
from model.families import family_fields as ff
from model.families.config import ModelConfig, RopeConfig, UnsupportedModelError
from model.distributed import ParallelContext, launch_local
from model.layers.base import (
    ColumnParallelLinear,
    ACTIVATIONS,
    Part,
    ShardedRMSNorm,
    UpcastRMSNorm,
    embedding_scale,
)
from model.layers.modules import MLP, RaggedBatch, classifier_rows, eager_attention, ragged_attention, rotate
from model.layers.rope import (
    LongRope,
    LongRopeEmbedding,
    RotaryEmbedding,
    apply_partial_rotary,
    rope_configs_by_layer_type,
)
from model.families.weights import CheckpointReader
from tests.model.sharded_norm_ranks import olmo2_qk_norm_rank

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def batch_of(lengths: list[int]) -> RaggedBatch:
    return RaggedBatch.from_offsets(torch.tensor([0, *lengths]).cumsum(0), torch.device("cpu"))


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights too: the Gemma ones start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return module.eval()


def hf_masks(config, n: int, dtype=torch.float32) -> dict[str, torch.Tensor | None]:
    """The masks transformers' model forward makes for one sequence of n tokens, by layer type."""
    kwargs = dict(config=config, inputs_embeds=torch.empty(1, n, config.hidden_size, dtype=dtype), attention_mask=None,
                  cache=None, position_ids=torch.arange(n)[None])
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if getattr(config, "sliding_window", None) is not None:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def model_config(hf_config, **overrides) -> ModelConfig:
    """A ModelConfig for the rotary tables (RotaryEmbedding reads head_dim, rope and max positions)."""
    fields = dict(architecture="test", vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
                  intermediate_size=hf_config.intermediate_size, num_layers=1,
                  num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
                  head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
                  max_position_embeddings=hf_config.max_position_embeddings, sliding_windows=(None,),
                  rope=RopeConfig.from_hf(hf_config.to_dict()))
    return ModelConfig(**{**fields, **overrides})


def hf_attend(attn, x, config, position_embeddings, layer_type: str = "full_attention") -> torch.Tensor:
    """transformers' attention module on one sequence x [1, n, hidden], with its model's mask -> [n, hidden]."""
    out, _ = attn(x, position_embeddings=position_embeddings, attention_mask=hf_masks(config, x.shape[1])[layer_type])
    return out[0]


# --- norms, activation, embedding scale ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (3, 5, 48), (300, 100)])
@pytest.mark.parametrize("hf_norm", [gemma1.GemmaRMSNorm, gemma2.Gemma2RMSNorm, gemma3.Gemma3RMSNorm])
def test_gemma_norm_scales_by_one_plus_weight_with_transformers_bits(hf_norm, shape, dtype):
    ref = randomize(hf_norm(shape[-1], eps=1e-6)).to(dtype)
    ours = UpcastRMSNorm(shape[-1], eps=1e-6, weight_offset=1.0).to(dtype)
    ours.weight.data.copy_(ref.weight)
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    with torch.inference_mode():
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_olmo2_norm_scales_in_float32_then_casts(dtype):
    ref = randomize(olmo2.Olmo2RMSNorm(96, eps=1e-6)).to(dtype)
    x = (torch.randn(9, 3 * 96) * 3).to(dtype)[:, 96:192]  # a strided view, as the q rows of a fused qkv output
    single = ShardedRMSNorm(Part(96, 0, 96), 1e-6, ParallelContext.single()).to(dtype)
    upcast = UpcastRMSNorm(96, eps=1e-6).to(dtype)
    for ours in (single, upcast):
        ours.weight.data.copy_(ref.weight)
        with torch.inference_mode():
            assert torch.equal(ours(x), ref(x))


def test_olmo2_qk_norm_sharded_across_ranks_sums_squares_with_one_all_reduce():
    """OLMo 2 normalizes the whole q (all heads) before splitting heads: under tp each rank holds some heads, so the
    mean of squares needs an all-reduce. (4 q, 1 kv): the kv head lives on both ranks, counted once; (6 q, 3 kv):
    rank 1 holds kv heads 1-2, head 1 shared with rank 0."""
    g = torch.Generator().manual_seed(0)
    cases, refs = [], []
    for hq, hkv, d in ((4, 1, 16), (6, 3, 8)):
        x_q, x_k = torch.randn(11, hq * d, generator=g) * 2, torch.randn(11, hkv * d, generator=g) * 2
        ref_q, ref_k = randomize(olmo2.Olmo2RMSNorm(hq * d, 1e-6), 1), randomize(olmo2.Olmo2RMSNorm(hkv * d, 1e-6), 2)
        cases.append((hq, hkv, d, x_q, x_k, ref_q.weight.detach(), ref_k.weight.detach()))
        with torch.inference_mode():
            refs.append((ref_q(x_q), ref_k(x_k)))
    per_rank = launch_local(olmo2_qk_norm_rank, 2, cases)
    assert [r[1][2] for r in per_rank] == [0, 8]  # (6, 3): rank 1's first kv head is rank 0's last
    assert [r[0][2] for r in per_rank] == [0, 16]  # (4, 1): rank 1's only kv head is a replica
    worst = 0.0
    for rank_results in per_rank:
        for (q_rows, k_rows, _, q, k), (ref_q, ref_k) in zip(rank_results, refs):
            for got, ref in ((q, ref_q[:, q_rows]), (k, ref_k[:, k_rows])):
                worst = max(worst, (got - ref).abs().max().item())
                torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-6)  # partial sums: float32 rounding only
    print(f"sharded q/k norm: max |diff| from transformers {worst:.2e}")


@pytest.mark.parametrize("intermediate", [128, 100])
def test_gelu_tanh_gated_mlp_matches_gemma_mlp(intermediate):
    """Bit for bit when the intermediate width is a multiple of the CPU kernels' vector step (32 floats on AVX-512;
    every Gemma width is a multiple of 64). Otherwise the activation, run on the gate's strided view of the fused
    gate_up output, computes each row's tail with the scalar formula where transformers' contiguous gate is
    vectorized: a rounding difference, measured here."""
    config = Gemma2Config(**{**SMALL, "intermediate_size": intermediate}, head_dim=16, num_hidden_layers=1)
    ref = randomize(gemma2.Gemma2MLP(config))
    ours = MLP(64, intermediate, bias=False, act=ACTIVATIONS[ff.gated_activation(ff.GEMMA2, config.to_dict())])
    with torch.no_grad():
        ours.gate_up_proj.weight.copy_(torch.cat([ref.gate_proj.weight, ref.up_proj.weight]))
        ours.down_proj.weight.copy_(ref.down_proj.weight)
    x = torch.randn(1, 37, 64, generator=torch.Generator().manual_seed(3)) * 2
    with torch.inference_mode():
        got, expected = ours(x[0]), ref(x)[0]
    if intermediate % 64 == 0:
        assert torch.equal(got, expected)
    else:
        print(f"gated gelu MLP, width {intermediate}: max |diff| {(got - expected).abs().max().item():.2e}")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)


def test_unknown_activation_is_refused_naming_the_supported_ones():
    hf = {"architectures": ["Gemma2ForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 1, "hidden_activation": "relu"}
    with pytest.raises(UnsupportedModelError, match="unsupported hidden_act 'relu'; supported: silu, gelu_pytorch_tanh"):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_scale_rounds_as_transformers(dtype):
    hidden = 3072  # sqrt(3072) = 55.4256..., 55.5 in bfloat16
    ref = gemma1.GemmaTextScaledWordEmbedding(10, hidden, 0, embed_scale=hidden**0.5).to(dtype)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.inference_mode():
        ref.weight.normal_()
        assert torch.equal(F.embedding(ids, ref.weight) * embedding_scale(hidden, dtype), ref(ids))
    assert embedding_scale(hidden, torch.bfloat16) == 55.5


# --- attention ---


@pytest.mark.parametrize(
    "hkv,softcap,window,dtype",
    [(2, 50.0, None, torch.float32), (2, 50.0, 100, torch.float32), (4, None, 100, torch.float32),
     (2, 30.0, 1000, torch.bfloat16), (4, 50.0, 100, torch.bfloat16)],
)
def test_eager_attention_has_gemma2_eager_bits_per_sequence(hkv, softcap, window, dtype, monkeypatch):
    """One eager call per sequence of a ragged batch gives what transformers' eager_attention_forward gives that
    sequence alone, with the mask transformers builds (causal, or its sliding window)."""
    hq, d, lengths = 8, 32, [1, 7, 300, 130, 300]
    config = Gemma2Config(**{**SMALL, "num_attention_heads": hq, "num_key_value_heads": hkv}, head_dim=d,
                          num_hidden_layers=2, sliding_window=window, attn_logit_softcapping=softcap)
    config._attn_implementation = "eager"  # the masks Gemma2ForCausalLM builds: additive, for its eager attention
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(sum(lengths), h, d, generator=g) * 4).to(dtype) for h in (hq, hkv, hkv))
    batch = batch_of(lengths)
    scale = ff.attention_scale(ff.GEMMA2, config.to_dict())
    got = eager_attention(q, k, v, batch, scale, window, softcap)
    monkeypatch.setattr(modules, "EAGER_SCORES_BYTES", 300 * 300 * 4 * 3)  # 300 tokens: heads in calls of 3
    split = eager_attention(q, k, v, batch, scale, window, softcap)
    module = type("Attn", (), dict(num_key_value_groups=hq // hkv, training=False, head_dim=d))()
    for s, e in zip(batch.bounds[:-1], batch.bounds[1:]):
        mask = hf_masks(config, e - s, dtype)["sliding_attention" if window else "full_attention"]
        qs, ks, vs = (t[s:e].unsqueeze(0).transpose(1, 2) for t in (q, k, v))
        expected, _ = gemma2.eager_attention_forward(module, qs, ks, vs, mask, scaling=scale, softcap=softcap)
        assert torch.equal(got[s:e], expected[0]) and torch.equal(split[s:e], expected[0]), (e - s)


def hf_attention_inputs(config, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, config.hidden_size, generator=g) * 2


def fused_qkv(attn) -> torch.Tensor:
    if hasattr(attn, "qkv_proj"):
        return attn.qkv_proj.weight
    return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])


def our_attention(attn, x, batch, cos, sin, *, hq, hkv, d, scale, window, attention_fn=ragged_attention,
                  head_norms=None, projection_norms=None, rotary=rotate, use_rope=True):
    """The attention the registry entries compose from the new pieces: fused qkv, q/k norms (per head, or over the
    whole projection), rotary (full or partial), ragged attention, o_proj. x: [T, hidden] -> [T, hidden]."""
    t = x.shape[0]
    qkv = F.linear(x, fused_qkv(attn))
    if projection_norms is not None:  # OLMo 2: normalize all q (all k) features, then split heads
        q = projection_norms[0](qkv[:, : hq * d]).view(t, hq, d)
        k = projection_norms[1](qkv[:, hq * d : (hq + hkv) * d]).view(t, hkv, d)
    else:
        q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    if head_norms is not None:  # Gemma 3: per-head (1 + w) norms
        q, k = head_norms[0](q), head_norms[1](k)
    if use_rope:
        q, k = apply_partial_rotary(q, cos, sin, rotary), apply_partial_rotary(k, cos, sin, rotary)
    out = attention_fn(q, k, v, batch, scale, window)
    return F.linear(out.reshape(t, hq * d), attn.o_proj.weight)


def norm_copy(ref, offset: float) -> UpcastRMSNorm:
    norm = UpcastRMSNorm(ref.weight.shape[0], ref.eps, weight_offset=offset)
    norm.weight.data.copy_(ref.weight)
    return norm


def test_gemma2_decoder_layer_has_transformers_bits():
    """A whole Gemma 2 layer from the new pieces: (1 + w) norms before and after attention and MLP, soft-capped
    eager attention (query_pre_attn_scalar scale, sliding layer 0 and global layer 1), gelu-tanh MLP; each sequence
    as transformers computes it alone."""
    config = Gemma2Config(**SMALL, head_dim=16, num_hidden_layers=2, sliding_window=24, query_pre_attn_scalar=24)
    config._attn_implementation = "eager"  # what Gemma2ForCausalLM picks: transformers turns SDPA off for Gemma 2
    hf = config.to_dict()
    rope = RotaryEmbedding(model_config(config))
    hf_rope = gemma2.Gemma2RotaryEmbedding(config)
    cap, _ = ff.logit_softcaps(ff.GEMMA2, hf)
    attend = functools.partial(eager_attention, softcap=cap)
    scale, windows = ff.attention_scale(ff.GEMMA2, hf), ff.sliding_windows(ff.GEMMA2, hf)
    for layer_idx in (0, 1):
        layer = randomize(gemma2.Gemma2DecoderLayer(config, layer_idx), seed=layer_idx)
        norms = {name: norm_copy(getattr(layer, name), 1.0) for name in
                 ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")}
        mlp = MLP(64, 128, False, ACTIVATIONS[ff.gated_activation(ff.GEMMA2, hf)])
        with torch.no_grad():
            mlp.gate_up_proj.weight.copy_(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
            mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight)
        for n in (1, 37, 80):
            x = hf_attention_inputs(config, n, seed=n)
            batch = batch_of([n])
            cos, sin = rope(batch.positions(), batch.seq_lens, torch.float32)
            with torch.inference_mode():
                a = our_attention(layer.self_attn, norms["input_layernorm"](x[0]), batch, cos, sin, hq=4, hkv=2, d=16,
                                  scale=scale, window=windows[layer_idx], attention_fn=attend)
                h = x[0] + norms["post_attention_layernorm"](a)
                ours = h + norms["post_feedforward_layernorm"](mlp(norms["pre_feedforward_layernorm"](h)))
                mask = hf_masks(config, n)[config.layer_types[layer_idx]]
                expected = layer(x, position_embeddings=hf_rope(x, torch.arange(n)[None]), attention_mask=mask)
            assert torch.equal(ours, expected[0]), (layer_idx, n)


@pytest.mark.parametrize("legacy", [True, False])
def test_gemma3_attention_per_layer_type_rope_and_head_norms(legacy):
    """Gemma 3: (1 + w) q/k norms per head, the sliding layers' own RoPE base (rope_local_base_freq), linear scaling
    on the global layers only, query_pre_attn_scalar; SDPA as transformers picks for Gemma 3. The rope tables are
    transformers' bits, and so is the attention, within and past the window."""
    linear = {"rope_type": "linear", "factor": 8.0}
    if legacy:
        rope_keys = dict(rope_theta=500_000.0, rope_local_base_freq=20_000.0, rope_scaling=linear)
    else:
        rope_keys = dict(rope_parameters={"full_attention": {**linear, "rope_theta": 500_000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0}})
    config = Gemma3TextConfig(**SMALL, head_dim=16, num_hidden_layers=3, sliding_window=24, sliding_window_pattern=3,
                              query_pre_attn_scalar=20, **rope_keys)
    config._attn_implementation = "sdpa"
    hf = {**config.to_dict(), **rope_keys} if legacy else config.to_dict()
    if legacy:
        hf.pop("rope_parameters")
    by_type = rope_configs_by_layer_type(hf, ff.GEMMA3_DEFAULT_THETA)
    ropes = {layer_type: RotaryEmbedding(model_config(config, rope=rope)) for layer_type, rope in by_type.items()}
    hf_rope = gemma3.Gemma3RotaryEmbedding(config)
    types, windows = ff.layer_types(ff.GEMMA3, hf), ff.sliding_windows(ff.GEMMA3, hf)
    assert types == tuple(config.layer_types) == ("sliding_attention", "sliding_attention", "full_attention")
    for layer_idx in (0, 2):
        attn = randomize(gemma3.Gemma3Attention(config, layer_idx), seed=layer_idx)
        head_norms = (norm_copy(attn.q_norm, 1.0), norm_copy(attn.k_norm, 1.0))
        for n in (1, 30, 70):
            x = hf_attention_inputs(config, n, seed=n)
            batch = batch_of([n])
            cos, sin = ropes[types[layer_idx]](batch.positions(), batch.seq_lens, torch.float32)
            hf_cos, hf_sin = hf_rope(x, torch.arange(n)[None], types[layer_idx])
            assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
            with torch.inference_mode():
                ours = our_attention(attn, x[0], batch, cos, sin, hq=4, hkv=2, d=16, head_norms=head_norms,
                                     scale=ff.attention_scale(ff.GEMMA3, hf), window=windows[layer_idx])
                expected = hf_attend(attn, x, config, (hf_cos, hf_sin), types[layer_idx])
            assert torch.equal(ours, expected), (layer_idx, n)


def test_olmo2_attention_normalizes_the_whole_projection():
    config = Olmo2Config(**SMALL, num_hidden_layers=1, rms_norm_eps=1e-6)
    config._attn_implementation = "sdpa"
    attn = randomize(olmo2.Olmo2Attention(config, 0))
    rope, hf_rope = RotaryEmbedding(model_config(config)), olmo2.Olmo2RotaryEmbedding(config)
    norms = tuple(ShardedRMSNorm(Part(ref.weight.shape[0], 0, ref.weight.shape[0]), 1e-6, ParallelContext.single())
                  for ref in (attn.q_norm, attn.k_norm))
    for norm, ref in zip(norms, (attn.q_norm, attn.k_norm)):
        norm.weight.data.copy_(ref.weight)
    for n in (1, 45):
        x = hf_attention_inputs(config, n, seed=n)
        batch = batch_of([n])
        cos, sin = rope(batch.positions(), batch.seq_lens, torch.float32)
        with torch.inference_mode():
            ours = our_attention(attn, x[0], batch, cos, sin, hq=4, hkv=2, d=16, projection_norms=norms,
                                 scale=ff.attention_scale(ff.OLMO2, config.to_dict()), window=None)
            expected = hf_attend(attn, x, config, hf_rope(x, torch.arange(n)[None]))
        assert torch.equal(ours, expected)


def phi3_config(**kw) -> Phi3Config:
    short = [1.0 + 0.1 * i for i in range(6)]
    long = [1.5 + 0.7 * i for i in range(6)]
    return Phi3Config(**{**SMALL, "pad_token_id": 3}, num_hidden_layers=1, partial_rotary_factor=0.75,
                      max_position_embeddings=256, original_max_position_embeddings=32,
                      rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long}, **kw)


def test_longrope_tables_pick_factors_per_sequence_as_transformers_does_for_each_alone():
    config = phi3_config()
    rope = LongRope.from_hf(config.to_dict(), head_dim=16)
    assert rope.rotary_dim == 12 and rope.original_max_position_embeddings == 32
    assert rope.attention_factor == pytest.approx((1 + math.log(256 / 32) / math.log(32)) ** 0.5)
    tables = LongRopeEmbedding(rope)
    hf_rope = phi3.Phi3RotaryEmbedding(config)
    lengths = [5, 32, 33, 100, 1]  # 33 and 100: longer than original_max_position_embeddings
    batch = batch_of(lengths)
    cos, sin = tables(batch.positions(), batch.seq_lens, torch.float32)
    x = torch.empty(1, 1, 64)
    for s, e in zip(batch.bounds[:-1], batch.bounds[1:]):
        hf_cos, hf_sin = hf_rope(x, torch.arange(e - s)[None])  # transformers on this sequence alone
        assert torch.equal(cos[s:e], hf_cos[0]) and torch.equal(sin[s:e], hf_sin[0]), e - s
    # transformers on the padded batch: the longest sequence switches every sequence to the long factors
    padded_cos, _ = hf_rope(x, torch.arange(100)[None].expand(2, -1))
    assert not torch.equal(cos[:5], padded_cos[0, :5])


@pytest.mark.parametrize("n", [20, 50])  # short and long factors
def test_phi3_attention_fused_qkv_partial_rotary_longrope(n):
    config = phi3_config()
    config._attn_implementation = "sdpa"
    attn = randomize(phi3.Phi3Attention(config, 0))
    tables, hf_rope = LongRopeEmbedding(LongRope.from_hf(config.to_dict(), head_dim=16)), phi3.Phi3RotaryEmbedding(config)
    x = hf_attention_inputs(config, n, seed=n)
    batch = batch_of([n])
    cos, sin = tables(batch.positions(), batch.seq_lens, torch.float32)
    with torch.inference_mode():
        ours = our_attention(attn, x[0], batch, cos, sin, hq=4, hkv=2, d=16,
                             scale=ff.attention_scale(ff.PHI3, config.to_dict()), window=None)
        expected = hf_attend(attn, x, config, hf_rope(x, torch.arange(n)[None]))
    assert torch.equal(ours, expected)


def test_partial_rotary_leaves_the_pass_through_dims():
    x = torch.randn(5, 3, 16)
    cos, sin = torch.randn(5, 12), torch.randn(5, 12)
    out = apply_partial_rotary(x, cos, sin)
    assert torch.equal(out[..., 12:], x[..., 12:])
    q_embed, _ = phi3.apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(out, q_embed[0].transpose(0, 1)) and torch.equal(apply_partial_rotary(x, cos, sin, rotate), out)


def test_phi3_fused_checkpoint_tensors_load_per_rank(tmp_path):
    """Phi-3 checkpoints store qkv_proj and gate_up_proj fused; ColumnParallelLinear reads each rank's q, k, v (gate,
    up) rows from the fused tensor's layout."""
    config = phi3_config()
    from transformers import Phi3ForCausalLM

    Phi3ForCausalLM(config).save_pretrained(tmp_path)
    d, q, kv, inter = 16, 64, 32, 128
    with CheckpointReader(str(tmp_path)) as reader:
        fused_qkv_w = reader.read("model.layers.0.self_attn.qkv_proj.weight")
        fused_gu_w = reader.read("model.layers.0.mlp.gate_up_proj.weight")
        for rank in range(2):  # tp=2: two q heads and one kv head each
            parts = [Part(q, rank * 2 * d, 2 * d), Part(kv, rank * d, d), Part(kv, rank * d, d)]
            layer = ColumnParallelLinear(64, parts, bias=False)
            layer.load(reader, "model.layers.0.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"))
            rows = [fused_qkv_w[rank * 2 * d : (rank + 1) * 2 * d], fused_qkv_w[q + rank * d : q + (rank + 1) * d],
                    fused_qkv_w[q + kv + rank * d : q + kv + (rank + 1) * d]]
            assert torch.equal(layer.weight, torch.cat(rows))
            half = inter // 2
            gate_up_parts = [Part(inter, rank * half, half)] * 2
            mlp = ColumnParallelLinear(64, gate_up_parts, bias=False)
            mlp.load(reader, "model.layers.0.mlp.gate_up_proj", ("gate_proj", "up_proj"))
            gate, up = fused_gu_w[:inter], fused_gu_w[inter:]
            gate_up = torch.cat([gate[rank * half : (rank + 1) * half], up[rank * half : (rank + 1) * half]])
            assert torch.equal(mlp.weight, gate_up)


def test_smollm3_nope_layer_skips_rotary():
    config = SmolLM3Config(**SMALL, num_hidden_layers=4)
    config._attn_implementation = "sdpa"
    hf = config.to_dict()
    assert ff.rope_layers(ff.SMOLLM3, hf) == (True, True, True, False)
    rope, hf_rope = RotaryEmbedding(model_config(config)), smollm3.SmolLM3RotaryEmbedding(config)
    for layer_idx in (2, 3):
        attn = randomize(smollm3.SmolLM3Attention(config, layer_idx), seed=layer_idx)
        n = 40
        x = hf_attention_inputs(config, n, seed=n)
        batch = batch_of([n])
        cos, sin = rope(batch.positions(), batch.seq_lens, torch.float32)
        with torch.inference_mode():
            ours = our_attention(attn, x[0], batch, cos, sin, hq=4, hkv=2, d=16, scale=ff.attention_scale(ff.SMOLLM3, hf),
                                 window=None, use_rope=ff.rope_layers(ff.SMOLLM3, hf)[layer_idx])
            expected = hf_attend(attn, x, config, hf_rope(x, torch.arange(n)[None]))
        assert torch.equal(ours, expected), layer_idx


# --- classifier pooling ---


def test_classifier_rows_pool_as_transformers_sequence_classification():
    """GenericForSequenceClassification on each sequence alone: the last token that is not padding (the first
    token when all are), or the last token when the config has no pad_token_id."""
    from transformers import Gemma2ForSequenceClassification

    config = Gemma2Config(**SMALL, head_dim=16, num_hidden_layers=1, num_labels=3)
    model = randomize(Gemma2ForSequenceClassification(config))
    seqs = [[5, 6, 7], [5, 0, 7, 0, 0], [0, 0], [9], [0, 8, 0]]
    tokens = torch.tensor([t for s in seqs for t in s])
    batch = batch_of([len(s) for s in seqs])
    rows = classifier_rows(tokens, batch, config.pad_token_id)
    assert rows.tolist() == [2, 3 + 2, 8 + 0, 10, 11 + 1]
    for pad in (config.pad_token_id, None):
        model.config.pad_token_id = pad
        rows = classifier_rows(tokens, batch, pad)
        for seq, (s, row) in zip(seqs, zip(batch.bounds, rows.tolist())):
            ids = torch.tensor([seq])
            with torch.inference_mode():
                expected = model(ids).logits[0]
                scored = model.score(model.model(ids).last_hidden_state)[0, row - s]
            assert torch.equal(scored, expected)


# --- config fields, read as transformers reads them ---

# Real checkpoints' config.json (the fields that matter), plus legacy and default-reliant variants.
GEMMA2_9B = dict(architectures=["Gemma2ForCausalLM"], attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 head_dim=256, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", hidden_size=3584,
                 intermediate_size=14336, max_position_embeddings=8192, num_attention_heads=16, num_hidden_layers=42,
                 num_key_value_heads=8, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                 sliding_window=4096, vocab_size=256000)
GEMMA3_1B = dict(architectures=["Gemma3ForCausalLM"], head_dim=256, hidden_activation="gelu_pytorch_tanh", hidden_size=1152,
                 intermediate_size=6912, max_position_embeddings=32768, num_attention_heads=4, num_hidden_layers=26,
                 num_key_value_heads=1, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_local_base_freq=10000,
                 rope_scaling=None, rope_theta=1000000, sliding_window=512, sliding_window_pattern=6, vocab_size=262144,
                 attn_logit_softcapping=None, final_logit_softcapping=None)
PHI4_MINI = dict(architectures=["Phi3ForCausalLM"], hidden_act="silu", hidden_size=3072, intermediate_size=8192,
                 max_position_embeddings=131072, num_attention_heads=24, num_hidden_layers=32, num_key_value_heads=8,
                 original_max_position_embeddings=4096, partial_rotary_factor=0.75, rms_norm_eps=1e-5,
                 rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
                 rope_theta=10000.0, sliding_window=262144, tie_word_embeddings=True, vocab_size=200064)
OLMO2_7B = dict(architectures=["Olmo2ForCausalLM"], hidden_act="silu", hidden_size=4096, intermediate_size=11008,
                max_position_embeddings=4096, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32,
                rms_norm_eps=1e-6, rope_theta=500000, vocab_size=100352)
SMOLLM3_3B = dict(architectures=["SmolLM3ForCausalLM"], hidden_act="silu", hidden_size=2048, intermediate_size=11008,
                  max_position_embeddings=65536, num_attention_heads=16, num_hidden_layers=36, num_key_value_heads=4,
                  no_rope_layer_interval=4, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(36)], rms_norm_eps=1e-6,
                  rope_theta=5000000.0, use_sliding_window=False, sliding_window=None, vocab_size=128256)
GEMMA_7B = dict(architectures=["GemmaForCausalLM"], hidden_act="gelu", head_dim=256, hidden_size=3072,
                intermediate_size=24576, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=28,
                vocab_size=256000)
GEMMA2_DEFAULTED = ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "query_pre_attn_scalar")
PHI3_MINI_4K = {**PHI4_MINI, "max_position_embeddings": 4096, "sliding_window": 2047, "rope_scaling": None,
                "partial_rotary_factor": 1.0, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064}

FIELD_CASES = {
    "gemma-7b": (GemmaConfig, gemma1, GEMMA_7B),
    "gemma2-9b": (Gemma2Config, gemma2, GEMMA2_9B),
    "gemma2-defaults": (Gemma2Config, gemma2, {k: v for k, v in GEMMA2_9B.items() if k not in GEMMA2_DEFAULTED}),
    "gemma3-1b": (Gemma3TextConfig, gemma3, GEMMA3_1B),
    "gemma3-layer-types": (Gemma3TextConfig, gemma3, {**GEMMA3_1B, "num_hidden_layers": 4, "sliding_window_pattern": 6,
                                                       "layer_types": ["full_attention", "sliding_attention"] * 2}),
    "phi4-mini": (Phi3Config, phi3, PHI4_MINI),
    "phi3-mini-4k": (Phi3Config, phi3, PHI3_MINI_4K),
    "olmo2-7b": (Olmo2Config, olmo2, OLMO2_7B),
    "smollm3-3b": (SmolLM3Config, smollm3, SMOLLM3_3B),
    "smollm3-sliding": (SmolLM3Config, smollm3, {**SMOLLM3_3B, "no_rope_layers": None, "num_hidden_layers": 8,
                                                  "use_sliding_window": True, "sliding_window": 128}),
}


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_fields_read_as_transformers_reads_them(case):
    """Built on the meta device (no memory): each layer's attention scale, window, rotary use, head_dim, activation,
    soft-caps and the embedding scale, as transformers' modules hold them."""
    config_cls, modeling, raw = FIELD_CASES[case]
    arch = raw["architectures"][0]
    config = config_cls(**{k: v for k, v in raw.items() if k != "architectures"})
    with torch.device("meta"):
        hf_model = getattr(modeling, arch)(config)
    layers = hf_model.model.layers
    attns = [layer.self_attn for layer in layers]
    assert ff.attention_scale(arch, raw) == attns[0].scaling
    assert ff.head_dim(arch, raw) == attns[0].head_dim
    assert ff.sliding_windows(arch, raw) == tuple(
        getattr(a, "sliding_window", None) if arch != ff.PHI3 else config.sliding_window for a in attns)
    assert ff.layer_types(arch, raw) == tuple(getattr(config, "layer_types", None) or ff.layer_types(arch, raw))
    if arch == ff.SMOLLM3:
        assert ff.rope_layers(arch, raw) == tuple(bool(a.use_rope) for a in attns)
    x = torch.linspace(-6, 6, 101)
    mlp = layers[0].mlp
    act = getattr(mlp, "act_fn", None) or mlp.activation_fn
    assert torch.equal(ACTIVATIONS[ff.gated_activation(arch, raw)](x), act(x))
    attn_cap, final_cap = ff.logit_softcaps(arch, raw)
    assert attn_cap == getattr(attns[0], "attn_logit_softcapping", None)
    assert final_cap == getattr(config, "final_logit_softcapping", None)
    assert ff.embedding_multiplied(arch) == hasattr(hf_model.model.embed_tokens, "embed_scale")
    norm = layers[0].post_attention_layernorm
    assert ff.norm_weight_offset(arch) == (1.0 if "Gemma" in type(norm).__name__ else 0.0)


def test_smollm3_default_rope_theta_is_its_class_default():
    assert SmolLM3Config(**SMALL, num_hidden_layers=1).rope_parameters["rope_theta"] == ff.DEFAULT_ROPE_THETA[ff.SMOLLM3]


def test_phi4_mini_longrope_reads_its_config():
    rope = LongRope.from_hf(PHI4_MINI, head_dim=ff.head_dim(ff.PHI3, PHI4_MINI))
    assert rope.rotary_dim == 96 and rope.original_max_position_embeddings == 4096
    # factor = 131072 / 4096 = 32: sqrt(1 + ln 32 / ln 4096)
    assert rope.attention_factor == pytest.approx(1.1902380714238083)
    config = Phi3Config(**{k: v for k, v in PHI4_MINI.items() if k != "architectures"})
    hf_rope = phi3.Phi3RotaryEmbedding(config)
    assert rope.attention_factor == hf_rope.attention_scaling
    assert torch.equal(rope.inv_freq(long=False), hf_rope.inv_freq)


def test_multimodal_gemma3_is_refused_naming_the_text_class():
    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM"):
        ff.refuse_multimodal("Gemma3ForConditionalGeneration")
    ff.refuse_multimodal("Gemma3ForCausalLM")
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        ff.check_causal(ff.GEMMA3, {"use_bidirectional_attention": True})
