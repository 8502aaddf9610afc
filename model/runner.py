"""The serving path: one forward of the trunk for a ragged batch whose sequences each ask for different outputs.

The final norm and lm_head run only on rows some sequence needs. Target log-probabilities and top-k are computed
on the device from the vocab-parallel logits (distributed max / log-sum-exp, local top-k merged across ranks);
full rows are gathered across ranks only for sequences that asked for full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import invariance
from .config import ModelConfig
from .distributed import ParallelContext
from .distributed_transformer import DistributedTransformer
from .memory import retain_freed_memory
from .modules import RaggedBatch
from .outputs import OutputSpec, SequenceOutput
from .tp import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` is the checkpoint's dtype on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(config.torch_dtype, torch.float32) if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class _RowPlan:
    """Host-side index bookkeeping for one batch."""

    vocab_rows: list[int]  # packed token index of every row that needs the lm_head
    vocab_slices: list[tuple[int, int]]  # per sequence: (start, count) into vocab_rows
    targets: list[int]  # next token id for each vocab row, -1 for a sequence's last position
    hidden_rows: dict[int, list[int]]  # hidden-state layer -> packed token indices to capture
    hidden_slices: list[list[tuple[int, int, int]]]  # per sequence: (layer, start, count) into hidden_rows[layer]


class ModelRunner:
    def __init__(
        self,
        model: DistributedTransformer,
        config: ModelConfig,
        parallel: ParallelContext,
        dtype: torch.dtype,
        batch_invariant: bool = False,
    ):
        self.model = model
        self.config = config
        self.parallel = parallel
        self.dtype = dtype
        # A sequence's outputs are the same bits whatever shares its batch (model/invariance.py).
        self.batch_invariant = batch_invariant

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        parallel: ParallelContext | None = None,
        retain_memory: bool = True,
        batch_invariant: bool | None = None,
        **model_kwargs,
    ) -> ModelRunner:
        """retain_memory: on CPU, keep freed activations in the process for the next batch (see model/memory.py;
        10-18% faster forwards, at the price of holding the peak working set).

        batch_invariant: every output of a sequence is the same bits whatever else shares its batch and wherever it
        sits there (model/invariance.py); None: on for CPU float32, off elsewhere; True on CUDA is refused."""
        config = ModelConfig.from_pretrained(checkpoint)
        parallel = parallel or ParallelContext.single(device)
        if retain_memory and parallel.device.type == "cpu":
            retain_freed_memory()
        torch_dtype = resolve_dtype(dtype, config, parallel.device)
        invariant = invariance.resolve(batch_invariant, parallel.device, torch_dtype)
        if invariant:
            parallel = replace(parallel, sum_in_rank_order=True)
        model = load_model(str(checkpoint), config, parallel, torch_dtype, **model_kwargs)
        return cls(model, config, parallel, torch_dtype, batch_invariant=invariant)

    def _plan(self, input_ids: list[int], bounds: Sequence[int], specs: Sequence[OutputSpec]) -> _RowPlan:
        plan = _RowPlan([], [], [], {}, [])
        for b, spec in enumerate(specs):
            start, end = bounds[b], bounds[b + 1]
            n = end - start
            if spec.needs_vocab:
                rows = spec.logit_rows(n)
                plan.vocab_slices.append((len(plan.vocab_rows), len(rows)))
                plan.vocab_rows.extend(start + p for p in rows)
                plan.targets.extend(input_ids[start + p + 1] if p + 1 < n else -1 for p in rows)
            else:
                plan.vocab_slices.append((len(plan.vocab_rows), 0))
            slices: list[tuple[int, int, int]] = []
            hrows = spec.hidden_rows(n)
            if len(hrows):
                for layer in self.config.resolve_layers(spec.layers):
                    kept = plan.hidden_rows.setdefault(layer, [])
                    slices.append((layer, len(kept), len(hrows)))
                    kept.extend(start + p for p in hrows)
            plan.hidden_slices.append(slices)
        return plan

    def _prune(self, plan: _RowPlan, num_tokens: int) -> tuple[int, list[int] | None]:
        """The deepest block any output needs, and the token rows of its output that are needed (None: all).

        Rewrites the plan's row indices at that depth to index into those rows."""
        depth = self.config.num_layers if plan.vocab_rows else max(plan.hidden_rows, default=0)
        if depth == 0:
            return 0, None
        needed = set(plan.hidden_rows.get(depth, []))
        if depth == self.config.num_layers:
            needed.update(plan.vocab_rows)
        if len(needed) == num_tokens:
            return depth, None
        final_rows = sorted(needed)
        where = {row: i for i, row in enumerate(final_rows)}
        if depth == self.config.num_layers:
            plan.vocab_rows = [where[row] for row in plan.vocab_rows]
        if depth in plan.hidden_rows:
            plan.hidden_rows[depth] = [where[row] for row in plan.hidden_rows[depth]]
        return depth, final_rows

    # Rows per chunk when no full logits are wanted: one [chunk, vocab] float32 block (100 MB for a 49k vocabulary)
    # at a time, exponentiated in place, instead of a [R, vocab] tensor and its exp() temporary (GBs for long
    # batches); the allocator keeps the freed block for the next chunk (model/memory.py). 512 rows keep the lm_head
    # matmul efficient (the weight is re-read once per chunk).
    SCORE_CHUNK_ROWS = 512

    def _logits(self, rows_h: torch.Tensor) -> torch.Tensor:
        """Local logits [R, V_local] in float32 of the (un-normalized) hidden rows, after scaling and soft-capping."""
        model = self.model
        local = model.lm_head(model.norm(rows_h)).float()  # a fresh tensor: scaled and capped in place
        if model.logits_scaling != 1.0:
            local.div_(model.logits_scaling)
        if model.logits_softcap:
            local.div_(model.logits_softcap).tanh_().mul_(model.logits_softcap)
        return local

    def _log_sum_exp(self, logits: torch.Tensor, in_place: bool, again: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """float32 [R]: log-sum-exp of each row of the float32 logits [R, V] (exponentiated in place when asked).

        Without the max shift: two passes over [R, V] instead of four. Logits stay far inside exp's float32 range in
        practice; a row whose sum overflows (a logit above ~88) or falls so low that denormal terms could matter
        (below 2^-60, so the largest term is under 2^-78) is redone with the shift on `again(rows)`, its logits
        afresh. One formula whatever the batch asks: full logits or not, a row gets the same bits."""
        sums = (logits.exp_() if in_place else torch.exp(logits)).sum(dim=-1)
        unsafe = ~(torch.isfinite(sums) & (sums >= 2.0**-60))
        lse = sums.log_()
        if unsafe.any():
            redo = unsafe.nonzero().squeeze(1).tolist()
            count = len(redo)
            if self.batch_invariant:  # the redo's lm_head and log-sum-exp run on whole row groups too
                redo = invariance.pad_rows(redo)
            index = torch.tensor(redo, device=logits.device)
            lse[index[:count]] = torch.logsumexp(again(index), dim=-1)[:count]
        return lse

    def _top_k(self, local: torch.Tensor, row_k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k values [R, k_max] and ids of the (vocab-parallel) local logits, each row as its own k (row_k)
        gives it."""
        top = self._merged_top_k if self.parallel.is_distributed else self._local_top_k
        values, ids = top(local, min(k_max + 1, self.config.vocab_size))
        return invariance.top_k_as_alone(values, ids, row_k, k_max, lambda rows, k: top(local.index_select(0, rows), k))

    @staticmethod
    def _local_top_k(local: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return local.topk(k, dim=-1)

    def _merged_top_k(self, local: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over the whole vocabulary: each rank's local top-k, gathered and merged."""
        ctx, head = self.parallel, self.model.lm_head
        k_local = min(k, head.vocab.size)
        values, ids = local.topk(k_local, dim=-1)
        ids = ids + head.vocab.start
        if k_local < k:  # pad so that every rank sends [R, k]
            pad = k - k_local
            values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
        values = ctx.all_gather_uneven(values, [k] * ctx.world_size, dim=1)
        ids = ctx.all_gather_uneven(ids, [k] * ctx.world_size, dim=1)
        values, order = values.topk(k, dim=-1)
        return values, ids.gather(1, order)

    def _reduce(
        self, local: torch.Tensor, targets: torch.Tensor | None, row_k: torch.Tensor, k_max: int
    ) -> dict[str, torch.Tensor]:
        """Target log-probs and top-k (k_max columns; row_k int64 [R]: each row's own k) of local logit rows
        (log-sum-exp and top-k merged across vocab shards)."""
        ctx, head = self.parallel, self.model.lm_head
        out: dict[str, torch.Tensor] = {}
        if ctx.is_distributed:
            m = local.max(dim=-1).values
            ctx.all_reduce(m, dist.ReduceOp.MAX)
            sum_exp = torch.exp(local - m[:, None]).sum(dim=-1)
            ctx.all_reduce(sum_exp)
            lse = m + torch.log(sum_exp)
        else:
            lse = self._log_sum_exp(local, in_place=False, again=lambda rows: local.index_select(0, rows))
        vstart, vsize = head.vocab.start, head.vocab.size
        if targets is not None:
            local_t = targets - vstart
            mine = (local_t >= 0) & (local_t < vsize)
            picked = local.gather(1, local_t.clamp(0, vsize - 1)[:, None]).squeeze(1)
            target_logit = torch.where(mine, picked, torch.zeros_like(picked))
            ctx.all_reduce(target_logit)
            logprobs = target_logit - lse
            out["target_logprobs"] = torch.where(targets >= 0, logprobs, torch.full_like(logprobs, float("nan")))
        if k_max:
            values, ids = self._top_k(local, row_k, k_max)
            out["top_k_ids"] = ids
            out["top_k_logprobs"] = values - lse[:, None]
        return out

    def _reduce_inplace(self, rows_h, targets, row_k: torch.Tensor, k_max: int) -> dict[str, torch.Tensor]:
        """`_reduce` on one process: the float32 logits chunk is exponentiated in place (no second [R, V] tensor)."""
        buf = self._logits(rows_h)  # [R, V]; freed memory is kept for the next chunk (model/memory.py)
        out: dict[str, torch.Tensor] = {}
        picked = buf.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) if targets is not None else None
        top = self._top_k(buf, row_k, k_max) if k_max else None  # before exp_ overwrites the logits
        lse = self._log_sum_exp(buf, in_place=True, again=lambda rows: self._logits(rows_h.index_select(0, rows)))
        if picked is not None:
            logprobs = picked - lse
            out["target_logprobs"] = torch.where(targets >= 0, logprobs, torch.full_like(logprobs, float("nan")))
        if top is not None:
            out["top_k_ids"] = top[1]
            out["top_k_logprobs"] = top[0] - lse[:, None]
        return out

    def _vocab_outputs(self, h: torch.Tensor, plan: _RowPlan, specs: Sequence[OutputSpec]) -> dict[str, torch.Tensor]:
        """Logits-derived tensors for the vocab rows, on the CPU."""
        dev = h.device
        rows, row_targets = plan.vocab_rows, plan.targets
        flags = [s.logits for s, (_, c) in zip(specs, plan.vocab_slices) for _ in range(c)]
        ks = [s.top_k for s, (_, c) in zip(specs, plan.vocab_slices) for _ in range(c)]
        if self.batch_invariant:  # whole row groups for the lm_head; the extra rows' results are not read
            fill = invariance.padded_count(len(rows)) - len(rows)
            rows, row_targets = invariance.pad_rows(rows), row_targets + [-1] * fill
            flags, ks = flags + [False] * fill, ks + [0] * fill
        every_row = rows == list(range(h.shape[0]))  # every row, in order: no gather copy of h
        row_index = None if every_row else torch.tensor(rows, device=dev)
        row_k, k_max = torch.tensor(ks, dtype=torch.int64, device=dev), max(ks, default=0)
        targets = torch.tensor(row_targets, device=dev) if any(s.target_logprobs for s in specs) else None
        out: dict[str, torch.Tensor] = {}

        if not any(flags):
            # Scores only (perplexity, top-k): the lm_head runs in row chunks, no [R, vocab] tensor exists.
            # SCORE_CHUNK_ROWS is a multiple of invariance.ROW_MULTIPLE: chunks keep whole row groups.
            n, step = len(rows), self.SCORE_CHUNK_ROWS
            head = self.model.lm_head
            inplace = not self.parallel.is_distributed and head.weight.dtype == torch.float32
            parts: dict[str, list[torch.Tensor]] = {}
            for s in range(0, n, step):
                e = min(n, s + step)
                rows_h = h[s:e] if every_row else h.index_select(0, row_index[s:e])
                tgt = None if targets is None else targets[s:e]
                if inplace:
                    got = self._reduce_inplace(rows_h, tgt, row_k[s:e], k_max)
                else:
                    got = self._reduce(self._logits(rows_h), tgt, row_k[s:e], k_max)
                for key, t in got.items():
                    parts.setdefault(key, []).append(t)
            return {key: torch.cat(ts).cpu() for key, ts in parts.items()}

        local = self._logits(h if every_row else h.index_select(0, row_index))  # [R, V_local]
        if targets is not None or k_max:
            out.update({key: t.cpu() for key, t in self._reduce(local, targets, row_k, k_max).items()})
        want_full = torch.tensor(flags, dtype=torch.bool, device=dev)
        # All rows wanted (the common case): the logits tensor itself (less the padding rows, which come last), not
        # a [R, V] copy of it.
        real = len(plan.vocab_rows)
        full = local[:real] if all(flags[:real]) else local.index_select(0, want_full.nonzero().squeeze(1))
        out["logits"] = self.model.lm_head.gather(full).cpu()
        out["logits_row_index"] = torch.cumsum(want_full.long(), 0).cpu() - 1  # vocab row -> row of out["logits"]
        return out

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, input_row_offsets: torch.Tensor, specs: Sequence[OutputSpec]) -> list[SequenceOutput]:
        """input_ids int64 [T] packed; input_row_offsets int64 [B+1]; one OutputSpec per sequence.

        With tp > 1 every rank calls this with the same arguments and gets the same outputs."""
        if len(specs) != len(input_row_offsets) - 1:
            raise ValueError("one OutputSpec per sequence is needed")
        dev = self.parallel.device
        batch = RaggedBatch.from_offsets(input_row_offsets, dev)
        if min(batch.seq_lens) < 1:
            raise ValueError("empty sequence")
        plan = self._plan(input_ids.tolist(), batch.bounds, specs)
        depth, final_rows = self._prune(plan, batch.num_tokens)
        if self.batch_invariant:
            # Every matmul gets a multiple of invariance.ROW_MULTIPLE rows: a filler sequence after the real ones
            # (nothing reads its rows) and copies of the last row in the last block's row subset.
            input_ids, input_row_offsets = invariance.pad_batch(input_ids, input_row_offsets)
            batch = RaggedBatch.from_offsets(input_row_offsets, dev)
            final_rows = None if final_rows is None else invariance.pad_rows(final_rows)
        capture = {layer: torch.tensor(rows, device=dev) for layer, rows in plan.hidden_rows.items()}
        final = None if final_rows is None else torch.tensor(final_rows, device=dev)
        h, captured = self.model.trunk(input_ids.to(dev), batch, capture, depth=depth, final_rows=final)
        vocab = self._vocab_outputs(h, plan, specs) if plan.vocab_rows else {}
        captured_cpu = {layer: t.cpu() for layer, t in captured.items()}

        outputs = []
        for b, spec in enumerate(specs):
            n = batch.seq_lens[b]
            positions = torch.tensor(list(spec.logit_rows(n)), dtype=torch.int64)
            seq = SequenceOutput(positions=positions)
            start, count = plan.vocab_slices[b]
            if count:
                if spec.logits:
                    first = int(vocab["logits_row_index"][start])
                    seq.logits = vocab["logits"][first : first + count]
                if spec.target_logprobs:
                    seq.target_logprobs = vocab["target_logprobs"][start : start + count]
                if spec.top_k:
                    seq.top_k_ids = vocab["top_k_ids"][start : start + count, : spec.top_k]
                    seq.top_k_logprobs = vocab["top_k_logprobs"][start : start + count, : spec.top_k]
            if plan.hidden_slices[b]:
                stacked = torch.stack([captured_cpu[layer][s : s + c] for layer, s, c in plan.hidden_slices[b]])
                if spec.return_hidden_states.normalized:
                    stacked = self.model.norm(stacked.to(dev)).cpu()
                seq.hidden_states = stacked
                seq.hidden_positions = torch.tensor(list(spec.hidden_rows(n)), dtype=torch.int64)
                seq.layers = tuple(layer for layer, _, _ in plan.hidden_slices[b])
            outputs.append(seq)
        return outputs
