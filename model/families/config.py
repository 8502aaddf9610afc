"""The configuration every supported decoder shares, built from a Hugging Face ``config.json``.

``ModelConfig.from_hf_config`` reads the fields every family names alike; the entry of its ``architectures[0]``
(model/families/architectures.py) reads what that family adds (its ``ArchitectureFields``: biases, q/k norm, sliding
windows, multipliers...). Fields read from the checkpoint are stored as they are; derived values (``q_size``,
``attention_scale``...) are properties, so nothing read from the checkpoint is ever silently overwritten.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.families import family_fields
from model.families.architectures import ARCHITECTURES, GLOBAL_ROPE, LOCAL_ROPE, NORM_PLACEMENTS, ArchitectureFields
from model.errors import UnsupportedModelError
from model.layers.base import ACTIVATIONS
from model.task import Task

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# Rope types a family reads its own way (ArchitectureFields.rope_parameters), with the architectures that do.
FAMILY_ROPE_TYPES = {"longrope": ("Phi3ForCausalLM", "Phi3ForSequenceClassification")}

__all__ = ["SUPPORTED_ROPE_TYPES", "ModelConfig", "RopeConfig", "UnsupportedModelError"]


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
    # longrope (Phi-3): the frequency factors of sequences up to original_max_position_embeddings, and longer ones
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict[str, Any], default_theta: float = 10000.0, family_types: bool = False) -> RopeConfig:
        """Accept transformers-4 (`rope_theta` + `rope_scaling`) and transformers-5 (`rope_parameters`) keys;
        `default_theta` where the config names none (the family's class default). `family_types`: also the types
        of FAMILY_ROPE_TYPES (parameters a family's entry has resolved)."""
        params = hf.get("rope_parameters")
        if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
            # Per-layer-type parameters (transformers 5): the decoders here use one set for every layer.
            params = params.get("full_attention") or next(iter(params.values()))
        merged: dict[str, Any] = {}
        if hf.get("rope_scaling"):
            merged.update(hf["rope_scaling"])
        if isinstance(params, dict):
            merged.update(params)
        theta = merged.get("rope_theta", hf.get("rope_theta", default_theta))
        rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES and not (family_types and rope_type in FAMILY_ROPE_TYPES):
            families = "; ".join(f"{t} for {', '.join(archs)}" for t, archs in FAMILY_ROPE_TYPES.items())
            raise UnsupportedModelError(
                f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)} ({families})"
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
            short_factor=tuple(float(f) for f in opt("short_factor", ())),
            long_factor=tuple(float(f) for f in opt("long_factor", ())),
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
    rope: RopeConfig = field(default_factory=RopeConfig)  # the global layers' (every layer's but Gemma 3's sliding)
    local_rope: RopeConfig | None = None  # the LOCAL_ROPE layers' (Gemma 3's sliding layers)
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    task: Task = Task.CAUSAL_LM  # an lm_head over the vocabulary, or a `score` head over num_labels labels
    num_labels: int = 0  # classification: the score head's columns
    id2label: dict[int, str] = field(default_factory=dict)  # classification: each column's label
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", Task(self.task))  # its name ("causal-lm") reads as the member
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
        if self.layer_rope and len(self.layer_rope) != self.num_layers:
            raise ValueError("layer_rope needs one entry per layer")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {', '.join(NORM_PLACEMENTS)}")
        if LOCAL_ROPE in self.layer_rope and self.local_rope is None:
            raise ValueError("layers with the local rope need local_rope")

    # Derived values: computed, never stored.
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each q/k head that rotary turns (all but Phi-4-mini's partial rotary)."""
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def layer_rope_kind(self, layer_idx: int) -> str | None:
        """The rope table layer `layer_idx` uses: GLOBAL_ROPE, LOCAL_ROPE, or None (no rotary)."""
        return self.layer_rope[layer_idx] if self.layer_rope else GLOBAL_ROPE

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
        family_fields.refuse_multimodal(arch)
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        num_heads = hf["num_attention_heads"]
        entry = ARCHITECTURES[arch]
        family = entry.read(hf)

        def rope_table(name: str) -> RopeConfig:
            if name in family.rope_parameters:
                return RopeConfig.from_hf({"rope_parameters": dict(family.rope_parameters[name])}, family_types=True)
            return RopeConfig.from_hf(hf, default_theta=family.default_rope_theta)

        labels: dict[int, str] = {}
        if entry.task == Task.CLASSIFICATION:  # PretrainedConfig's rule: id2label wins, else num_labels (default 2)
            raw = hf.get("id2label") or {i: f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2)))}
            labels = {int(i): str(label) for i, label in raw.items()}
        return cls(
            **{f.name: getattr(family, f.name) for f in fields(ArchitectureFields)},
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or family.default_head_dim or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope=rope_table(GLOBAL_ROPE),
            local_rope=rope_table(LOCAL_ROPE) if LOCAL_ROPE in family.layer_rope else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            task=entry.task,
            num_labels=len(labels),
            id2label=labels,
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
