"""The registry: every entry has a tiny checkpoint recipe, names map to the checkpoint's, and a model is built
for its rank's heads (nothing set after construction)."""

import json

import pytest
import torch

from model.families.architectures import ARCHITECTURES, WeightNames
from model.families.config import ModelConfig
from model.distributed import ParallelContext
from model.families.blocks import HEADS, MLPS
from model.families.loader import build_model
from model.layers.rope import RotaryEmbedding
from model.families.tp import HeadLayout, shard_model
from tests.checkpoints import RECIPES


def test_every_registered_architecture_has_a_checkpoint_recipe_and_known_kinds():
    assert {r.architecture for r in RECIPES.values()} == set(ARCHITECTURES)
    for arch in ARCHITECTURES.values():
        assert arch.mlp in MLPS and arch.head in HEADS


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_writes_its_architecture(name, checkpoint_factory):
    config = json.loads((checkpoint_factory(name) / "config.json").read_text())
    assert config["architectures"] == [RECIPES[name].architecture]
    assert ModelConfig.from_hf_config(config).architecture == RECIPES[name].architecture


def test_weight_names_follow_the_checkpoint():
    llama = WeightNames()
    assert llama.checkpoint_name("embed_tokens") == "model.embed_tokens"
    assert llama.checkpoint_name("layers.2.self_attn.qkv_proj") == "model.layers.2.self_attn.qkv_proj"
    assert llama.checkpoint_name("lm_head") == "lm_head"
    assert llama.parts("layers.2.self_attn.qkv_proj") == ("q_proj", "k_proj", "v_proj")
    assert llama.parts("layers.2.mlp.gate_up_proj") == ("gate_proj", "up_proj")
    assert llama.parts("layers.2.mlp.down_proj") == ()
    # A family that spells a module its own way, with another head (a classifier's `score`).
    other = WeightNames(head="score", renames={"mlp": "block_sparse_moe"})
    assert other.checkpoint_name("layers.0.mlp.down_proj") == "model.layers.0.block_sparse_moe.down_proj"
    assert other.checkpoint_name("lm_head") == "score"


CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 30, "hidden_size": 96, "intermediate_size": 40,
          "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3}


@pytest.mark.parametrize("rank", [0, 1])
def test_attention_is_built_for_its_ranks_heads(rank):
    """6 query heads over 3 kv heads at tp=2: the attention knows its heads from construction; sharding only
    swaps its linears for this rank's rows."""
    config = ModelConfig.from_hf_config(CONFIG)
    parallel = ParallelContext(rank=rank, world_size=2)
    heads = HeadLayout(config, rank, 2)
    rope = RotaryEmbedding(config)  # real tables: built outside the meta context
    with torch.device("meta"):
        model = build_model(config, parallel, rope=rope, rotary_pairs=True)
        attn = model.layers[1].self_attn
        built = (attn.num_heads, attn.num_kv_heads, attn.kv_head_index.tolist(), attn.rotary_pairs)
        assert built == (3, 2, heads.kv_head_index.tolist(), True) and model.rotary_pairs
        shard_model(model, config, ARCHITECTURES["LlamaForCausalLM"].tp_plan)
    attn = model.layers[1].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.kv_head_index.tolist(), attn.rotary_pairs) == built
    assert attn.qkv_proj.weight.shape == ((3 + 2 * 2) * config.head_dim, config.hidden_size)
    assert attn.o_proj.weight.shape == (config.hidden_size, 3 * config.head_dim)
    assert model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 20, config.hidden_size)
    assert model.lm_head.weight.shape == (15, config.hidden_size)
