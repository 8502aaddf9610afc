"""The registry: one entry per supported ``architectures[0]``, holding what that family changes.

An entry says which config.json keys the family reads beyond the shared ones (``read``, into the
``ArchitectureFields`` of its ``ModelConfig``), how its checkpoint names our modules' tensors (``weights``), how
tensor parallelism shards them (``tp_plan``), and which kind of MLP and head it is built with (model/families/loader.py
builds each kind). Everything an entry does not name is shared: model/families/config.py reads the common fields,
model/families/loader.py assembles and loads any entry's model. A new family is one entry here plus what is genuinely new
(a field, a module kind, a TP style), and a tiny checkpoint recipe in tests/checkpoints.py (a test requires one
for every entry).

This module is plain data and config.json reading: everything else imports it, it imports nothing of the model but
model/families/family_fields.py (how transformers reads each family's config.json).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from model.families import family_fields as ff
from model.families.moe_config import MoeConfig
from model.task import Task

HFConfig = Mapping[str, Any]  # a parsed config.json

# Where a block puts its norms: "pre" (Llama: before attention and before the MLP), "sandwich" (Gemma 2 and 3:
# before and after each), "post" (OLMo 2: after each, none before). model/families/loader.py builds them by NORM_SLOTS.
NORM_PLACEMENTS = ("pre", "sandwich", "post")
# The rope table a layer rotates q and k with: "global", "local" (Gemma 3's sliding layers) or None (no rotary).
GLOBAL_ROPE, LOCAL_ROPE = "global", "local"


@dataclass(frozen=True)
class ArchitectureFields:
    """The ModelConfig fields an entry's ``read`` sets; the defaults are Llama's."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # an RMSNorm on every q and k head before the rotary embedding
    # One entry per layer: the sliding window in tokens, or None for full causal attention.
    sliding_windows: tuple[int | None, ...] = ()
    # Granite's multipliers; 1.0 (None: 1/sqrt(head_dim)) elsewhere.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # The gate's activation in the gated MLP, a key of layers.ACTIVATIONS.
    hidden_act: str = "silu"
    # Where the q/k norm applies: "head" (each head, Qwen3 and Gemma 3) or "projection" (the whole q / k projection
    # before the heads are split, OLMo 2; layers.ShardedRMSNorm under tensor parallelism).
    qk_norm_scope: str = "head"
    # head_dim when config.json names none (Gemma: 256); None: hidden_size / num_attention_heads.
    default_head_dim: int | None = None
    norm_placement: str = "pre"  # one of NORM_PLACEMENTS
    # Norms that scale in float32 and cast last (layers.UpcastRMSNorm: Gemma, OLMo 2), by (offset + w): Gemma's 1.
    norm_upcast: bool = False
    norm_weight_offset: float = 0.0
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size) in the model's dtype
    # The attention function: "sdpa" (modules.ragged_attention) or "eager" (modules.eager_attention, transformers'
    # eager path, soft-cap included: Gemma 2).
    attention: str = "sdpa"
    attention_softcap: float | None = None  # scores = tanh(scores / cap) * cap
    final_logit_softcapping: float | None = None
    # Per layer: GLOBAL_ROPE, LOCAL_ROPE or None (a NoPE layer, SmolLM3); () means every layer global.
    layer_rope: tuple[str | None, ...] = ()
    # Rope tables the family reads its own way, by name (GLOBAL_ROPE, LOCAL_ROPE): transformers-5 style rope
    # parameters (rope_type, rope_theta, ...). A table not named here reads the shared keys (config.RopeConfig).
    rope_parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default_rope_theta: float = 10000.0  # rope_theta when config.json names none (SmolLM3: 2e6)
    # Rotary in float32 whatever the model's dtype, cast back after (OLMo 2 keeps its cos/sin in float32).
    rotary_in_float32: bool = False
    # Mixture-of-experts families: the experts, and which layers are sparse (None: every layer's MLP is dense).
    moe: MoeConfig | None = None


# ------------------------------------------------------------------------------------ what a family reads


