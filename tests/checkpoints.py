"""Tiny random checkpoints made with transformers, one per supported architecture, for tests and benches."""

from __future__ import annotations

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


ARCH_CONFIGS = {
    "llama": dict(cls="LlamaConfig", extra=dict(rope_theta=10000.0)),
    "llama3": dict(
        cls="LlamaConfig",
        extra=dict(
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64),
        ),
    ),
    "mistral": dict(cls="MistralConfig", extra=dict(sliding_window=16)),
    "qwen2": dict(cls="Qwen2Config", extra=dict()),
    "qwen3": dict(cls="Qwen3Config", extra=dict(head_dim=24)),
    "granite": dict(
        cls="GraniteConfig",
        extra=dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0),
    ),
}


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
    """Write a random checkpoint (config.json, model.safetensors, tokenizer.json) and return its folder."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer() if with_tokenizer else None
    if vocab_size is None:
        vocab_size = tokenizer.get_vocab_size() if tokenizer else 300
    spec = ARCH_CONFIGS[arch]
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
    kwargs.update(spec["extra"])
    kwargs.update(extra)
    config = getattr(transformers, spec["cls"])(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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


def load_reference(path: Path, dtype: torch.dtype = torch.float32, attention: str = "eager"):
    """The transformers model for a checkpoint folder in eval mode; eager attention unless told (its default is
    "sdpa", the one to compare bits with)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    return model.eval()
