"""The registry: one entry per supported ``architectures[0]``, holding what that family changes.

An entry says which config.json keys the family reads beyond the shared ones (``read``), which pieces its model is
built from (``norm``, ``mlp``, ``head``), how its checkpoint names their tensors (``weights``) and how tensor
parallelism shards them (``tp_plan``). Everything an entry does not name is shared: model/config.py reads the
common fields, model/loader.py assembles and loads any entry's model. A new family is one entry here plus what is
genuinely new (a module, a config field, a TP style), and a tiny checkpoint recipe in tests/checkpoints.py (a test
requires one for every entry).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from torch import nn

from .layers import RMSNorm
from .modules import MLP
from .tp import TP_PLAN

if TYPE_CHECKING:
    from .config import ModelConfig

HFConfig = Mapping[str, Any]  # a parsed config.json


# ------------------------------------------------------------------------------------ what a family reads


def read_llama(hf: HFConfig, config: ModelConfig) -> ModelConfig:
    """Llama's keys, which the other families here read too: `attention_bias` (q, k, v and o), `mlp_bias`."""
    bias = bool(hf.get("attention_bias", False))
    return replace(config, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def read_mistral(hf: HFConfig, config: ModelConfig) -> ModelConfig:
    """`sliding_window` on every layer."""
    window = hf.get("sliding_window") or None
    return replace(read_llama(hf, config), sliding_windows=(window,) * config.num_layers)


def _qwen_sliding_windows(hf: HFConfig, num_layers: int) -> tuple[int | None, ...]:
    """The layers `layer_types` marks as sliding, or (older configs) those from `max_window_layers` on."""
    window = hf.get("sliding_window")
    if layer_types := hf.get("layer_types"):
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if hf.get("use_sliding_window") and window:
        first = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def read_qwen2(hf: HFConfig, config: ModelConfig) -> ModelConfig:
    """q, k and v always carry a bias, o never."""
    windows = _qwen_sliding_windows(hf, config.num_layers)
    return replace(read_llama(hf, config), qkv_bias=True, o_bias=False, sliding_windows=windows)


def read_qwen3(hf: HFConfig, config: ModelConfig) -> ModelConfig:
    """An RMSNorm on every q and k head before the rotary embedding."""
    windows = _qwen_sliding_windows(hf, config.num_layers)
    return replace(read_llama(hf, config), qk_norm=True, sliding_windows=windows)


def read_granite(hf: HFConfig, config: ModelConfig) -> ModelConfig:
    """Multipliers on the embeddings, the residual branches and the attention scores; logits divided by a scale."""
    return replace(
        read_llama(hf, config),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        attention_multiplier=float(hf["attention_multiplier"]) if "attention_multiplier" in hf else None,
        logits_scaling=float(hf.get("logits_scaling", 1.0) or 1.0),
    )


# ------------------------------------------------------------------------------- what a model is built from


def dense_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
    """Every layer's MLP: gated, of `intermediate_size` (an MoE family builds its own per layer)."""
    return MLP(config.hidden_size, config.intermediate_size, config.mlp_bias, config.hidden_act)


def lm_head(config: ModelConfig) -> nn.Module:
    """Final hidden state -> vocabulary logits (a classifier's head would map to its labels instead)."""
    return nn.Linear(config.hidden_size, config.vocab_size, bias=False)


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


@dataclass(frozen=True)
class Architecture:
    """What one architecture changes; the defaults are Llama's."""

    read: Callable[[HFConfig, ModelConfig], ModelConfig] = read_llama  # the shared config + this family's fields
    norm: Callable[[int, float], nn.Module] = RMSNorm  # (width, eps): every norm of the model
    mlp: Callable[[ModelConfig, int], nn.Module] = dense_mlp  # (config, layer index)
    head: Callable[[ModelConfig], nn.Module] = lm_head
    weights: WeightNames = field(default_factory=WeightNames)
    tp_plan: Mapping[str, str] = field(default_factory=lambda: TP_PLAN)  # module path pattern -> style (model/tp.py)


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(),
    "MistralForCausalLM": Architecture(read=read_mistral),
    "Qwen2ForCausalLM": Architecture(read=read_qwen2),
    "Qwen3ForCausalLM": Architecture(read=read_qwen3),
    "GraniteForCausalLM": Architecture(read=read_granite),
}
