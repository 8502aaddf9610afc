"""The config.json fields of the Gemma, Gemma 2, Gemma 3 (text), Phi-3, OLMo 2 and SmolLM3 decoders, read as
transformers 5 reads them (its config classes' defaults and legacy keys included), for the architecture registry.

Each function takes the architecture (``architectures[0]``) and the config.json dict and returns one trait of the
decoder; tests/model/test_family_ops.py holds each against the attributes of transformers' own modules. The values
a config omits fall back to transformers' class defaults, which differ by family (a Gemma 2 without
`final_logit_softcapping` caps at 30, a Gemma 3 without `rope_theta` uses 1e6).
"""

from __future__ import annotations

from typing import Any

from model.errors import UnsupportedModelError

GEMMA = "GemmaForCausalLM"
GEMMA2 = "Gemma2ForCausalLM"
GEMMA3 = "Gemma3ForCausalLM"
PHI3 = "Phi3ForCausalLM"
OLMO2 = "Olmo2ForCausalLM"
SMOLLM3 = "SmolLM3ForCausalLM"
FAMILY_ARCHITECTURES = (GEMMA, GEMMA2, GEMMA3, PHI3, OLMO2, SMOLLM3)

# Multimodal classes whose text decoder is one of the above: refused, naming the text class to load instead.
TEXT_CLASS_OF_MULTIMODAL = {
    "Gemma3ForConditionalGeneration": GEMMA3,
    "Gemma3ForSequenceClassification": "Gemma3TextForSequenceClassification",
}

# Layer types as transformers names them in `layer_types`.
FULL, SLIDING = "full_attention", "sliding_attention"

# Gemma 3's theta per layer type when the config names none (Gemma3TextConfig.default_theta).
GEMMA3_DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
# transformers' default rope_theta per family where it is not 10000.
DEFAULT_ROPE_THETA = {SMOLLM3: 2_000_000.0}


def refuse_multimodal(arch: str | None) -> None:
    """Raise for a multimodal checkpoint whose text decoder this server could run from its own checkpoint."""
    if arch in TEXT_CLASS_OF_MULTIMODAL:
        text = TEXT_CLASS_OF_MULTIMODAL[arch]
        raise UnsupportedModelError(
            f"{arch} is a multimodal (image + text) model; this server runs text decoders: load a {text} checkpoint "
            f"(architectures: [\"{text}\"], e.g. google/gemma-3-1b-pt or -it)"
        )


def check_causal(arch: str, hf: dict[str, Any]) -> None:
    """Gemma 3's `use_bidirectional_attention` (EmbeddingGemma) turns the decoder into an encoder: refused."""
    if arch == GEMMA3 and hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            "use_bidirectional_attention (an embedding model) is not supported: causal decoders only"
        )


def head_dim(arch: str, hf: dict[str, Any]) -> int:
    """The Gemma configs default head_dim to 256; the others take hidden_size / num_attention_heads."""
    if arch in (GEMMA, GEMMA2, GEMMA3):
        return int(hf.get("head_dim") or 256)
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def gated_activation(arch: str, hf: dict[str, Any]) -> str:
    """The MLP gate's activation name. Gemma reads `hidden_act` and takes its legacy "gelu" for the tanh
    approximation (GemmaConfig.__post_init__); Gemma 2 and 3 read `hidden_activation` (their configs also carry a
    `hidden_act` that transformers ignores); the rest read `hidden_act`."""
    if arch == GEMMA:
        act = hf.get("hidden_act") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if act == "gelu" else act
    if arch in (GEMMA2, GEMMA3):
        return hf.get("hidden_activation") or "gelu_pytorch_tanh"
    return hf.get("hidden_act") or "silu"


def attention_scale(arch: str, hf: dict[str, Any]) -> float:
    """Gemma 2 and 3 scale scores by query_pre_attn_scalar ** -0.5 (default 256), not head_dim ** -0.5."""
    if arch in (GEMMA2, GEMMA3):
        return hf.get("query_pre_attn_scalar", 256) ** -0.5
    return head_dim(arch, hf) ** -0.5


def logit_softcaps(arch: str, hf: dict[str, Any]) -> tuple[float | None, float | None]:
    """(attention-score cap, final-logit cap); Gemma 2's class defaults are 50 and 30, Gemma 3's None."""
    if arch == GEMMA2:
        return hf.get("attn_logit_softcapping", 50.0), hf.get("final_logit_softcapping", 30.0)
    if arch == GEMMA3:
        return hf.get("attn_logit_softcapping"), hf.get("final_logit_softcapping")
    return None, None


def rope_layers(arch: str, hf: dict[str, Any]) -> tuple[bool, ...]:
    """Per layer: whether it applies rotary. SmolLM3's `no_rope_layers` holds 1 for a RoPE layer and 0 for a NoPE
    one; without it every `no_rope_layer_interval`-th layer (default 4: layers 3, 7, ...) is NoPE."""
    n = hf["num_hidden_layers"]
    if arch != SMOLLM3:
        return (True,) * n
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    return tuple(bool(f) for f in flags[:n])


def layer_types(arch: str, hf: dict[str, Any]) -> tuple[str, ...]:
    """Per layer: "full_attention" or "sliding_attention", with each family's default pattern when the config has
    no `layer_types`: Gemma 2 alternates from a sliding layer 0; Gemma 3 makes every `sliding_window_pattern`-th
    layer (default 6) full; SmolLM3 slides its NoPE layers when `use_sliding_window`; Phi-3 has no layer types and
    slides every layer when `sliding_window` is set."""
    n = hf["num_hidden_layers"]
    if arch == PHI3:
        return (SLIDING if hf.get("sliding_window") is not None else FULL,) * n
    if hf.get("layer_types"):
        return tuple(hf["layer_types"][:n])
    if arch == GEMMA2:
        return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))
    if arch == GEMMA3:
        pattern = hf.get("sliding_window_pattern", 6)
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
    if arch == SMOLLM3:
        slide = bool(hf.get("use_sliding_window")) and hf.get("sliding_window") is not None
        return tuple(SLIDING if slide and not rope else FULL for rope in rope_layers(arch, hf))
    return (FULL,) * n


def sliding_windows(arch: str, hf: dict[str, Any]) -> tuple[int | None, ...]:
    """Per layer: the window in tokens (a token sees itself and window - 1 earlier ones) or None. Gemma 2 and 3
    default `sliding_window` to 4096. The mask transformers builds follows `layer_types` alone (SmolLM3's
    `use_sliding_window` only decides the default pattern and the flash path's window)."""
    window = hf.get("sliding_window", 4096 if arch in (GEMMA2, GEMMA3) else None)
    return tuple(window if t == SLIDING and window is not None else None for t in layer_types(arch, hf))


def embedding_multiplied(arch: str) -> bool:
    """The Gemma families multiply embeddings by sqrt(hidden_size) (see layers.embedding_scale for its rounding)."""
    return arch in (GEMMA, GEMMA2, GEMMA3)


def norm_weight_offset(arch: str) -> float:
    """1.0 where norms scale by (1 + weight) (every norm of the Gemma families, q/k norms included), else 0."""
    return 1.0 if arch in (GEMMA, GEMMA2, GEMMA3) else 0.0
