"""Tiny random checkpoints made with transformers, keyed like model/families/architectures.py, for tests and benches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Language models score text by predicting the next token. "
    "Logits are unnormalized log-probabilities; a softmax turns them into a distribution over the vocabulary. "
    "Tensor parallelism splits each weight matrix across devices and joins the partial results with all-reduce. "
) * 4


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in-process, with <s> and </s> and a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


@dataclass(frozen=True)
class Recipe:
    """A tiny checkpoint of one registered architecture (model.families.architectures.ARCHITECTURES): its config.json is
    transformers' config class of that architecture, with the shared tiny shape and these values."""

    architecture: str
    config: dict = field(default_factory=dict)


# Every registered architecture has at least one recipe (tests/model/test_architectures.py); a second recipe of
# an architecture covers a variant every model test should see (llama3: a scaled rope).
RECIPES: dict[str, Recipe] = {
    "llama": Recipe("LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3": Recipe(
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64),
        ),
    ),
    "mistral": Recipe("MistralForCausalLM", dict(sliding_window=16)),
    "qwen2": Recipe("Qwen2ForCausalLM"),
    "qwen3": Recipe("Qwen3ForCausalLM", dict(head_dim=24)),
    "granite": Recipe(
        "GraniteForCausalLM",
        dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0),
    ),
    # Mixture of experts. Expert intermediate sizes are multiples of 4 (torch's grouped matmul on CPU wants 16-byte
    # strides) but not of 16 (the vectorised silu leaves a scalar tail), and their tp=2 / tp=4 shares are not
    # multiples of 4 (the per-expert matmul loop instead).
    "mixtral": Recipe(
        "MixtralForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=44, sliding_window=16),
    ),
    # Layer 1 is dense (mlp_only_layers): the dense MLP of intermediate_size between MoE layers.
    "qwen3_moe": Recipe(
        "Qwen3MoeForCausalLM",
        dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=36, intermediate_size=88,
             norm_topk_prob=True, mlp_only_layers=[1], head_dim=24),
    ),
    # Only layer 1 sparse (decoder_sparse_step 2), unnormalised top-k, and the window transformers puts on every
    # layer when use_sliding_window is set.
    "qwen3_moe_window": Recipe(
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=36, decoder_sparse_step=2,
             use_sliding_window=True, sliding_window=16, max_window_layers=2, head_dim=24),
    ),
    # The families of docs/families.md, each with its quirks switched on at the tiny shape: windows shorter than
    # the test sequences, soft-caps that bite, query_pre_attn_scalar != head_dim, per-type rope, partial LongRoPE
    # whose long factors switch on past 32 tokens, NoPE layers.
    "gemma": Recipe("GemmaForCausalLM", dict(head_dim=16, hidden_act="gelu", pad_token_id=0, tie_word_embeddings=True)),
    "gemma2": Recipe(
        "Gemma2ForCausalLM",
        dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=4.0, final_logit_softcapping=5.0,
             sliding_window=8, pad_token_id=0),
    ),
    "gemma3": Recipe(
        "Gemma3ForCausalLM",
        dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, pad_token_id=0, tie_word_embeddings=True,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    ),
    "phi3": Recipe(
        "Phi3ForCausalLM",
        dict(partial_rotary_factor=0.75, original_max_position_embeddings=32, sliding_window=24, pad_token_id=0,
             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                              "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}),
    ),
    "olmo2": Recipe("Olmo2ForCausalLM", dict(pad_token_id=0)),
    "smollm3": Recipe("SmolLM3ForCausalLM", dict(no_rope_layers=[1, 0, 1], pad_token_id=0, tie_word_embeddings=True)),
}

# A sequence classifier of every family that has one: the causal recipe's decoder with a `score` head. pad 5 (a
# token the tests place inside and at the end of sequences, so that the pooled row is not always the last).
# Llama's has one label: a reward model.
CLASSIFIER_PAD = 5
for _name, _causal in {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                       "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
                       "gemma": "GemmaForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
                       "gemma3": "Gemma3TextForSequenceClassification", "phi3": "Phi3ForSequenceClassification",
                       "olmo2": "Olmo2ForSequenceClassification",
                       "smollm3": "SmolLM3ForSequenceClassification"}.items():
    RECIPES[f"{_name}-classifier"] = Recipe(
        _causal, {**RECIPES[_name].config, "pad_token_id": CLASSIFIER_PAD, "num_labels": 1 if _name == "llama" else 3}
    )


# A family's base model as embedding checkpoints publish it (e5-mistral, Linq-Embed-Mistral, EmbeddingGemma name the
# `*Model` class): the decoder's keys without `model.`, no lm_head. Served as the causal LM for hidden states and
# embeddings; their parity is tests/service/test_sentence_transformers.py's (against transformers' last_hidden_state).
HEADLESS = {"llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model",
            "gemma": "GemmaModel", "gemma2": "Gemma2Model", "gemma3": "Gemma3TextModel"}
for _name, _base in HEADLESS.items():
    RECIPES[f"{_name}-headless"] = Recipe(_base, dict(RECIPES[_name].config))


def make_checkpoint(
    path: Path,
    arch: str = "llama",
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 112,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    with_tokenizer: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **extra,
) -> Path:
    """Write a random checkpoint of recipe `arch` (config.json, model.safetensors, tokenizer.json); its folder."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer() if with_tokenizer else None
    if vocab_size is None:
        vocab_size = tokenizer.get_vocab_size() if tokenizer else 300
    recipe = RECIPES[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    kwargs.update(recipe.config)
    kwargs.update(extra)
    model_class = getattr(transformers, recipe.architecture)
    config = model_class.config_class(**kwargs)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    # Random init with std 0.02 leaves logits nearly flat; widen it so that tests see real differences.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
    return path


def load_reference(path: Path, dtype: torch.dtype = torch.float32, attention: str | None = "eager"):
    """The transformers model of a checkpoint folder (its architectures[0] class: a causal LM or a classifier) in
    eval mode; eager attention unless told (None: the class's default, "sdpa" for most, eager for Gemma 2)."""
    import json

    import transformers

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    kwargs = {} if attention is None else {"attn_implementation": attention}
    return getattr(transformers, arch).from_pretrained(path, dtype=dtype, **kwargs).eval()
