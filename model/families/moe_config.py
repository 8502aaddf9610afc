"""The MoE fields of a Hugging Face config and the expert checkpoint names of each MoE family (read by the
registry, built into model/layers/moe.py's `SparseMoeBlock`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.errors import UnsupportedModelError


@dataclass(frozen=True)
class ExpertWeightNames:
    """Checkpoint names of one family's MoE block, under ``model.layers.{i}.{block}``.

    Checkpoints store the router ``{block}.{router}.weight`` and one tensor per expert,
    ``{block}.experts.{e}.{gate|up|down}.weight``. transformers 5 keeps the experts stacked in memory,
    ``mlp.experts.gate_up_proj`` [E, 2I, H] (each expert's gate rows, then its up rows) and
    ``mlp.experts.down_proj`` [E, H, I], with Mixtral's block renamed to ``mlp``; its ``save_pretrained`` writes
    the per-expert names back, but a checkpoint saved in the stacked layout is read too."""

    block: str
    router: str
    gate: str
    up: str
    down: str

    @property
    def blocks(self) -> tuple[str, ...]:
        """The block's name in per-expert checkpoints, then in transformers 5's stacked layout."""
        return tuple(dict.fromkeys((self.block, "mlp")))


MIXTRAL_WEIGHTS = ExpertWeightNames(block="block_sparse_moe", router="gate", gate="w1", up="w3", down="w2")
QWEN3_MOE_WEIGHTS = ExpertWeightNames(block="mlp", router="gate", gate="gate_proj", up="up_proj", down="down_proj")


@dataclass(frozen=True)
class MoeConfig:
    """The MoE fields of a Hugging Face config (``router_aux_loss_coef``, ``output_router_logits`` and
    ``router_jitter_noise`` only matter in training and are not read)."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    normalize_top_k: bool  # renormalise the k chosen probabilities to sum to 1
    # Mixtral mixes in float32 (then casts the sum); Qwen3-MoE casts the weights to the activations' dtype first.
    float32_routing_weights: bool
    sparse_layers: tuple[bool, ...]  # per layer: MoE block (True) or the dense MLP of `intermediate_size`
    weight_names: ExpertWeightNames

    def __post_init__(self) -> None:
        if not 0 < self.experts_per_token <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok ({self.experts_per_token}) must be in 1..num_experts ({self.num_experts})"
            )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> MoeConfig:
        arch = (hf.get("architectures") or [None])[0]
        num_layers = hf["num_hidden_layers"]
        # Mixtral's field is num_local_experts; Qwen3-MoE's is num_experts, which transformers 5 writes back
        # as num_local_experts (its attribute_map).
        num_experts = hf.get("num_local_experts", hf.get("num_experts"))
        if arch in ("MixtralForCausalLM", "Qwen3MoeForCausalLM") and not num_experts:
            raise UnsupportedModelError(f"{arch} config names no experts (num_local_experts / num_experts)")
        if arch == "MixtralForCausalLM":
            return cls(
                num_experts=num_experts,
                experts_per_token=hf.get("num_experts_per_tok", 2),
                expert_intermediate_size=hf["intermediate_size"],
                normalize_top_k=True,
                float32_routing_weights=True,
                sparse_layers=(True,) * num_layers,
                weight_names=MIXTRAL_WEIGHTS,
            )
        if arch == "Qwen3MoeForCausalLM":
            dense, step = set(hf.get("mlp_only_layers") or ()), hf.get("decoder_sparse_step", 1)
            return cls(
                num_experts=num_experts,
                experts_per_token=hf.get("num_experts_per_tok", 8),
                expert_intermediate_size=hf["moe_intermediate_size"],
                normalize_top_k=bool(hf.get("norm_topk_prob", False)),
                float32_routing_weights=False,
                sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
                weight_names=QWEN3_MOE_WEIGHTS,
            )
        raise UnsupportedModelError(f"{arch!r} is not a mixture-of-experts architecture this server implements")
