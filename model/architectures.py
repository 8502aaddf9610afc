"""The registry: one entry per supported ``architectures[0]``, holding what that family changes.

An entry says which config.json keys the family reads beyond the shared ones (``read``, into the
``ArchitectureFields`` of its ``ModelConfig``), how its checkpoint names our modules' tensors (``weights``), how
tensor parallelism shards them (``tp_plan``), and which kind of MLP and head it is built with (model/loader.py
builds each kind). Everything an entry does not name is shared: model/config.py reads the common fields,
model/loader.py assembles and loads any entry's model. A new family is one entry here plus what is genuinely new
(a field, a module kind, a TP style), and a tiny checkpoint recipe in tests/checkpoints.py (a test requires one
for every entry).

This module is plain data and config.json reading: everything else imports it, it imports nothing of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .moe import MoeConfig

HFConfig = Mapping[str, Any]  # a parsed config.json


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


def _moe_config(hf: HFConfig) -> MoeConfig:
    # Imported here: model/moe.py imports model/config.py, which imports this module.
    from .moe import MoeConfig

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


# Module path pattern -> sharding style (model/tp.py implements the styles); unnamed modules are replicated.
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


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(),
    "MistralForCausalLM": Architecture(read=read_mistral),
    "Qwen2ForCausalLM": Architecture(read=read_qwen2),
    "Qwen3ForCausalLM": Architecture(read=read_qwen3),
    "GraniteForCausalLM": Architecture(read=read_granite),
    "MixtralForCausalLM": Architecture(read=read_mixtral, mlp="moe"),
    "Qwen3MoeForCausalLM": Architecture(read=read_qwen3_moe, mlp="moe"),
}