def read_llama(hf: HFConfig) -> ArchitectureFields:
    """Llama's keys, which the other families here read too: `attention_bias` (q, k, v and o), `mlp_bias`."""
    bias = bool(hf.get("attention_bias", False))
    return ArchitectureFields(
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_windows=(None,) * hf["num_hidden_layers"],
        hidden_act=hf.get("hidden_act", "silu"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
    )


def read_mistral(hf: HFConfig) -> ArchitectureFields:
    """`sliding_window` on every layer."""
    window = hf.get("sliding_window") or None
    return replace(read_llama(hf), sliding_windows=(window,) * hf["num_hidden_layers"])


def _qwen_sliding_windows(hf: HFConfig) -> tuple[int | None, ...]:
    """The layers `layer_types` marks as sliding, or (older configs) those from `max_window_layers` on."""
    window, num_layers = hf.get("sliding_window"), hf["num_hidden_layers"]
    if layer_types := hf.get("layer_types"):
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if hf.get("use_sliding_window") and window:
        first = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def read_qwen2(hf: HFConfig) -> ArchitectureFields:
    """q, k and v always carry a bias, o never."""
    return replace(read_llama(hf), qkv_bias=True, o_bias=False, sliding_windows=_qwen_sliding_windows(hf))


def read_qwen3(hf: HFConfig) -> ArchitectureFields:
    return replace(read_llama(hf), qk_norm=True, sliding_windows=_qwen_sliding_windows(hf))


def read_granite(hf: HFConfig) -> ArchitectureFields:
    """Multipliers on the embeddings, the residual branches and the attention scores; logits divided by a scale."""
    return replace(
        read_llama(hf),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        attention_multiplier=float(hf["attention_multiplier"]) if "attention_multiplier" in hf else None,
        logits_scaling=float(hf.get("logits_scaling", 1.0) or 1.0),
    )


def read_gemma(hf: HFConfig) -> ArchitectureFields:
    """(1 + w) norms in float32, embeddings times sqrt(hidden), gelu-tanh ("gelu" read as it), head_dim 256."""
    return replace(
        read_llama(hf),
        hidden_act=ff.gated_activation(ff.GEMMA, hf),
        default_head_dim=ff.head_dim(ff.GEMMA, hf),
        norm_upcast=True,
        norm_weight_offset=ff.norm_weight_offset(ff.GEMMA),
        scale_embeddings=ff.embedding_multiplied(ff.GEMMA),
    )


def read_gemma2(hf: HFConfig) -> ArchitectureFields:
    """Gemma plus sandwich norms, query_pre_attn_scalar, soft-caps (eager attention, as transformers runs it) and
    alternating sliding / global layers."""
    attention_cap, final_cap = ff.logit_softcaps(ff.GEMMA2, hf)
    return replace(
        read_gemma(hf),
        hidden_act=ff.gated_activation(ff.GEMMA2, hf),
        norm_placement="sandwich",
        attention="eager",
        attention_softcap=attention_cap,
        final_logit_softcapping=final_cap,
        attention_multiplier=ff.attention_scale(ff.GEMMA2, hf),
        sliding_windows=ff.sliding_windows(ff.GEMMA2, hf),
    )


def gemma3_rope_parameters(hf: HFConfig, default_theta: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Rope parameters per layer type ("full_attention", "sliding_attention") as Gemma3TextConfig reads them:
    transformers-5 `rope_parameters` nested by layer type, or transformers-4 keys, where `rope_theta` and
    `rope_scaling` are the full layers' and `rope_local_base_freq` the sliding layers' theta. `default_theta` gives
    each type's theta when the config names none."""
    params = hf.get("rope_parameters")
    nested = isinstance(params, dict) and bool(params) and all(isinstance(v, dict) or v is None for v in params.values())
    by_type = {k: dict(v or {}) for k, v in params.items()} if nested else {}
    full = by_type.setdefault(ff.FULL, {"rope_type": "default"})
    if hf.get("rope_scaling"):
        full.update(hf["rope_scaling"])
    full.setdefault("rope_theta", hf.get("rope_theta", default_theta[ff.FULL]))
    sliding = by_type.setdefault(ff.SLIDING, {"rope_type": "default"})
    sliding.setdefault("rope_theta", hf.get("rope_local_base_freq", default_theta[ff.SLIDING]))
    return by_type


def read_gemma3(hf: HFConfig) -> ArchitectureFields:
    """Gemma 2's block plus per-head (1 + w) q/k norms and a rope table per layer type (the sliding layers' own
    base); SDPA attention unless the config sets an attention soft-cap. Bidirectional (embedding) configs refused."""
    ff.check_causal(ff.GEMMA3, hf)
    attention_cap, final_cap = ff.logit_softcaps(ff.GEMMA3, hf)
    by_type = gemma3_rope_parameters(hf, ff.GEMMA3_DEFAULT_THETA)
    return replace(
        read_gemma2(hf),
        hidden_act=ff.gated_activation(ff.GEMMA3, hf),
        qk_norm=True,
        attention="eager" if attention_cap else "sdpa",
        attention_softcap=attention_cap,
        final_logit_softcapping=final_cap,
        attention_multiplier=ff.attention_scale(ff.GEMMA3, hf),
        sliding_windows=ff.sliding_windows(ff.GEMMA3, hf),
        layer_rope=tuple(LOCAL_ROPE if t == ff.SLIDING else GLOBAL_ROPE for t in ff.layer_types(ff.GEMMA3, hf)),
        rope_parameters={GLOBAL_ROPE: by_type[ff.FULL], LOCAL_ROPE: by_type[ff.SLIDING]},
    )


def phi3_rope_parameters(hf: HFConfig) -> dict[str, Any] | None:
    """Phi-3's LongRoPE parameters with Phi3Config's rules, or None for another rope type: the legacy "su" and
    "yarn" are longrope; the top-level `original_max_position_embeddings` (default 4096) wins over the rope dict's;
    `factor`, when absent, is max_position_embeddings / original; `attention_factor`, when absent,
    sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1); `partial_rotary_factor` from either place."""
    params = {**(hf.get("rope_scaling") or hf.get("rope_parameters") or {})}
    if params.get("rope_type", params.get("type")) not in ("longrope", "su", "yarn"):
        return None
    original = int(hf.get("original_max_position_embeddings", 4096))
    factor = params.get("factor")
    if factor is None:
        factor = hf.get("max_position_embeddings", 4096) / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "rope_type": "longrope",
        "rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "short_factor": tuple(params["short_factor"]),
        "long_factor": tuple(params["long_factor"]),
        "original_max_position_embeddings": original,
        "factor": float(factor),
        "attention_factor": float(attention_factor),
        "partial_rotary_factor": float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
    }


def read_phi3(hf: HFConfig) -> ArchitectureFields:
    """Fused qkv_proj / gate_up_proj checkpoints (read by the fused layers' layout), LongRoPE with short and long
    factors picked per sequence, partial rotary, every layer sliding when `sliding_window` is set."""
    longrope = phi3_rope_parameters(hf)
    return replace(
        read_llama(hf),
        sliding_windows=ff.sliding_windows(ff.PHI3, hf),
        rope_parameters={GLOBAL_ROPE: longrope} if longrope else {},
    )


def read_olmo2(hf: HFConfig) -> ArchitectureFields:
    """Norms after attention and after the MLP (none before), q/k norms over the whole projections, rotary in
    float32."""
    return replace(
        read_llama(hf),
        qk_norm=True,
        qk_norm_scope="projection",
        norm_placement="post",
        norm_upcast=True,
        rotary_in_float32=True,
    )


def read_smollm3(hf: HFConfig) -> ArchitectureFields:
    """Llama with NoPE layers (`no_rope_layers`: 0 skips rotary) that slide when `use_sliding_window`."""
    return replace(
        read_llama(hf),
        sliding_windows=ff.sliding_windows(ff.SMOLLM3, hf),
        layer_rope=tuple(GLOBAL_ROPE if rope else None for rope in ff.rope_layers(ff.SMOLLM3, hf)),
        default_rope_theta=ff.DEFAULT_ROPE_THETA[ff.SMOLLM3],
    )


def _moe_config(hf: HFConfig) -> MoeConfig:
    return MoeConfig.from_hf_config(dict(hf))


def read_mixtral(hf: HFConfig) -> ArchitectureFields:
    """Mistral's attention (`sliding_window` on every layer) and the experts."""
    return replace(read_mistral(hf), moe=_moe_config(hf))


def read_qwen3_moe(hf: HFConfig) -> ArchitectureFields:
    """Qwen3's attention (q/k norm) and the experts. Its sliding window, unlike Qwen2/Qwen3's, is on every layer
    when `use_sliding_window` is set (transformers' Qwen3MoeConfig ignores `max_window_layers` and `layer_types`)."""
    window = (hf.get("sliding_window") or None) if hf.get("use_sliding_window") else None
    return replace(
        read_llama(hf), qk_norm=True, sliding_windows=(window,) * hf["num_hidden_layers"], moe=_moe_config(hf)
    )


# ---------------------------------------------------------------------------- checkpoint names, TP plan


# Our fused modules and the separate checkpoint tensors they join.
FUSED_PARTS: Mapping[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclass(frozen=True)
class WeightNames:
    """Where our modules' tensors lie in the checkpoint.

    Module ``layers.3.self_attn.o_proj`` reads ``{prefix}layers.3.self_attn.o_proj.weight``, with each path
    component found in ``renames`` spelled the checkpoint's way; our ``lm_head`` reads ``{head}.weight``. A fused
    module (a key of ``fused``) reads its parts where the checkpoint keeps them apart, else its own fused tensor."""

    prefix: str = "model."
    head: str = "lm_head"
    renames: Mapping[str, str] = field(default_factory=dict)
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: FUSED_PARTS)

    def checkpoint_name(self, module_path: str) -> str:
        if module_path == "lm_head":
            return self.head
        return self.prefix + ".".join(self.renames.get(part, part) for part in module_path.split("."))

    def parts(self, module_path: str) -> tuple[str, ...]:
        """The separate checkpoint tensors of the fused module at `module_path` (() for other modules)."""
        return self.fused.get(module_path.rpartition(".")[2], ())


# Module path pattern -> sharding style (model/families/tp.py implements the styles); unnamed modules are replicated.
# An MoE family's sparse layers (loader.MLPS["moe"]) are built at shard size and match no pattern here; its dense
# layers (mlp_only_layers) are sharded as any dense MLP.
DECODER_TP_PLAN: Mapping[str, str] = {
    "embed_tokens": "vocab_embedding",
    "layers.*.self_attn.qkv_proj": "colwise_qkv",
    "layers.*.self_attn.o_proj": "rowwise_heads",
    "layers.*.mlp.gate_up_proj": "colwise_gate_up",
    "layers.*.mlp.down_proj": "rowwise_intermediate",
    "lm_head": "vocab_lm_head",
}


# ------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Architecture:
    """What one architecture changes; the defaults are Llama's."""

    read: Callable[[HFConfig], ArchitectureFields] = read_llama
    weights: WeightNames = field(default_factory=WeightNames)
    tp_plan: Mapping[str, str] = field(default_factory=lambda: DECODER_TP_PLAN)
    mlp: str = "gated"  # each layer's MLP, a key of loader.MLPS (an MoE family adds its kind)
    head: str = "lm_head"  # on the final hidden states, a key of loader.HEADS (a classifier adds its `score`)

    @property
    def task(self) -> Task:
        """CLASSIFICATION for a *ForSequenceClassification head (its `score`), else CAUSAL_LM."""
        return Task.CLASSIFICATION if self.head == "score" else Task.CAUSAL_LM


# A classifier's plan: the decoder's, its small `score` head replicated on every rank (num_labels columns).
CLASSIFIER_TP_PLAN: Mapping[str, str] = {k: v for k, v in DECODER_TP_PLAN.items() if k != "lm_head"}


def sequence_classifier(causal: Architecture) -> Architecture:
    """The *ForSequenceClassification entry of a family (transformers' GenericForSequenceClassification): the same
    decoder under `model.`, and a `score` head (Linear hidden -> num_labels, no bias, weight `score.weight`) on the
    final-normed hidden state of each sequence's last token that is not padding (modules.classifier_rows)."""
    return replace(causal, weights=replace(causal.weights, head="score"), tp_plan=CLASSIFIER_TP_PLAN, head="score")


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(),
    "MistralForCausalLM": Architecture(read=read_mistral),
    "Qwen2ForCausalLM": Architecture(read=read_qwen2),
    "Qwen3ForCausalLM": Architecture(read=read_qwen3),
    "GraniteForCausalLM": Architecture(read=read_granite),
    "GemmaForCausalLM": Architecture(read=read_gemma),
    "Gemma2ForCausalLM": Architecture(read=read_gemma2),
    "Gemma3ForCausalLM": Architecture(read=read_gemma3),
    "Phi3ForCausalLM": Architecture(read=read_phi3),
    "Olmo2ForCausalLM": Architecture(read=read_olmo2),
    "SmolLM3ForCausalLM": Architecture(read=read_smollm3),
    "MixtralForCausalLM": Architecture(read=read_mixtral, mlp="moe"),
    "Qwen3MoeForCausalLM": Architecture(read=read_qwen3_moe, mlp="moe"),
}

