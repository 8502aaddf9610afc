"""A PyTorch re-creation of MAX's ``max.nn.transformer.distributed_transformer``, SPMD style.

MAX drives every device from one process: its layers take *lists* of per-device tensors and ``devices`` lists
every device. PyTorch's way, used here, is one process per device in a ``torch.distributed`` group; each process
holds its shard and runs the same program. The mapping:

==============================  ===================================================================
MAX                             here (per process)
==============================  ===================================================================
``devices: list[DeviceRef]``    ``parallel: ParallelContext`` (rank, world size, group, this rank's
                                device)
per-device lists ``xs``         a sequence holding this rank's tensor (length 1); the other ranks
                                hold theirs in their own processes
``signal_buffers``, Allreduce   ``torch.distributed`` collectives on ``parallel.group`` (NCCL/gloo),
                                issued inside ``RowParallelLinear`` and the vocab-parallel layers
``ShardingStrategy`` / shard()  each architecture's TP plan (module name -> colwise / rowwise / vocab
                                style, model/families/architectures.py), applied by ``model/families/tp.py``
``*_shards`` of replicated      the replicated module itself (norms are replicated)
norms
``VocabParallelEmbedding``,     ``layers.VocabParallelEmbedding``; ``VocabParallelLMHead`` whose
``ColumnParallelLinear`` head   ``gather`` assembles full logits only when asked for
``kv_collections``, KV cache    none: this server scores whole prompts (prefill only)
``use_subgraphs`` /             regional compilation: one ``torch.compile``d block function per layer
``subgraph_layer_groups``       group, reused for every layer of the group
``return_n_logits``             an int or 1-element tensor, as MAX
==============================  ===================================================================

``distributed_logits_postprocess`` keeps MAX's return order ``(last_logits, [logits, offsets],
[hidden_states])`` with one deliberate fix: in ``VARIABLE`` mode a sequence shorter than ``n`` returns only its
own rows and the offsets follow the real counts (MAX would read a neighbour's rows).

The model's serving surface is vLLM's: ``trunk`` (tokens -> hidden states), ``compute_logits`` (hidden rows ->
logits) and model/families/loader.py's ``load_checkpoint``. MAX's call and the serving path (model/runtime/runner.py) get their
logits from the same function, ``hidden_to_logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from model.families.architectures import GLOBAL_ROPE
from model.distributed import ParallelContext
from model.errors import Cancelled
from model.layers.base import embedding_scale
from model.layers.modules import RaggedBatch, classifier_rows
from model.runtime.outputs import ReturnHiddenStates, ReturnLogits
from model.layers.rope import RotaryEmbedding

__all__ = [
    "DistributedLogitsPostprocessMixin",
    "DistributedTransformer",
    "DistributedTransformerBlock",
    "ReturnHiddenStates",
    "ReturnLogits",
    "ShardableCallable",
    "distributed_logits_postprocess",
    "forward_sharded_layers",
    "hidden_to_logits",
    "take",
]


def take(it: Iterable[Any], n: int) -> list[Any]:
    """Return the next *n* items from *it* as a list."""
    return list(islice(it, n))


@runtime_checkable
class ShardableCallable(Protocol):
    """A layer that maps one tensor to one tensor and that the tp plan can shard (or replicate)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def forward_sharded_layers(
    layers: Sequence[Callable[[torch.Tensor], torch.Tensor]], xs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Apply layers[i] to xs[i]. Raises AssertionError when the counts differ (as MAX does)."""
    assert len(xs) == len(layers), f"Number of layers ({len(layers)}) must match number of inputs ({len(xs)})"
    return [layer(x) for layer, x in zip(layers, xs, strict=True)]


def _n(return_n_logits: int | torch.Tensor) -> int:
    return int(return_n_logits.reshape(-1)[0]) if isinstance(return_n_logits, torch.Tensor) else int(return_n_logits)


def hidden_to_logits(
    rows_h: Sequence[torch.Tensor],
    norm_shards: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    lm_head: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
    logits_scaling: float = 1.0,
    logits_softcap: float | None = None,
) -> torch.Tensor:
    """The one place logits come from hidden rows: the final norm, the head, float32, then division by
    ``logits_scaling`` (Granite) and the soft-cap ``tanh(x / cap) * cap``.

    rows_h: per-device un-normalized [R, hidden]; lm_head maps per-device normalized rows to per-device logits,
    fresh tensors (they are scaled in place). Returns the first device's float32 logits [R, V]."""
    logits = lm_head(forward_sharded_layers(norm_shards, list(rows_h)))[0].float()
    if logits_scaling != 1.0:
        logits.div_(logits_scaling)
    if logits_softcap:
        logits.div_(logits_softcap).tanh_().mul_(logits_softcap)
    return logits


def distributed_logits_postprocess(
    h: Sequence[torch.Tensor],
    input_row_offsets: Sequence[torch.Tensor],
    return_n_logits: int | torch.Tensor,
    norm_shards: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    lm_head: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
    return_logits: ReturnLogits,
    return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
    logits_scaling: float = 1.0,
    logits_softcap: float | None = None,
    last_token_indices: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """MAX's postprocessing of the final hidden states.

    h: per-device [T, hidden] (un-normalized); input_row_offsets: per-device int64 [B+1]; lm_head maps normalized
    per-device rows to full-vocabulary logits. Returns ``(last_logits [B, V] f32, [logits [R, V] f32, offsets
    [B+1] i64], [hidden_states])``. last_token_indices: per-device int64 [B], the row of each sequence that
    `last_logits` and the LAST hidden states read (default: its last token; a classifier's pooled row).
    """
    if last_token_indices is None:
        last_token_indices = [offsets[1:] - 1 for offsets in input_row_offsets]
    last_token_h = [hd.index_select(0, idx) for hd, idx in zip(h, last_token_indices, strict=True)]

    def to_logits(rows_h: list[torch.Tensor]) -> torch.Tensor:
        return hidden_to_logits(rows_h, norm_shards, lm_head, logits_scaling, logits_softcap)

    last_logits = to_logits(last_token_h)
    ret: tuple[torch.Tensor, ...] = (last_logits,)

    if return_logits == ReturnLogits.VARIABLE and h:
        n = _n(return_n_logits)
        offsets0 = input_row_offsets[0]
        lengths = offsets0[1:] - offsets0[:-1]
        counts = lengths.clamp(max=n)  # the fix: never reach into the previous sequence
        logit_offsets = torch.zeros_like(offsets0)
        logit_offsets[1:] = torch.cumsum(counts, 0)
        # Row r of sequence b is token offsets[b+1] - counts[b] + (r - logit_offsets[b])
        seq_of_row = torch.repeat_interleave(torch.arange(len(counts), device=offsets0.device), counts)
        within = torch.arange(int(logit_offsets[-1]), device=offsets0.device) - logit_offsets[seq_of_row]
        indices = offsets0[1:][seq_of_row] - counts[seq_of_row] + within
        ret += (to_logits([hd.index_select(0, indices.to(hd.device)) for hd in h]), logit_offsets)
    elif return_logits == ReturnLogits.ALL and h:
        ret += (to_logits(list(h)), input_row_offsets[0])

    if return_hidden_states == ReturnHiddenStates.ALL:
        ret += tuple(h)
    elif return_hidden_states == ReturnHiddenStates.LAST:
        ret += tuple(last_token_h)
    elif return_hidden_states == ReturnHiddenStates.ALL_NORMALIZED:
        ret += tuple(forward_sharded_layers(norm_shards, list(h)))
    elif return_hidden_states == ReturnHiddenStates.LAST_NORMALIZED:
        ret += tuple(forward_sharded_layers(norm_shards, last_token_h))
    return ret


class DistributedLogitsPostprocessMixin:
    """Logits postprocessing for sharded models. Requires ``norm_shards``, ``lm_head``, ``return_logits``;
    optional ``return_hidden_states``, ``logits_scaling``, ``logits_softcap``."""

    norm_shards: Sequence[Callable[[torch.Tensor], torch.Tensor]]
    return_logits: ReturnLogits
    return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE
    logits_scaling: float = 1.0
    logits_softcap: float | None = None

    def compute_logits(self, rows_h: torch.Tensor) -> torch.Tensor:
        """Un-normalized hidden rows [R, hidden] -> this rank's float32 logits [R, V_local] (``gather_logits``
        joins the ranks' columns)."""
        return hidden_to_logits([rows_h], self.norm_shards, self._local_lm_head, self.logits_scaling, self.logits_softcap)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[R, V_local] on each rank -> [R, V] on every rank (a head that is not vocab-parallel has them all)."""
        head = self.lm_head
        return head.gather(local) if hasattr(head, "gather") else local

    def _local_lm_head(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.lm_head(x) for x in xs]

    def _full_lm_head(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.gather_logits(self.lm_head(x)) for x in xs]

    def _postprocess_logits(
        self,
        h: Sequence[torch.Tensor],
        input_row_offsets: Sequence[torch.Tensor],
        return_n_logits: int | torch.Tensor,
        last_token_indices: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        return distributed_logits_postprocess(
            h,
            input_row_offsets,
            return_n_logits,
            norm_shards=self.norm_shards,
            lm_head=self._full_lm_head,
            return_logits=self.return_logits,
            return_hidden_states=self.return_hidden_states,
            logits_scaling=self.logits_scaling,
            logits_softcap=self.logits_softcap,
            last_token_indices=last_token_indices,
        )


# A block's norms by the entry's norm placement, named as checkpoints name them:
# (attention input, attention output, MLP input, MLP output); None where the placement has no norm.
NORM_SLOTS: dict[str, tuple[str | None, str | None, str | None, str | None]] = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}


class DistributedTransformerBlock(nn.Module):
    """Residual block: h = x + r * out_norm(attn(in_norm(x))), then h + r * out_norm(mlp(in_norm(h))), with the
    norms its placement has (NORM_SLOTS; absent ones are the identity): "pre" (Llama) norms each branch's input,
    "sandwich" (Gemma 2, 3) input and output, "post" (OLMo 2) the output only. r is Granite's residual multiplier.

    The all-reduce after attention and after the MLP lives in the row-parallel o/down projections the plan
    installs, so this block is the same code at every tp degree."""

    def __init__(
        self,
        attention: nn.Module,
        mlp: ShardableCallable,
        attention_norm: ShardableCallable | None = None,
        mlp_norm: ShardableCallable | None = None,
        residual_multiplier: float = 1.0,
        *,
        attention_out_norm: ShardableCallable | None = None,
        mlp_out_norm: ShardableCallable | None = None,
        norm_placement: str = "pre",
    ) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.residual_multiplier = residual_multiplier
        self.norm_slots = NORM_SLOTS[norm_placement]
        norms = (attention_norm, attention_out_norm, mlp_norm, mlp_out_norm)
        for name, norm in zip(self.norm_slots, norms, strict=True):
            if (name is None) != (norm is None):
                raise ValueError(f"norm placement {norm_placement!r} has norms {[n for n in self.norm_slots if n]}")
            if name is not None:
                self.add_module(name, norm)

    def _norm(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        name = self.norm_slots[slot]
        return x if name is None else getattr(self, name)(x)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: RaggedBatch, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [T, dim] -> [T, dim]; with `rows` (token indices) only those rows' outputs [R, dim] are computed:
        every token still contributes its keys and values, but queries' o_proj, residual and MLP run on R rows.
        cos/sin None: a layer without rotary."""
        r = self.residual_multiplier
        attn = self._norm(1, self.self_attn(self._norm(0, x), cos, sin, batch, rows))
        if rows is not None:
            x = x.index_select(0, rows)
        # The branch outputs are fresh tensors: the residual is added into them (x + attn has the same bits).
        h = (attn.mul_(r) if r != 1.0 else attn).add_(x)
        mlp = self._norm(3, self.mlp(self._norm(2, h)))
        return (mlp.mul_(r) if r != 1.0 else mlp).add_(h)


class DistributedTransformer(DistributedLogitsPostprocessMixin, nn.Module):
    """Embedding, blocks, final norm and (vocab-parallel) lm_head over ragged inputs: ``trunk`` gives hidden
    states, ``compute_logits`` their logits, ``forward`` MAX's call. model/families/loader.py builds one per architecture."""

    def __init__(
        self,
        layers: list[DistributedTransformerBlock],
        norm: ShardableCallable,
        output: nn.Module,
        embedding: nn.Module,
        parallel: ParallelContext,
        rope: RotaryEmbedding | Mapping[str, RotaryEmbedding],
        return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN,
        return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
        use_subgraphs: bool = False,
        subgraph_layer_groups: list[list[int]] | None = None,
        logits_scaling: float = 1.0,
        logits_softcap: float | None = None,
        embedding_multiplier: float = 1.0,
        rotary_pairs: bool = False,
        layer_rope: Sequence[str | None] = (),
        scale_embeddings: bool = False,
        classifier_pad_token_id: int | None = None,
        classifier: bool = False,
        rotary_in_float32: bool = False,
    ) -> None:
        """rope: the rope table maker, or several by name (rope.build_ropes); layer_rope: each layer's table name, or
        None for a layer without rotary (() : every layer the global table). rotary_pairs: the attentions rotate
        q/k stored in pair order (modules.Attention), so the cos/sin tables are handed to them half-width.
        scale_embeddings: embeddings times sqrt(hidden) rounded to their dtype (Gemma, layers.embedding_scale).
        classifier: the head is a sequence classifier's, whose last-token row is each sequence's last token that is
        not `classifier_pad_token_id` (modules.classifier_rows). rotary_in_float32: cos/sin tables stay float32
        (the attentions rotate in float32: OLMo 2)."""
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = output
        self.embed_tokens = embedding
        self.parallel = parallel
        self.ropes = dict(rope) if isinstance(rope, Mapping) else {GLOBAL_ROPE: rope}
        self.rope = self.ropes[GLOBAL_ROPE]
        self.layer_rope = tuple(layer_rope) or (GLOBAL_ROPE,) * len(layers)
        self.scale_embeddings = scale_embeddings
        self.classifier = classifier
        self.rotary_in_float32 = rotary_in_float32
        self.classifier_pad_token_id = classifier_pad_token_id
        self.return_logits = ReturnLogits(return_logits)
        self.return_hidden_states = ReturnHiddenStates(return_hidden_states)
        self.logits_scaling = logits_scaling
        self.logits_softcap = logits_softcap
        self.embedding_multiplier = embedding_multiplier
        self.use_subgraphs = use_subgraphs
        if subgraph_layer_groups is None:
            subgraph_layer_groups = [list(range(len(layers)))]
        self.subgraph_layer_groups = subgraph_layer_groups
        self._compiled_groups: dict[int, Callable] = {}
        self.rotary_pairs = rotary_pairs
        # Asked before each block of `trunk` (the serving runner sets it for one run): True stops the forward there
        # with `Cancelled` (its clients are gone, the server is stopping).
        self.should_stop: Callable[[], bool] | None = None

    @property
    def norm_shards(self) -> list[ShardableCallable]:
        return [self.norm]  # replicated: this rank's copy

    def _block_fn(self, idx: int) -> Callable:
        """The callable that runs layer idx: eager, or its group's compiled block (regional compilation)."""
        if not self.use_subgraphs:
            return self.layers[idx]
        for g, group in enumerate(self.subgraph_layer_groups):
            if idx in group:
                if g not in self._compiled_groups:
                    for i in group:  # each layer's attention function (ragged SDPA or eager) stays out of the graph
                        attn = self.layers[i].self_attn
                        attn.attention_fn = _compiler_disabled(attn.attention_fn)
                    # One compiled function per group; each layer of the group passes itself in, so the same
                    # graph is reused with that layer's parameters as inputs.
                    self._compiled_groups[g] = torch.compile(DistributedTransformerBlock.forward, dynamic=True)
                fn = self._compiled_groups[g]
                layer = self.layers[idx]
                return lambda *args, _fn=fn, _layer=layer: _fn(_layer, *args)
        return self.layers[idx]

    def trunk(
        self,
        tokens: torch.Tensor,
        batch: RaggedBatch,
        capture: dict[int, torch.Tensor] | None = None,
        depth: int | None = None,
        final_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """tokens [T] -> un-normalized hidden states [T, dim] after block `depth` (default: the last); `capture` maps a
        hidden-state layer (0 = embeddings, i = output of block i) to the token rows to keep from it.

        Serving shortcuts (the outputs asked for are unchanged): blocks after `depth` do not run, and with
        `final_rows` the block `depth` computes only those token rows' outputs (it returns [R, dim] in that order and
        `capture[depth]` then indexes into final_rows): a last-token batch skips the last block's o_proj and MLP
        for every other token."""
        capture = capture or {}
        depth = len(self.layers) if depth is None else depth
        captured: dict[int, torch.Tensor] = {}
        h = self.embed_tokens(tokens)
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        if self.scale_embeddings:
            h = h * embedding_scale(h.shape[-1], h.dtype)
        positions = batch.positions()
        tables: dict[str | None, tuple[torch.Tensor | None, torch.Tensor | None]] = {None: (None, None)}
        for name in set(self.layer_rope[:depth]) - {None}:
            table_dtype = torch.float32 if self.rotary_in_float32 else h.dtype
            cos, sin = self.ropes[name](positions, batch.seq_lens, table_dtype)  # [T, rotary_dim]
            if self.rotary_pairs:  # q/k in pair order: the two halves of each table are equal
                half = cos.shape[-1] // 2
                cos, sin = cos[:, :half], sin[:, :half]
            tables[name] = (cos, sin)
        if 0 in capture:
            captured[0] = h.index_select(0, capture[0])
        for i in range(depth):
            if self.should_stop is not None and self.should_stop():
                raise Cancelled(f"stopped before block {i} of {depth}")
            cos, sin = tables[self.layer_rope[i]]
            h = self._block_fn(i)(h, cos, sin, batch, final_rows if i + 1 == depth else None)
            if i + 1 in capture:
                captured[i + 1] = h.index_select(0, capture[i + 1])
        return h, captured

    def forward(
        self, tokens: torch.Tensor, input_row_offsets: torch.Tensor, return_n_logits: int | torch.Tensor = 1
    ) -> tuple[torch.Tensor, ...]:
        """MAX's call: returns ``(last_logits, [logits, offsets], [hidden_states])``."""
        device = self.parallel.device
        batch = RaggedBatch.from_offsets(input_row_offsets, device)
        tokens = tokens.to(device)
        h, _ = self.trunk(tokens, batch)
        pooled = [classifier_rows(tokens, batch, self.classifier_pad_token_id)] if self.classifier else None
        return self._postprocess_logits([h], [batch.offsets], return_n_logits, pooled)


def _compiler_disabled(fn: Callable) -> Callable:
    """`fn` kept out of compiled graphs (the host-driven loop over sequences runs eagerly); one wrapper per function,
    so layers that share a function share its wrapper."""
    key = getattr(fn, "func", fn), tuple(sorted(getattr(fn, "keywords", {}).items()))
    if key not in _DISABLED:
        _DISABLED[key] = torch.compiler.disable(fn)
    return _DISABLED[key]


_DISABLED: dict = {}
