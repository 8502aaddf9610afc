import json

import pytest

from model.families.config import ModelConfig, RopeConfig, UnsupportedModelError

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
}


def test_transformers4_and_transformers5_rope_keys_agree():
    v4 = ModelConfig.from_hf_config(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    )
    v5 = ModelConfig.from_hf_config(
        {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    )
    assert v4.rope == v5.rope
    assert v4.rope.rope_type == "llama3" and v4.rope.theta == 500000.0


def test_default_rope_without_scaling():
    cfg = ModelConfig.from_hf_config({**BASE, "rope_theta": 1234.0})
    assert cfg.rope == RopeConfig(rope_type="default", theta=1234.0)
    cfg5 = ModelConfig.from_hf_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert cfg5.rope == cfg.rope


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"architectures": []}, "unsupported architecture None"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "unsupported rope type 'longrope'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ],
)
def test_refusals_name_what_is_supported(change, message):
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_hf_config({**BASE, **change})
    assert message in str(err.value)
    if "architecture" in message:
        assert "LlamaForCausalLM" in str(err.value) and "GraniteForCausalLM" in str(err.value)
    if "rope type" in message:
        assert "yarn" in str(err.value) and "dynamic" in str(err.value)


def test_derived_fields_are_computed_not_stored():
    cfg = ModelConfig.from_hf_config({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 24})
    assert cfg.head_dim == 24 and cfg.q_size == 96 and cfg.kv_size == 48 and cfg.qk_norm
    assert cfg.attention_scale == pytest.approx(24**-0.5)
    granite = ModelConfig.from_hf_config({**BASE, "architectures": ["GraniteForCausalLM"], "attention_multiplier": 0.5,
                                          "logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.2})
    assert granite.attention_scale == 0.5 and granite.logits_scaling == 8.0
    assert granite.embedding_multiplier == 12.0 and granite.residual_multiplier == 0.2


def test_sliding_windows_per_architecture():
    assert ModelConfig.from_hf_config({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 16}).sliding_windows == (16, 16)
    assert ModelConfig.from_hf_config({**BASE, "sliding_window": 16}).sliding_windows == (None, None)
    qwen = ModelConfig.from_hf_config({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 8,
                                       "layer_types": ["full_attention", "sliding_attention"]})
    assert qwen.sliding_windows == (None, 8) and qwen.qkv_bias and not qwen.o_bias


def test_resolve_layers():
    cfg = ModelConfig.from_hf_config(BASE)  # 2 blocks -> hidden-state layers 0..2
    assert cfg.resolve_layers([-1, 0, 1, -3]) == (2, 0, 1, 0)
    with pytest.raises(IndexError):
        cfg.resolve_layers([3])
    with pytest.raises(IndexError):
        cfg.resolve_layers([-4])


def test_from_pretrained_needs_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert ModelConfig.from_pretrained(tmp_path).vocab_size == 100
