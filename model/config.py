"""The configuration every supported decoder shares, built from a Hugging Face ``config.json``.

``ModelConfig.from_hf_config`` reads the fields every family names alike; the entry of its ``architectures[0]``
(model/architectures.py) reads what that family adds (its ``ArchitectureFields``: biases, q/k norm, sliding
windows, multipliers...). Fields read from the checkpoint are stored as they are; derived values (``q_size``,
``attention_scale``...) are properties, so nothing read from the checkpoint is ever silently overwritten.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .architectures import ARCHITECTURES, ArchitectureFields
from .layers import ACTIVATIONS

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint asks for something this server does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3, yarn, dynamic
    original_max_position_embeddings: int | None = None
    # yarn
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        """Accept transformers-4 (`rope_theta` + `rope_scaling`) and transformers-5 (`rope_parameters`) keys."""
        params = hf.get("rope_parameters")
        if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
            # Per-layer-type parameters (transformers 5): the decoders here use one set for every layer.
            params = params.get("full_attention") or next(iter(params.values()))
        merged: dict[str, Any] = {}
        if hf.get("rope_scaling"):
            merged.update(hf["rope_scaling"])
        if isinstance(params, dict):
            merged.update(params)
        theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

        def opt(key: str, default: Any = None) -> Any:
            value = merged.get(key)
            return default if value is None else value

        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(opt("factor", 1.0)),
            low_freq_factor=float(opt("low_freq_factor", 1.0)),
            high_freq_factor=float(opt("high_freq_factor", 4.0)),
            original_max_position_embeddings=opt("original_max_position_embeddings"),
            attention_factor=opt("attention_factor"),
            beta_fast=float(opt("beta_fast", 32.0)),
            beta_slow=float(opt("beta_slow", 1.0)),
            mscale=opt("mscale"),
            mscale_all_dim=opt("mscale_all_dim"),
            truncate=bool(opt("truncate", True)),
            partial_rotary_factor=float(opt("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        )


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ArchitectureFields):
    """The fields every family shares, read here, and those its architecture's entry reads (ArchitectureFields)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    final_logit_softcapping: float | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}"
            )
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows needs one entry per layer")

    # Derived values: computed, never stored.
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        return self.attention_multiplier if self.attention_multiplier is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def num_hidden_state_layers(self) -> int:
        """Hidden-state layers a request can name: 0 is the embedding output, i the output of block i."""
        return self.num_layers + 1

    def resolve_layers(self, layers: list[int] | tuple[int, ...]) -> tuple[int, ...]:
        n = self.num_hidden_state_layers
        resolved = []
        for layer in layers:
            if not -n <= layer < n:
                raise IndexError(f"layer {layer} out of range for a model with {n} hidden-state layers (0..{n - 1})")
            resolved.append(layer % n)
        return tuple(resolved)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """The shared fields, and what the architecture's entry reads (``Architecture.read``)."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        num_heads = hf["num_attention_heads"]
        rope = RopeConfig.from_hf(hf)
        if rope.partial_rotary_factor != 1.0:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        family = ARCHITECTURES[arch].read(hf)
        return cls(
            **{f.name: getattr(family, f.name) for f in fields(ArchitectureFields)},
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint folder: no config.json")
        return cls.from_hf_config(json.loads(config_path.read_text()))
