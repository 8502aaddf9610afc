"""Rotary position embeddings for ragged batches: default, linear, dynamic (NTK), llama3 and yarn.

Positions restart at 0 for every sequence. Dynamic NTK depends on the sequence length, so it is computed per
sequence: a ragged batch gives each sequence exactly what it gets alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from model.families.architectures import GLOBAL_ROPE, LOCAL_ROPE, gemma3_rope_parameters, phi3_rope_parameters
from model.families.config import ModelConfig, RopeConfig
from model.runtime.invariance import complex_mul_rows


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_context = rope.original_max_position_embeddings
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    original = rope.original_max_position_embeddings or max_positions

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding:
    """Computes cos/sin tables [T, rotary_dim] for packed positions; one instance per rope table of a model (`rope`:
    config.rope unless told), shared by every layer that uses it. rotary_dim is head_dim unless the rope's
    partial_rotary_factor says less (transformers builds the frequencies for the rotated dims alone)."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", rope: RopeConfig | None = None) -> None:
        self.config = config
        self.rope = rope or config.rope
        self.dim = int(config.head_dim * self.rope.partial_rotary_factor)
        self.device = torch.device(device)
        inv_freq = _base_inv_freq(self.rope.theta, self.dim)
        self.attention_factor = 1.0
        if self.rope.rope_type == "linear":
            inv_freq = inv_freq / self.rope.factor
        elif self.rope.rope_type == "llama3":
            inv_freq = _llama3(inv_freq, self.rope)
        elif self.rope.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn(self.rope, self.dim, config.max_position_embeddings)
        self.inv_freq = inv_freq.to(self.device)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        max_pos = self.config.max_position_embeddings
        if seq_len <= max_pos:
            return self.inv_freq
        base = self.rope.theta * ((self.rope.factor * seq_len / max_pos) - (self.rope.factor - 1)) ** (
            self.dim / (self.dim - 2)
        )
        return _base_inv_freq(base, self.dim).to(self.device)

    def __call__(self, positions: torch.Tensor, seq_lens: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int64 [T] (restarting per sequence) -> cos, sin: [T, head_dim] in `dtype`."""
        if self.rope.rope_type == "dynamic" and max(seq_lens) > self.config.max_position_embeddings:
            # Per-sequence frequencies: [T, head_dim/2]
            inv = torch.cat(
                [self._dynamic_inv_freq(n).expand(n, -1) for n in seq_lens]
            )
            freqs = positions.float()[:, None] * inv
        else:
            freqs = torch.outer(positions.float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]. HF's rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def pair_order(head_dim: int) -> torch.Tensor:
    """int64 [head_dim]: the rotate-half dims in pair order, each dim i beside its partner i + head_dim/2."""
    half = head_dim // 2
    return torch.stack((torch.arange(half), torch.arange(half) + half), dim=-1).flatten()


def to_pair_order(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of ``t`` (dim 0: heads x head_dim, e.g. a q/k projection's weight or bias, or a q/k norm's weight)
    with every head's dims in pair order."""
    heads = t.shape[0] // head_dim
    index = (torch.arange(heads)[:, None] * head_dim + pair_order(head_dim)).flatten()
    return t.index_select(0, index.to(t.device))


def apply_rotary_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` for q/k stored in pair order (``to_pair_order``): x [T, heads, head_dim] in pair order;
    cos/sin [T, head_dim/2]. Returns ``apply_rotary``'s result with the same bits and in the checkpoint's
    (rotate-half) order, a fresh contiguous [T, heads, head_dim], so that attention sums each q.k product over the
    head dims in the order transformers does (another order moves SmolLM2-135M logits by up to 2e-4).

    Each pair (x_i, x_{i+D/2}) is one complex number times cos + i sin: one pass over x and one reordering copy,
    where the rotate-half layout takes six strided half-width ops. Complex tensors exist for float32/float64 only,
    and the compiler does not lower them: other dtypes and traced calls take the real formula (x1 cos - x2 sin,
    x2 cos + x1 sin)."""
    pairs = x.unflatten(-1, (-1, 2))  # [T, heads, D/2, 2]
    if x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling():
        if pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.clone(memory_format=torch.contiguous_format)  # a complex view needs even strides and offset
        # each (token, head) run on the code path it takes alone: torch's vector and scalar complex products differ
        rotated = torch.view_as_real(complex_mul_rows(torch.view_as_complex(pairs), torch.complex(cos, sin)[:, None]))
        halves = rotated.new_empty(*rotated.shape[:-2], 2, rotated.shape[-2])  # [T, heads, 2, D/2]
        return halves.copy_(rotated.transpose(-1, -2)).flatten(-2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None], sin[:, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


# --- LongRoPE and partial rotary (Phi-3, Phi-3.5, Phi-4-mini); per-layer-type tables (Gemma 3) ---


@dataclass(frozen=True)
class LongRope:
    """LongRoPE as transformers 5 computes it for Phi3ForCausalLM: inverse frequencies 1 / (factor_i * theta^(2i/d))
    with one set of factors for sequences of up to ``original_max_position_embeddings`` tokens (`short_factor`) and
    another for longer ones (`long_factor`), and one attention factor multiplying cos and sin.

    transformers picks the set per forward from the largest position in the batch (``longrope_frequency_update``),
    so in a padded batch one long sequence switches every sequence to the long factors. Here each sequence of a
    ragged batch gets the set its own length picks: what transformers computes for that sequence alone."""

    theta: float
    rotary_dim: int  # head_dim * partial_rotary_factor: rotary turns the first rotary_dim dims of each head
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float

    @classmethod
    def from_hf(cls, hf: dict[str, Any], head_dim: int) -> LongRope:
        """From a Phi-3 config.json (transformers-4 `rope_scaling` + `rope_theta`, or transformers-5
        `rope_parameters`), with Phi3Config's rules (architectures.phi3_rope_parameters)."""
        params = phi3_rope_parameters(hf)
        if params is None:
            raise ValueError("not a longrope config")
        return cls.from_rope_config(RopeConfig.from_hf({"rope_parameters": params}, family_types=True), head_dim)

    @classmethod
    def from_rope_config(cls, rope: RopeConfig, head_dim: int) -> LongRope:
        """From a longrope RopeConfig whose defaults are resolved (architectures.phi3_rope_parameters)."""
        rotary_dim = int(head_dim * rope.partial_rotary_factor)
        short, long = rope.short_factor, rope.long_factor
        if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
            raise ValueError(f"longrope factors need {rotary_dim // 2} entries, got {len(short)} and {len(long)}")
        return cls(
            theta=rope.theta,
            rotary_dim=rotary_dim,
            short_factor=short,
            long_factor=long,
            original_max_position_embeddings=int(rope.original_max_position_embeddings),
            attention_factor=float(rope.attention_factor),
        )

    def inv_freq(self, long: bool) -> torch.Tensor:
        """float32 [rotary_dim / 2], with transformers' ops (``_compute_longrope_parameters``)."""
        factors = torch.tensor(self.long_factor if long else self.short_factor, dtype=torch.float32)
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (factors * self.theta**exponents)


class LongRopeEmbedding:
    """cos/sin tables [T, rotary_dim] for packed positions under LongRoPE, each sequence with the factors its own
    length picks (longer than original_max_position_embeddings: long). Called like ``RotaryEmbedding``."""

    def __init__(self, rope: LongRope, device: torch.device | str = "cpu") -> None:
        self.rope = rope
        self.device = torch.device(device)
        self.short_inv_freq = rope.inv_freq(long=False).to(self.device)
        self.long_inv_freq = rope.inv_freq(long=True).to(self.device)

    def __call__(
        self, positions: torch.Tensor, seq_lens: list[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int64 [T] (restarting per sequence) -> cos, sin: [T, rotary_dim] in `dtype`."""
        original = self.rope.original_max_position_embeddings
        longs = [n > original for n in seq_lens]
        if not any(longs) or all(longs):
            inv = self.long_inv_freq if longs[0] else self.short_inv_freq  # [rotary_dim / 2]
        else:  # per sequence: [T, rotary_dim / 2]
            per_sequence = [self.long_inv_freq if lg else self.short_inv_freq for lg in longs]
            inv = torch.cat([f.expand(n, -1) for f, n in zip(per_sequence, seq_lens)])
        freqs = positions.float()[:, None] * inv  # [T, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope.attention_factor, emb.sin() * self.rope.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary=apply_rotary) -> torch.Tensor:
    """Rotary on the first rotary_dim = cos.shape[-1] dims of each head; the rest pass unchanged (Phi-4-mini:
    partial_rotary_factor 0.75). x: [T, heads, head_dim]; cos/sin: [T, rotary_dim] -> a new [T, heads, head_dim].

    `rotary` is the full-width function to apply to the rotated dims (``apply_rotary``, or ``modules.rotate`` with
    the same bits and fewer temporaries); both give transformers' rotate-half bits, as its
    ``cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass])``. Checkpoint order only: pair order
    (``to_pair_order``) would also have to leave the pass-through dims in place."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return rotary(x, cos, sin)
    out = x.new_empty(x.shape)
    out[..., :rotary_dim] = rotary(x[..., :rotary_dim], cos, sin)
    out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


def rope_configs_by_layer_type(hf: dict[str, Any], default_theta: dict[str, float]) -> dict[str, RopeConfig]:
    """One RopeConfig per layer type ("full_attention", "sliding_attention"), as Gemma3TextConfig reads them:
    transformers-5 `rope_parameters` nested by layer type, or transformers-4 keys, where `rope_theta` and
    `rope_scaling` are the full layers' and `rope_local_base_freq` the sliding layers' theta. `default_theta` gives
    each type's theta when the config names none (Gemma 3: 1e6 full, 1e4 sliding)."""
    by_type = gemma3_rope_parameters(hf, default_theta)
    return {layer_type: RopeConfig.from_hf({"rope_parameters": p}) for layer_type, p in by_type.items()}


def rope_embedding(config: ModelConfig, rope: RopeConfig, device: torch.device | str = "cpu"):
    """The table maker of one rope config: ``LongRopeEmbedding`` for longrope, else ``RotaryEmbedding``."""
    if rope.rope_type == "longrope":
        return LongRopeEmbedding(LongRope.from_rope_config(rope, config.head_dim), device)
    return RotaryEmbedding(config, device, rope=rope)


def build_ropes(config: ModelConfig, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The model's rope tables by name (architectures.GLOBAL_ROPE, LOCAL_ROPE), each called like RotaryEmbedding.
    Real tensors: build outside a meta-device context."""
    ropes = {GLOBAL_ROPE: rope_embedding(config, config.rope, device)}
    if config.local_rope is not None:
        ropes[LOCAL_ROPE] = rope_embedding(config, config.local_rope, device)
    return ropes