# Sequence classifiers (reward models, classifiers) of the families transformers has one for (not Granite).
ARCHITECTURES.update(
    {
        "LlamaForSequenceClassification": sequence_classifier(ARCHITECTURES["LlamaForCausalLM"]),
        "MistralForSequenceClassification": sequence_classifier(ARCHITECTURES["MistralForCausalLM"]),
        "Qwen2ForSequenceClassification": sequence_classifier(ARCHITECTURES["Qwen2ForCausalLM"]),
        "Qwen3ForSequenceClassification": sequence_classifier(ARCHITECTURES["Qwen3ForCausalLM"]),
        "GemmaForSequenceClassification": sequence_classifier(ARCHITECTURES["GemmaForCausalLM"]),
        "Gemma2ForSequenceClassification": sequence_classifier(ARCHITECTURES["Gemma2ForCausalLM"]),
        "Gemma3TextForSequenceClassification": sequence_classifier(ARCHITECTURES["Gemma3ForCausalLM"]),
        "Phi3ForSequenceClassification": sequence_classifier(ARCHITECTURES["Phi3ForCausalLM"]),
        "Olmo2ForSequenceClassification": sequence_classifier(ARCHITECTURES["Olmo2ForCausalLM"]),
        "SmolLM3ForSequenceClassification": sequence_classifier(ARCHITECTURES["SmolLM3ForCausalLM"]),
    }
)
