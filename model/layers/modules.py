"""Plain decoder pieces (attention, MLP) over ragged batches. They know nothing of tensor parallelism: an
attention is told which heads it computes, and the plan in ``tp.py`` swaps its linears for sharded ones."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.runtime import invariance
from model.families.config import ModelConfig
from model.layers.base import RMSNorm, UpcastRMSNorm, gelu_tanh
from model.layers.rope import apply_partial_rotary, apply_rotary, apply_rotary_pairs, to_pair_order

_flash_adapter = None


def _flash_varlen():
    """A callable (q, k, v, batch, scale, window) -> out over torch's flash varlen attention (CUDA only), or None.

    Imported on first use: the import pulls in torch._dynamo, seconds of start-up that a CPU worker never needs.
    The signature of `varlen_attn` changed across torch releases; this adapts to the one installed and returns
    None where it cannot express the attention (the caller then uses the per-sequence SDPA path)."""
    global _flash_adapter
    if _flash_adapter is None:
        _flash_adapter = _make_flash_adapter() or False
    return _flash_adapter or None


def _make_flash_adapter():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    params = inspect.signature(varlen_attn).parameters

    def attend(q, k, v, batch: RaggedBatch, scale: float, window: int | None) -> torch.Tensor:
        if q.shape[1] != k.shape[1] and "enable_gqa" not in params:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        kwargs = {"scale": scale}
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
        if "window_size" in params:
            # HF's sliding window lets a token see itself and window-1 earlier tokens.
            kwargs["window_size"] = (window - 1, 0) if window else (-1, 0)
        elif "is_causal" in params and not window:
            kwargs["is_causal"] = True
        else:
            return None
        cu = batch.offsets.to(torch.int32)
        longest = max(batch.seq_lens)
        return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)

    return attend


@dataclass(frozen=True)
class RaggedBatch:
    """Where each sequence lies in the packed token dimension."""

    offsets: torch.Tensor  # int64 [B+1] on the model's device
    bounds: tuple[int, ...]  # the same offsets as Python ints (host-side loop bounds)

    @classmethod
    def from_offsets(cls, input_row_offsets: torch.Tensor, device: torch.device) -> RaggedBatch:
        bounds = tuple(int(b) for b in input_row_offsets.tolist())
        return cls(offsets=input_row_offsets.to(device=device, dtype=torch.int64), bounds=bounds)

    @functools.cached_property
    def seq_lens(self) -> list[int]:
        return [e - s for s, e in zip(self.bounds[:-1], self.bounds[1:])]

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1]

    def positions(self) -> torch.Tensor:
        """int64 [T]: 0.. within each sequence."""
        lens = torch.tensor(self.seq_lens, device=self.offsets.device)
        starts = torch.repeat_interleave(self.offsets[:-1], lens)
        return torch.arange(self.num_tokens, device=self.offsets.device) - starts


def ragged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: RaggedBatch,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Causal attention that never crosses a sequence boundary. q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D].

    Hkv must divide Hq (query head h uses kv head h // (Hq / Hkv)). The cost follows the real tokens: flash varlen
    on CUDA; on CPU one SDPA call per distinct sequence length (no padding to the longest sequence).
    """
    gqa = q.shape[1] != k.shape[1]
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    out = flash(q, k, v, batch, scale, window) if flash is not None else None
    if out is not None:
        return out
    out = q.new_empty(q.shape)  # each sequence's result lands in its rows (no list + cat)
    # Sequences of equal length share one SDPA call ([count, H, n, D], still no padding): many short sequences
    # would otherwise cost one call each.
    starts_by_length: dict[int, list[int]] = {}
    for s, e in zip(batch.bounds[:-1], batch.bounds[1:]):
        starts_by_length.setdefault(e - s, []).append(s)
    for n, starts in starts_by_length.items():
        if len(starts) == 1:  # views, no gather
            rows = slice(starts[0], starts[0] + n)
            qs, ks, vs = (t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        else:
            rows = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(-1)
            qs, ks, vs = (t.index_select(0, rows).view(len(starts), n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = _causal_sdpa(qs, ks, vs, scale, window, gqa)
        o = o.transpose(1, 2).reshape(-1, *q.shape[1:])  # [count * n, H, D]
        if isinstance(rows, slice):
            out[rows].copy_(o)
        else:
            out.index_copy_(0, rows, o)
    return out


# Query rows per SDPA call for half-precision sequences longer than two blocks (see _causal_sdpa).
QUERY_BLOCK = 128


def query_cuts(n: int, dtype: torch.dtype, device: torch.device, windowed: bool = False) -> list[int]:
    """Where _causal_sdpa cuts an n-token causal call (`windowed`: one with a sliding window shorter than n) into
    query blocks: [0, ..., n].

    torch's CPU flash kernel computes the masked half of a causal call too (a causal 512-token call costs as much
    as an unmasked one), so a block that sees only the keys up to its last row saves work. In half precision the
    blocks are 128 rows. float32/float64 keep the bits of the one causal call transformers makes (any other
    grouping moves SmolLM2-135M logits by up to 1e-4 through 30 layers): the kernel walks a call of 192-767 query
    rows in 64-row blocks, each row summing softmax(q.k) v over all the call's keys, the masked ones as zeros.
    Blocks of at least 192 rows that start at multiples of 64 keep those 64-row blocks, and the keys they drop are
    zeros: the same sums for less work (tested bit for bit, tests/model/test_attention.py). Other devices' kernels
    make no such promise, nor does a windowed call (its blocks also drop keys before the window): one call."""
    if dtype not in (torch.float32, torch.float64):
        return [*range(0, n, QUERY_BLOCK), n] if n > 2 * QUERY_BLOCK else [0, n]
    if windowed or device.type != "cpu" or not 384 <= n < 768:
        return [0, n]
    cuts = [0]
    while n - cuts[-1] >= 384:
        cuts.append(cuts[-1] + 192)
    return [*cuts, n]


def _causal_sdpa(qs, ks, vs, scale: float, window: int | None, gqa: bool) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of N equal-length sequences: [N, H, n, D] -> [N, H, n, D], in
    the query blocks of ``query_cuts`` (with a window, a block also skips the keys before its first visible one)."""
    n = qs.shape[2]
    window = window if window is not None and window < n else None
    cuts = query_cuts(n, qs.dtype, qs.device, windowed=window is not None)
    if len(cuts) == 2 and window is None:
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
    out = qs.new_empty(qs.shape)
    for s, e in zip(cuts[:-1], cuts[1:]):
        k0 = max(0, s - window + 1) if window else 0
        if s == 0 and window is None:  # the first block is a plain causal square
            mask, causal = None, True
        else:
            i = torch.arange(s, e, device=qs.device)[:, None]
            j = torch.arange(k0, e, device=qs.device)[None, :]
            mask, causal = (j <= i) & (i - j < window) if window else j <= i, False
        out[:, :, s:e] = F.scaled_dot_product_attention(
            qs[:, :, s:e], ks[:, :, k0:e], vs[:, :, k0:e], attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` (HF's rotate-half: x * cos + rotate_half(x) * sin) without the cat / neg temporaries, with
    its bits: each product rounded on its own, as transformers' separate ops do (a fused multiply-add, e.g.
    ``addcmul``, rounds once and moves SmolLM2-135M logits by up to 1e-4 through 30 layers).

    x: [T, heads, head_dim], may be a strided view (e.g. the q and k heads of the fused qkv output)."""
    if torch.compiler.is_compiling():  # the compiler fuses the plain formula (and mishandles out= on views)
        return apply_rotary(x, cos, sin)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2 = cos[:, None, :half], cos[:, None, half:]
    s1, s2 = sin[:, None, :half], sin[:, None, half:]
    out, product = x.new_empty(x.shape), x.new_empty(x1.shape)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c1, out=o1).sub_(torch.mul(x2, s1, out=product))  # x1 * cos + (-x2) * sin
    torch.mul(x2, c2, out=o2).add_(torch.mul(x1, s2, out=product))  # x2 * cos + x1 * sin
    return out


class Attention(nn.Module):
    """Causal self-attention of the query heads it is given and the kv heads they use (all of them, or a
    tensor-parallel rank's share: the plain linears are built full-size, and the plan swaps in this rank's shard).

    rotary_pairs: q and k heads are stored in pair order (``after_loading`` permutes the loaded rows) and rotated
    by one complex multiply (rope.apply_rotary_pairs); cos/sin then come half-width. Else HF's rotate-half, on the
    first cos.shape[-1] dims of each head (partial rotary); a layer handed no cos/sin (NoPE) does not rotate.

    The entry's traits pick the rest: q/k norms per head (RMSNorm, or the Gemma family's UpcastRMSNorm), or over
    the whole projection (`qk_norms` given by the loader: OLMo 2's ShardedRMSNorm, built for this rank's rows); the
    attention function (ragged SDPA, or transformers' eager path with the config's soft-cap)."""

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        kv_head_index: torch.Tensor | None = None,
        rotary_pairs: bool = False,
        qk_norms: tuple[nn.Module, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if rotary_pairs and config.qk_norm:  # the norm would sum each head's squares in another order
            raise ValueError("q/k norm needs the checkpoint's rotate-half order")
        if rotary_pairs and config.rotary_dim != config.head_dim:
            raise ValueError("partial rotary needs the checkpoint's rotate-half order")
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        # Local kv head of each local query head, where the query heads do not map onto the kv heads in uniform
        # groups (kv heads replicated across more ranks than there are kv heads); None: SDPA's GQA grouping.
        self.kv_head_index = kv_head_index
        self.rotary_pairs = rotary_pairs
        self.rotary_in_float32 = config.rotary_in_float32
        self.scale = config.attention_scale
        self.window = config.sliding_windows[layer_idx]
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        self.qk_norm_whole = config.qk_norm and config.qk_norm_scope == "projection"
        if self.qk_norm_whole and qk_norms is None:
            raise ValueError("q/k norms over the whole projection are built by the loader for this rank's rows")
        if qk_norms is None and config.qk_norm:
            qk_norms = (head_norm(config), head_norm(config))
        self.q_norm, self.k_norm = qk_norms or (None, None)
        # Regional compilation swaps in a compiler-disabled copy: the host-driven loop over sequences stays eager.
        self.attention_fn = (
            functools.partial(eager_attention, softcap=config.attention_softcap)
            if config.attention == "eager"
            else ragged_attention
        )

    @torch.no_grad()
    def after_loading(self) -> None:
        """With rotary_pairs, put the loaded q and k rows (this module's heads) in pair order."""
        if not self.rotary_pairs:
            return
        qk_rows = (self.num_heads + self.num_kv_heads) * self.head_dim  # q then k heads lead the fused output
        for p in (self.qkv_proj.weight, self.qkv_proj.bias):
            if p is not None:
                p.data[:qk_rows] = to_pair_order(p.data[:qk_rows], self.head_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: RaggedBatch, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden], or [R, hidden] for the token indices `rows` (keys and values still of all T)."""
        t = x.shape[0]
        q_size = self.num_heads * self.head_dim
        hq, hkv = self.num_heads, self.num_kv_heads
        d = self.head_dim
        qkv = self.qkv_proj(x).view(t, hq + 2 * hkv, d)
        v = qkv[:, hq + hkv :]
        if cos is None:  # a NoPE layer
            rope = None
        elif self.rotary_pairs:
            rope = apply_rotary_pairs
        elif cos.shape[-1] < d:  # partial rotary: the leading cos.shape[-1] dims of each head
            rope = functools.partial(apply_partial_rotary, rotary=rotate)
        else:
            rope = rotate
        if rope is not None and self.rotary_in_float32 and x.dtype != torch.float32:
            rope = functools.partial(_rotate_in_float32, rope)
        if self.q_norm is None:
            # q and k heads are adjacent in the fused output: one rotary pass over both
            qk = qkv[:, : hq + hkv] if rope is None else rope(qkv[:, : hq + hkv], cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
        else:
            if self.qk_norm_whole:  # over each projection's rows, before the heads split: [T, H * D]
                q = self.q_norm(qkv[:, :hq].reshape(t, hq * d)).view(t, hq, d)
                k = self.k_norm(qkv[:, hq : hq + hkv].reshape(t, hkv * d)).view(t, hkv, d)
            else:
                q, k = self.q_norm(qkv[:, :hq]), self.k_norm(qkv[:, hq : hq + hkv])
            if rope is not None:
                q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.kv_head_index is not None:
            k, v = k.index_select(1, self.kv_head_index), v.index_select(1, self.kv_head_index)
        cached = getattr(batch, "cached_kv", None)
        if cached is not None:  # a prefix cache's rows (model/runtime/prefix_cache.py): keys and values only
            k, v = cached.extend(self.layer_idx, k, v)  # [T + C, H, D]
        out = self.attention_fn(q, k, v, batch, self.scale, self.window).reshape(t, q_size)  # [T, Hq_local * D]
        return self.o_proj(out if rows is None else out.index_select(0, rows))


def _rotate_in_float32(rope: Callable, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rope` on x upcast to float32 (cos/sin float32 tables), cast back: transformers' order where the tables stay
    float32 and q * cos promotes (OLMo 2)."""
    return rope(x.float(), cos, sin).to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """A norm of `dim` features as the entry declares its norms: Llama's RMSNorm, or one that scales in float32
    by (offset + w) and casts last (Gemma's (1 + w), OLMo 2's)."""
    if config.norm_upcast:
        return UpcastRMSNorm(dim, config.rms_norm_eps, config.norm_weight_offset)
    return RMSNorm(dim, config.rms_norm_eps)


def head_norm(config: ModelConfig) -> nn.Module:
    """A per-head q/k norm (Qwen3's RMSNorm, Gemma 3's (1 + w))."""
    return make_norm(config, config.head_dim)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused in one matmul; act is layers.ACTIVATIONS[hidden_act] (SiLU,
    Gemma's gelu-tanh)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.act = act
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, intermediate] each
        # invariance.activation: each row's bits as the row has them alone (model/runtime/invariance.py)
        activated = invariance.activation(self.act, gate, per_thread_grain=self.act is gelu_tanh)
        return self.down_proj(activated.mul_(up))  # in place: one [T, intermediate] buffer fewer


# --- Eager attention with soft-capping (Gemma 2), classifier pooling ---

# Largest attention-score tensor one eager call builds, in bytes: longer sequences split their heads across calls
# (each head's scores are [n, n]; splitting heads keeps the bits, splitting query rows does not).
EAGER_SCORES_BYTES = 1 << 30


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: RaggedBatch,
    scale: float,
    window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention as transformers' ``eager_attention_forward`` of Gemma 2 computes it, with its bits, one
    sequence at a time (never across a boundary): scores = q k^T * scale, soft-capped (tanh(s / cap) * cap) when
    `softcap` is set, masked (causal, and the sliding window: a token sees itself and window-1 earlier ones) with
    the dtype's minimum, softmax in float32, cast back, times v. q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D].

    SDPA has no soft-cap and neither has torch's flash varlen (torch 2.13), so this is the path of soft-capped
    models on every device; transformers itself runs Gemma 2 eagerly (its SDPA support is off). Its cost is the full
    [H, n, n] score matrix per sequence, as in transformers; above ``EAGER_SCORES_BYTES`` the heads are split
    across calls. Same signature as ``ragged_attention`` plus `softcap` (bind it with functools.partial)."""
    out = q.new_empty(q.shape)
    group = q.shape[1] // k.shape[1]
    min_value = torch.finfo(q.dtype).min
    for s, e in zip(batch.bounds[:-1], batch.bounds[1:]):
        n = e - s
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, n, D] views
        if group > 1:  # transformers' repeat_kv: each kv head copied for its query heads, [1, Hq, n, D]
            ks, vs = (t[:, :, None].expand(-1, -1, group, -1, -1).flatten(1, 2) for t in (ks, vs))
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        hidden = j > i if not window else (j > i) | (j <= i - window)  # [n, n]
        heads_per_call = max(1, EAGER_SCORES_BYTES // (n * n * 4))
        o = out[s:e].transpose(0, 1)  # [Hq, n, D] view of this sequence's output rows
        for h in range(0, q.shape[1], heads_per_call):
            heads = slice(h, h + heads_per_call)
            scores = torch.matmul(qs[:, heads], ks[:, heads].transpose(2, 3)).mul_(scale)  # [1, h, n, n]
            if softcap is not None:
                scores.div_(softcap).tanh_().mul_(softcap)
            scores.masked_fill_(hidden, min_value)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            o[heads] = torch.matmul(probs, vs[:, heads])[0]
    return out


def classifier_rows(tokens: torch.Tensor, batch: RaggedBatch, pad_token_id: int | None) -> torch.Tensor:
    """int64 [B]: the packed row whose hidden state a *ForSequenceClassification head scores, per sequence, as
    transformers' ``GenericForSequenceClassification`` picks it for that sequence alone: the last token that is not
    `pad_token_id` (its argmax over position * (token != pad)), hence the first token when every token is padding;
    the last token when the config has no pad_token_id (transformers allows that for a batch of one only; a ragged
    batch never pads, so every sequence is such a batch). tokens: int64 [T]."""
    last = batch.offsets[1:] - 1
    if pad_token_id is None:
        return last
    positions = batch.positions()
    keyed = torch.where(tokens.to(positions.device) != pad_token_id, positions, torch.zeros_like(positions))
    lens = torch.tensor(batch.seq_lens, device=positions.device)
    seq = torch.repeat_interleave(torch.arange(len(lens), device=positions.device), lens)  # [T]: its sequence
    best = torch.zeros(len(lens), dtype=positions.dtype, device=positions.device).scatter_reduce_(0, seq, keyed, "amax")
    return batch.offsets[:-1] + best
