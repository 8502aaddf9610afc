"""How the model computes, decided once: the weights' dtype, batch invariance, the attention kernel, prefix sharing and
the prefix cache's size.

``resolve_numerics`` is the one place these are decided, from what was asked (``ModelRunner.load``'s arguments, or
the serve flags ``--dtype``, ``--batch-invariant``, ``--prefix-sharing``, ``--prefix-cache-bytes``), the device and
the model's config. Its answer, a frozen ``Numerics``, is what model construction reads (each attention is built
with its kernel, each MoE block with the switch), what a worker reports to the front end, and what ``/info``
shows, before the workers are ready too.

Why the choices hang together:

- Batch invariance (model/runtime/invariance.py) is measured on the CPU's kernels; on by default there, refused
  on CUDA.
- Prefix sharing and the prefix cache reuse a row computed for another sequence, so a row's bits must follow its
  prefix only: every layer on the prefix-stable attention (model/layers/attention_stable.py), rotary frequencies
  that follow the position only, and the CPU (CUDA's flash varlen kernel is not prefix-stable).
- The server promises that under batch invariance the sharing and cache switches change no bit (docs/api.md,
  Determinism): with them off it keeps the prefix-stable attention (``switches_keep_bits``). Without that promise
  (``ModelRunner.load``'s default), sharing off keeps the attention with transformers' bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.families.config import ModelConfig
from model.layers.attention_kernels import AttentionKind
from model.runtime import invariance

# The prefix cache's size where prefix sharing is in force and no size was asked for (docs/api.md).
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Numerics:
    """What the model computes with, as resolved by ``resolve_numerics``; plain data (it crosses process pipes)."""

    dtype: str  # the weights' dtype, a DTYPES key
    batch_invariant: bool  # a sequence's outputs are the same bits whatever shares its batch
    attention: AttentionKind  # the kernel every layer's attention is built with
    prefix_sharing: bool  # shared prefixes of a batch are computed once
    prefix_cache_bytes: int  # the prefix cache's limit per replica; 0: no cache
    reason: str | None = None  # why prefix sharing or the cache is off where it was not turned off, if it is

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def row_multiple(self) -> int:
        """Rows every serving matmul runs in whole groups of (1: as they come)."""
        return invariance.ROW_MULTIPLE if self.batch_invariant else 1


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` is the checkpoint's dtype on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(config.torch_dtype, torch.float32) if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def why_not_prefix_stable(config: ModelConfig, device: torch.device) -> str | None:
    """None where a row's hidden states can follow its prefix only (prefix sharing, the prefix cache); else why not."""
    if device.type != "cpu":
        return f"prefix-stable attention is implemented for the CPU only, not {device.type}"
    if config.attention == "eager":
        return f"{config.architecture}'s soft-capped eager attention has no prefix-stable form"
    ropes = [config.rope] + ([config.local_rope] if config.local_rope is not None else [])
    varying = sorted({rope.rope_type for rope in ropes} & {"dynamic", "longrope"})
    if varying:
        return f"{config.architecture}'s {varying[0]} rotary frequencies follow the sequence's length"
    return None


def resolve_numerics(
    config: ModelConfig,
    device: torch.device | str,
    *,
    dtype: str | torch.dtype = "auto",
    batch_invariant: bool | None = None,
    prefix_sharing: bool | None = None,
    prefix_cache_bytes: int | None = None,
    switches_keep_bits: bool = False,
) -> Numerics:
    """The numerics in force for `config` on `device`. None asks for the default.

    batch_invariant: None is on for the CPU, off for CUDA, where True is refused (invariance.resolve).
    prefix_sharing: None is on wherever the model can share; True where it cannot is refused; False is off.
    prefix_cache_bytes: None is DEFAULT_PREFIX_CACHE_BYTES where sharing is in force, else 0; a size asked for where
    sharing or batch invariance is not in force is 0, with the reason.
    switches_keep_bits: the server's promise that under batch invariance turning sharing or the cache off changes no
    bit (the attention stays prefix-stable wherever the model can share); without it, sharing and the cache off
    keep the attention with transformers' bits."""
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, config, device)
    invariant = invariance.resolve(batch_invariant, device)
    why_not = why_not_prefix_stable(config, device)
    if prefix_sharing and why_not:
        raise ValueError(f"prefix sharing is supported on CPU for SDPA-attention models whose rotary frequencies "
                         f"follow the position only: {why_not}")
    if prefix_cache_bytes is not None and prefix_cache_bytes < 0:
        raise ValueError(f"prefix_cache_bytes must be >= 0, not {prefix_cache_bytes}")
    sharing = prefix_sharing is not False and why_not is None
    cache = prefix_cache_bytes if prefix_cache_bytes is not None else DEFAULT_PREFIX_CACHE_BYTES if sharing else 0
    # The cache extends the batch's shared trunk across batches, and its promise (no bit changed) is batch
    # invariance's: without both it stays off.
    cache = cache if sharing and invariant else 0
    asked_off = prefix_sharing is False and not prefix_cache_bytes
    cache_refused = bool(prefix_cache_bytes) and not cache and why_not is None
    if config.attention == "eager":
        attention = AttentionKind.EAGER
    elif why_not is None and (sharing or (switches_keep_bits and invariant)):
        attention = AttentionKind.PREFIX_STABLE
    else:
        attention = AttentionKind.SDPA
    return Numerics(
        dtype=str(torch_dtype).removeprefix("torch."),
        batch_invariant=invariant,
        attention=attention,
        prefix_sharing=sharing,
        prefix_cache_bytes=cache,
        reason=("the prefix cache needs prefix sharing and batch invariance in force" if cache_refused
                else None if asked_off or why_not is None else f"prefix sharing and the prefix cache are off: {why_not}"),
    )


__all__ = ["DEFAULT_PREFIX_CACHE_BYTES", "DTYPES", "AttentionKind", "Numerics", "resolve_dtype", "resolve_numerics",
           "why_not_prefix_stable"]
