"""Per-row scores of logits (target log-probabilities, top-k, log-probabilities at chosen ids, target ranks,
entropy) reduced across the vocabulary shards.

One reducer serves every caller: a chunk of hidden rows comes in, its float32 logits [R, V_local] are the only
vocabulary-wide tensor, and each score leaves as a per-row tensor. Scores that read the raw logits (a target's
logit, the local top-k) are taken first, then the log-sum-exp over the whole vocabulary (maximum and sum merged
across ranks), then what is relative to it. A new score is one more field of ``RowScores``, computed in
``ScoreReducer.__call__`` at the stage it needs, with its cross-rank reduction (sum, max, or a gather of k
candidates as top-k does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from model.runtime import invariance
from model.distributed import ParallelContext


@dataclass(frozen=True)
class ScoreAsk:
    """What a chunk of rows asks the reducer for, besides target log-probabilities (given by `targets`)."""

    top_k: int = 0
    row_top_k: torch.Tensor | None = None  # int64 [R]: each row's own k (<= top_k, 0: none); None: top_k for all
    vocab_ids: torch.Tensor | None = None  # int64 [R, n]: per row, the ids to read (-1: padding)
    target_logprobs: bool = True  # with `targets`: their log-probabilities (False: only what else reads them)
    target_ranks: bool = False  # with `targets`
    entropy: bool = False

    @classmethod
    def flags(cls) -> tuple[str, ...]:
        """The boolean asks, each named after the OutputSpec field that asks for its score (the runner sets one
        when any row's sequence asks)."""
        return tuple(f.name for f in fields(cls) if isinstance(f.default, bool))


@dataclass
class RowScores:
    """Scores of logit rows; None where not asked for."""

    target_logprobs: torch.Tensor | None = None  # float32 [R], NaN where the row has no target (-1)
    top_k_ids: torch.Tensor | None = None  # int64 [R, k]
    top_k_logprobs: torch.Tensor | None = None  # float32 [R, k]
    vocab_logprobs: torch.Tensor | None = None  # float32 [R, n]: log-softmax at the rows' chosen ids, NaN at -1
    target_ranks: torch.Tensor | None = None  # int64 [R]: 1 + entries strictly above the target; -1 without one
    entropy: torch.Tensor | None = None  # float32 [R], nats
    # Not outputs: what the target log-probability was made of, for the prefix cache to keep per cached row
    # (model/runtime/prefix_cache.py) so that a later request rebuilds it with the same subtraction.
    lse: torch.Tensor | None = field(default=None, metadata={"reused": True})  # float32 [R]: log-sum-exp
    target_logit: torch.Tensor | None = field(default=None, metadata={"reused": True})  # float32 [R]: 0 without

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        """The fields that are outputs (OUTPUT_KINDS' vocabulary kinds), not products kept for reuse."""
        return tuple(f.name for f in fields(cls) if not f.metadata.get("reused"))

    @classmethod
    def cat(cls, chunks: Sequence[RowScores]) -> RowScores:
        """The chunks' rows in order, on the CPU."""
        joined = {}
        for f in fields(cls):
            parts = [getattr(c, f.name) for c in chunks]
            joined[f.name] = None if parts[0] is None else torch.cat(parts).cpu()
        return cls(**joined)


class ScoreReducer:
    """Scores of hidden rows from their vocab-parallel logits.

    compute_logits: hidden rows [R, hidden] -> this rank's float32 logits [R, V_local], a fresh tensor;
    vocab_start: the first vocabulary id of this rank's columns; vocab_size: the whole vocabulary.

    The fast path: on one process, with float32 weights, logits this reducer computed itself are exponentiated in
    place for the log-sum-exp (no second [R, V] tensor, two passes over it instead of four); see _normalizers.

    A row's scores do not depend on the other rows of the chunk: one log-sum-exp formula whether the caller keeps
    the logits or not, and top-k as each row's own k gives it (`ScoreAsk.row_top_k`). `row_multiple`: the rows of
    an lm_head call this reducer makes itself (the log-sum-exp's redo) are padded to a multiple of it (batch
    invariance: model/runtime/invariance.py)."""

    def __init__(
        self,
        compute_logits: Callable[[torch.Tensor], torch.Tensor],
        vocab_start: int,
        vocab_size: int,
        parallel: ParallelContext,
        float32_weights: bool,
        row_multiple: int = 1,
    ) -> None:
        self.compute_logits = compute_logits
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size
        self.parallel = parallel
        self.in_place = not parallel.is_distributed and float32_weights
        self.row_multiple = row_multiple

    def __call__(
        self,
        rows_h: torch.Tensor,
        targets: torch.Tensor | None,
        top_k: int | ScoreAsk,
        logits: torch.Tensor | None = None,
        row_of: torch.Tensor | None = None,
    ) -> RowScores:
        """rows_h [R, hidden]; targets int64 [R] (-1: none) or None; top_k: k (0 for none), or a ScoreAsk for the
        other scores. `logits`: the rows' local logits when the caller keeps them (full logits were asked for
        too): read, never overwritten.

        row_of (int64 [Q]): the scores are asked for Q rows, row q being row row_of[q] of rows_h (several rows
        that are one row -- a shared prefix -- run the lm_head, the normalizers and the top-k once); targets and
        the ask's per-row fields then have Q rows, and so has the result."""
        ask = top_k if isinstance(top_k, ScoreAsk) else ScoreAsk(top_k=top_k)
        owned = logits is None
        if owned:
            logits = self.compute_logits(rows_h)  # [R, V_local]

        def per_row(t: torch.Tensor) -> torch.Tensor:  # [R, ...] -> [Q, ...]
            return t if row_of is None else t.index_select(0, row_of)

        # What reads the raw logits, before the log-sum-exp may overwrite them.
        target_logit = self._target_logit(logits, targets, row_of) if targets is not None else None
        ranks = self._target_ranks(per_row(logits), target_logit, targets) if ask.target_ranks else None
        picked = self._picked_logits(logits, ask.vocab_ids, row_of) if ask.vocab_ids is not None else None
        top_values, top_ids = self._top_k_as_alone(logits, ask, row_of) if ask.top_k else (None, None)
        lse, entropy = self._normalizers(logits, rows_h, owned and self.in_place, ask.entropy)  # [R]
        lse = per_row(lse)
        scores = RowScores(target_ranks=ranks, entropy=None if entropy is None else per_row(entropy), lse=lse,
                           target_logit=target_logit)
        if target_logit is not None and ask.target_logprobs:
            logprobs = target_logit - lse
            scores.target_logprobs = torch.where(targets >= 0, logprobs, torch.full_like(logprobs, float("nan")))
        if picked is not None:
            logprobs = picked - lse[:, None]
            scores.vocab_logprobs = torch.where(ask.vocab_ids >= 0, logprobs, torch.full_like(logprobs, float("nan")))
        if ask.top_k:
            scores.top_k_ids = top_ids
            scores.top_k_logprobs = top_values - lse[:, None]
        return scores

    def _target_logit(self, logits: torch.Tensor, targets: torch.Tensor, row_of: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """[Q]: the logit of each row's target, from the rank whose columns hold it (0 for rows without one)."""
        width = logits.shape[1]
        local = targets - self.vocab_start
        mine = (local >= 0) & (local < width)
        if row_of is None:
            picked = logits.gather(1, local.clamp(0, width - 1)[:, None]).squeeze(1)
        else:
            picked = logits[row_of, local.clamp(0, width - 1)]
        return self.parallel.all_reduce(torch.where(mine, picked, torch.zeros_like(picked)))

    def _picked_logits(self, logits: torch.Tensor, ids: torch.Tensor, row_of: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """[Q, n]: the logits at each row's chosen ids (-1 padding gives 0), summed from the ranks that hold them."""
        width = logits.shape[1]
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < width)
        if row_of is None:
            picked = logits.gather(1, local.clamp(0, width - 1))
        else:
            picked = logits[row_of[:, None], local.clamp(0, width - 1)]
        return self.parallel.all_reduce(torch.where(mine, picked, torch.zeros_like(picked)))

    def _target_ranks(self, logits: torch.Tensor, target_logit: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[R] int64: 1 + the vocabulary entries strictly above the target's logit (counted per shard, summed);
        -1 for rows without a target."""
        higher = (logits > target_logit[:, None]).sum(dim=-1)  # [R] int64
        higher = self.parallel.all_reduce(higher)
        return torch.where(targets >= 0, higher + 1, torch.full_like(higher, -1))

    def _top_k_as_alone(self, logits: torch.Tensor, ask: ScoreAsk, row_of: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """[Q, ask.top_k] values and ids; each row's first k entries (k: its row_top_k) are the top-k its own k
        gives, whatever k its neighbours ask for (torch orders equal values in a way that follows k). Taken once
        per row of `logits`, then handed to each of its rows (row_of)."""
        k = ask.top_k
        rows = logits.shape[0] if row_of is None else row_of.shape[0]
        row_k = ask.row_top_k if ask.row_top_k is not None else torch.full(
            (rows,), k, dtype=torch.int64, device=logits.device)
        values, ids = self._top_k(logits, min(k + 1, self.vocab_size))
        if row_of is not None:
            values, ids = values.index_select(0, row_of), ids.index_select(0, row_of)

        def again(rs: torch.Tensor, own_k: int) -> tuple[torch.Tensor, torch.Tensor]:  # rows rs with their own k
            return self._top_k(logits.index_select(0, rs if row_of is None else row_of.index_select(0, rs)), own_k)

        return invariance.top_k_as_alone(values, ids, row_k, k, again)

    def _top_k(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and vocabulary ids [R, k] of the k largest logits: each rank's own k, merged across ranks."""
        ctx = self.parallel
        values, ids = logits.topk(min(k, logits.shape[1]), dim=-1)
        ids = ids + self.vocab_start
        if not ctx.is_distributed:
            return values, ids
        if values.shape[1] < k:  # pad so that every rank sends [R, k]
            pad = k - values.shape[1]
            values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
        values = ctx.all_gather_uneven(values, [k] * ctx.world_size, dim=1)
        ids = ctx.all_gather_uneven(ids, [k] * ctx.world_size, dim=1)
        values, order = values.topk(min(k, self.vocab_size), dim=-1)
        return values, ids.gather(1, order)

    def _normalizers(
        self, logits: torch.Tensor, rows_h: torch.Tensor, overwrite: bool, entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[R] log sum_v exp(logit_v) over the whole vocabulary, and with `entropy` the rows' entropy [R] in nats:
        H = lse - sum_v p_v * logit_v. With `overwrite` (the fast path) `logits` is exponentiated in place."""
        ctx = self.parallel
        if ctx.is_distributed:
            m = logits.max(dim=-1).values
            ctx.all_reduce(m, dist.ReduceOp.MAX)
            shifted = logits - m[:, None]  # [R, V_local]
            exps = torch.exp(shifted)
            # Sums of exp and of exp * shifted logit, reduced in one call: [R, 2]
            sums = torch.stack([exps.sum(dim=-1), torch.linalg.vecdot(exps, shifted)], dim=1)
            ctx.all_reduce(sums)
            log_sum = torch.log(sums[:, 0])
            return m + log_sum, (log_sum - sums[:, 1] / sums[:, 0]) if entropy else None
        # Without the max shift, one formula whether the logits are kept or overwritten. Logits stay far inside
        # exp's float32 range in practice; a row whose sum overflows (a logit above ~88) or falls so low that
        # denormal terms could matter (below 2^-60, so the largest term is under 2^-78) is redone with the shift.
        exps = logits.exp_() if overwrite else torch.exp(logits)  # [R, V]
        sums = exps.sum(dim=-1)
        unsafe = ~(torch.isfinite(sums) & (sums >= 2.0**-60))
        lse = sums.log()
        ent = None
        if entropy:
            # sum_v p_v * logit_v with p_v = exp(logit_v): xlogy(p, p), in place over the exps
            ent = lse - exps.xlogy_(exps).sum(dim=-1) / sums
        if unsafe.any():
            redo = unsafe.nonzero().squeeze(1)
            # the rows again, padded to whole row groups: the redo's lm_head call and its reductions over the
            # vocabulary then give a row the bits it gets whatever else is redone with it
            padded = torch.tensor(invariance.pad_rows(redo.tolist(), self.row_multiple), device=redo.device)
            if overwrite:
                again = self.compute_logits(rows_h.index_select(0, padded))
            else:
                again = logits.index_select(0, padded)
            again_lse = torch.logsumexp(again, dim=-1)
            lse[redo] = again_lse[: len(redo)]
            if entropy:
                ent[redo] = self._entropy(again, again_lse)[: len(redo)]
        return lse, ent

    @staticmethod
    def _entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """[R]: -sum_v p_v * log p_v from the log-probabilities (one [R, V] temporary, relative to lse so that
        rows far from zero lose nothing to cancellation)."""
        logprobs = logits - lse[:, None]
        return -torch.linalg.vecdot(logprobs.exp(), logprobs)
