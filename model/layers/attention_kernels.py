"""The attention kernels a layer can be built with, by kind (model/runtime/numerics.py decides which).

Each kernel has ``modules.ragged_attention``'s signature: (q [T, Hq, D], k, v [T, Hkv, D], batch, scale, window)
-> [T, Hq, D], causal within each sequence."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum

import torch

from model.layers.attention_stable import prefix_stable_attention
from model.layers.modules import eager_attention, ragged_attention


class AttentionKind(str, Enum):
    SDPA = "sdpa"  # one SDPA call per distinct length (flash varlen on CUDA): transformers' bits
    EAGER = "eager"  # transformers' eager path with the config's soft-cap (Gemma 2): SDPA has no soft-cap
    PREFIX_STABLE = "prefix_stable"  # a row's bits follow its prefix only (prefix sharing, the prefix cache)


def attention_kernel(kind: AttentionKind, softcap: float | None = None, out_of_graph: bool = False) -> Callable:
    """The kernel of `kind`; `softcap` binds EAGER's soft-cap. `out_of_graph`: for a block that torch.compile
    traces (regional compilation), the kernel's host-driven loop over sequences stays eager."""
    if kind == AttentionKind.EAGER:
        kernel = functools.partial(eager_attention, softcap=softcap)
    else:
        kernel = {AttentionKind.SDPA: ragged_attention, AttentionKind.PREFIX_STABLE: prefix_stable_attention}[kind]
    return _compiler_disabled(kernel) if out_of_graph else kernel


_DISABLED: dict = {}


def _compiler_disabled(fn: Callable) -> Callable:
    """`fn` kept out of compiled graphs; one wrapper per function and keywords, so layers share one wrapper."""
    key = getattr(fn, "func", fn), tuple(sorted(getattr(fn, "keywords", {}).items()))
    if key not in _DISABLED:
        _DISABLED[key] = torch.compiler.disable(fn)
    return _DISABLED[key]
