"""The serving path: one forward of the trunk for a ragged batch whose sequences each ask for different outputs.

The final norm and lm_head run only on rows some sequence needs (``DistributedTransformer.compute_logits``).
Target log-probabilities and ranks, top-k, log-probabilities at chosen ids and entropy are reduced on the device from the vocab-parallel logits (model/runtime/scores.py);
full rows are gathered across ranks only for sequences that asked for full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model.distributed import ParallelContext
from model.distributed_transformer import DistributedTransformer
from model.families.config import ModelConfig
from model.families.loader import load_model
from model.layers.attention_kernels import AttentionKind
from model.layers.modules import RaggedBatch, classifier_rows
from model.runtime import invariance
from model.runtime.memory import retain_freed_memory
from model.runtime.numerics import Numerics, resolve_numerics
from model.runtime.outputs import SCORE_KINDS, OutputSpec, ReturnLogits, SequenceOutput
from model.runtime.prefix_cache import (ENTROPY, LSE, NEVER, TARGET_LOGIT, Needs, PrefixCache, Products, TrunkResult,
                                        cached_trunk)
from model.runtime.scores import RowScores, ScoreAsk, ScoreReducer
from model.task import Task

@dataclass
class _RowPlan:
    """Host-side index bookkeeping for one batch."""

    vocab_rows: list[int]  # packed token index of every row that needs the lm_head
    vocab_slices: list[tuple[int, int]]  # per sequence: (start, count) into vocab_rows
    targets: list[int]  # next token id for each vocab row, -1 for a sequence's last position
    hidden_rows: dict[int, list[int]]  # hidden-state layer -> packed token indices to capture
    hidden_slices: list[list[tuple[int, int, int]]]  # per sequence: (layer, start, count) into hidden_rows[layer]


@dataclass(frozen=True)
class RunStats:
    """What one ``ModelRunner.run`` saved and holds, for the service's counters (worker -> BatchDone)."""

    prefix_shared_tokens: int = 0  # token rows not recomputed because the batch shared their prefix
    prefix_cache_hit_tokens: int = 0  # token rows not recomputed because the prefix cache held them
    prefix_cache_bytes: int = 0  # the cache's bytes after the batch (this rank's)


@dataclass
class _VocabOutputs:
    """What the vocab rows of a batch produced, on the CPU."""

    scores: RowScores  # one row per vocab row
    logits: torch.Tensor | None = None  # float32 [F, V]: the rows that asked for full logits
    logits_row_index: torch.Tensor | None = None  # int64 [R]: vocab row -> its row of `logits`


def _merge_kept(computed: _VocabOutputs | None, kept: dict[int, tuple[Products, int]], rest_of: list[int],
                plan: _RowPlan, specs: Sequence[OutputSpec]) -> _VocabOutputs:
    """The outputs of every vocab row: those computed (rows rest_of) and those made of kept products (`kept`).
    A kept row's log-probability is its target logit minus its log-sum-exp, the reducer's float32 subtraction;
    columns its sequence does not ask for are never read (NaN, 0)."""
    rows = len(plan.vocab_rows)
    got = computed.scores if computed is not None else RowScores()
    at = torch.tensor(rest_of, dtype=torch.int64)
    merged = RowScores()
    for name in RowScores.kinds():
        part = getattr(got, name)
        if part is None and name not in ("target_logprobs", "entropy"):
            continue
        if part is None and not any(spec.amount(name) for spec in specs):
            continue
        shape = (rows, *(part.shape[1:] if part is not None else ()))
        dtype = part.dtype if part is not None else torch.float32
        full = torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point else torch.zeros(
            shape, dtype=dtype)
        if part is not None:
            full[at] = part[: len(rest_of)]  # the scores-only path also returns its padding rows
        setattr(merged, name, full)
    served = torch.tensor(list(kept), dtype=torch.int64)
    values = torch.stack([stored.values[:, p] for stored, p in kept.values()])  # [K, 3]
    if merged.target_logprobs is not None:
        merged.target_logprobs[served] = values[:, TARGET_LOGIT] - values[:, LSE]
    if merged.entropy is not None:
        merged.entropy[served] = values[:, ENTROPY]
    out = _VocabOutputs(merged)
    if computed is not None and computed.logits is not None:
        out.logits = computed.logits
        out.logits_row_index = torch.full((rows,), -1, dtype=torch.int64)
        out.logits_row_index[at] = computed.logits_row_index[: len(rest_of)]  # (and its padding rows)
    return out


def _rows_of(ask: ScoreAsk, s: int, e: int) -> ScoreAsk:
    """The ask's per-row fields for rows [s, e)."""
    return replace(ask, row_top_k=ask.row_top_k[s:e], vocab_ids=None if ask.vocab_ids is None else ask.vocab_ids[s:e])


class ModelRunner:
    """Runs batches on a loaded model with the numerics it was built with (model/runtime/numerics.py)."""

    def __init__(self, model: DistributedTransformer, config: ModelConfig, parallel: ParallelContext,
                 numerics: Numerics | None = None):
        self.model = model
        self.config = config
        self.parallel = parallel
        self.numerics = numerics or model.numerics
        if self.numerics.attention != model.numerics.attention or self.numerics.dtype != model.numerics.dtype or \
                self.numerics.batch_invariant != model.numerics.batch_invariant:
            raise ValueError(f"the model was built with {model.numerics}; a runner may change only prefix sharing "
                             "and the prefix cache")
        if self.numerics.prefix_sharing and self.numerics.attention != AttentionKind.PREFIX_STABLE:
            raise ValueError(f"prefix sharing needs prefix-stable attention; this model was built with "
                             f"{self.numerics.attention.value} attention (ModelRunner.load)")
        self.dtype = self.numerics.torch_dtype
        # A sequence's outputs are the same bits whatever shares its batch (model/runtime/invariance.py): every
        # matmul of run() gets a multiple of row_multiple rows.
        self.batch_invariant = self.numerics.batch_invariant
        self.row_multiple = self.numerics.row_multiple
        self.prefix_shared_tokens = 0  # token rows not recomputed so far (prefix sharing)
        # Prefixes kept across batches (model/runtime/prefix_cache.py) in the numerics' bytes; None: off.
        self.prefix_cache: PrefixCache | None = None
        self.prefix_cache_hit_tokens = 0  # token rows read from the cache so far
        self.last_run = RunStats()  # the last run's counts
        self.use_prefix_cache(self.numerics.prefix_cache_bytes)
        head = model.lm_head
        # A classifier's replicated score head holds every label on every rank.
        vocab_start = head.vocab.start if hasattr(head, "vocab") else 0
        self.scores = ScoreReducer(
            model.compute_logits, vocab_start, config.vocab_size, parallel, head.weight.dtype == torch.float32,
            row_multiple=self.row_multiple,
        )

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        parallel: ParallelContext | None = None,
        retain_memory: bool = True,
        numerics: Numerics | None = None,
        batch_invariant: bool | None = None,
        prefix_sharing: bool | None = None,
        prefix_cache_bytes: int | None = 0,
        **model_kwargs,
    ) -> ModelRunner:
        """The checkpoint's model with `numerics`, or with what resolve_numerics makes of `dtype`, `batch_invariant`,
        `prefix_sharing` and `prefix_cache_bytes` (None: the default). retain_memory: on CPU, keep freed
        activations in the process for the next batch (model/runtime/memory.py: no page faults on fresh memory per
        batch, at the price of holding the peak working set).

        batch_invariant: every output of a sequence is the same bits whatever else shares its batch and wherever it
        sits there (model/runtime/invariance.py); None: on for the CPU, off for CUDA, where True is refused.

        prefix_sharing: sequences of a batch that start with the same tokens compute them once, every sequence on
        prefix-stable attention (model/runtime/prefix_sharing.py); None: wherever the model supports it (CPU, SDPA
        attention, rotary by position); False keeps the attention with transformers' bits.

        prefix_cache_bytes: bytes of this rank's prefix cache (model/runtime/prefix_cache.py), where prefixes are
        shared; 0: none."""
        config = ModelConfig.from_pretrained(checkpoint)
        parallel = parallel or ParallelContext.single(device)
        if retain_memory and parallel.device.type == "cpu":
            retain_freed_memory()
        numerics = numerics or resolve_numerics(
            config, parallel.device, dtype=dtype, batch_invariant=batch_invariant, prefix_sharing=prefix_sharing,
            prefix_cache_bytes=prefix_cache_bytes)
        if numerics.batch_invariant:
            parallel = replace(parallel, sum_in_rank_order=True)
        model = load_model(str(checkpoint), config, parallel, numerics, **model_kwargs)
        return cls(model, config, parallel, numerics)

    def with_numerics(self, numerics: Numerics) -> ModelRunner:
        """A runner over the same model (the same weights) with other numerics, where the model's construction
        allows them: prefix sharing on or off (on needs the prefix-stable attention), another prefix cache size."""
        return type(self)(self.model, self.config, self.parallel, numerics)

    def use_prefix_cache(self, capacity: int) -> bool:
        """Keep prefixes across batches in `capacity` bytes (0: no cache, and an existing one is dropped); only
        where prefixes are shared (the prefix-stable attention) and under batch invariance, without which a cached
        row's bits would follow the batch that computed it. Returns whether the cache is on."""
        on = (capacity > 0 and self.numerics.attention == AttentionKind.PREFIX_STABLE and self.batch_invariant
              and not self.model.use_subgraphs)
        self.prefix_cache = PrefixCache.for_model(self.model, capacity) if on else None
        return on

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes the prefix cache holds now (0 without one)."""
        return self.prefix_cache.bytes if self.prefix_cache is not None else 0

    @property
    def prefix_sharing(self) -> bool:
        """Whether shared prefixes are computed once."""
        return self.numerics.prefix_sharing

    def _logit_rows(self, spec: OutputSpec, n: int, pooled: int | None) -> range:
        """The positions whose head rows a sequence of n tokens gets: for a classifier's last_token, its pooled
        position (the last token that is not padding, `pooled`), as transformers' classifier scores it."""
        if pooled is not None and spec.return_logits == ReturnLogits.LAST_TOKEN:
            return range(pooled, pooled + 1)
        return spec.logit_rows(n)

    def _pooled_positions(self, input_ids: torch.Tensor, batch: RaggedBatch) -> list[int | None]:
        """Per sequence, a classifier's pooled position (modules.classifier_rows); None for a causal LM."""
        if self.config.task != Task.CLASSIFICATION:
            return [None] * len(batch.seq_lens)
        cpu = RaggedBatch.from_offsets(batch.offsets.cpu(), torch.device("cpu"))
        rows = classifier_rows(input_ids.cpu(), cpu, self.config.pad_token_id)
        return [int(r) - s for r, s in zip(rows.tolist(), batch.bounds[:-1])]

    def _check_specs(self, specs: Sequence[OutputSpec]) -> None:
        refused = tuple(dict.fromkeys(name for s in specs for name in s.unsupported_fields(self.config.task)))
        if refused:
            raise ValueError(
                f"{', '.join(refused)} need a next-token vocabulary; this model is a classifier "
                f"({self.config.architecture}, {self.config.num_labels} labels): ask for logits"
            )

    def _plan(
        self, input_ids: list[int], bounds: Sequence[int], specs: Sequence[OutputSpec], pooled: Sequence[int | None]
    ) -> _RowPlan:
        plan = _RowPlan([], [], [], {}, [])
        for b, spec in enumerate(specs):
            start, end = bounds[b], bounds[b + 1]
            n = end - start
            if spec.needs_vocab:
                rows = self._logit_rows(spec, n, pooled[b])
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

    def _needs(self, specs: Sequence[OutputSpec], seq_lens: Sequence[int], pooled: Sequence[int | None]) -> list[Needs]:
        """Per sequence, the first positions that need a final hidden state and an inner layer's (prefix cache)."""
        needs = []
        for spec, n, pool in zip(specs, seq_lens, pooled):
            final = inner = NEVER
            if spec.needs_vocab and len(rows := self._logit_rows(spec, n, pool)):
                final = rows.start
            hidden = spec.hidden_rows(n)
            if len(hidden):
                for layer in self.config.resolve_layers(spec.layers):
                    if layer == self.config.num_layers:
                        final = min(final, hidden.start)
                    else:
                        inner = min(inner, hidden.start)
            needs.append(Needs(final, inner))
        return needs

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
    # at a time, instead of a [R, vocab] tensor and its temporaries (GBs for long batches); the allocator keeps the
    # freed block for the next chunk (model/runtime/memory.py). 512 rows keep the lm_head matmul efficient (the weight is
    # re-read once per chunk).
    SCORE_CHUNK_ROWS = 512

    def _vocab_outputs(
        self, h: torch.Tensor, plan: _RowPlan, specs: Sequence[OutputSpec], row_keys: torch.Tensor | None = None
    ) -> _VocabOutputs:
        """Logits-derived tensors for the vocab rows, on the CPU. row_keys (int64, one per row of h): rows of h
        with equal keys are one row (a shared or cached prefix): the lm_head, the normalizers and the top-k run
        once for it, and each vocab row reads its own target from it."""
        if row_keys is not None:
            keys = row_keys.index_select(0, torch.tensor(plan.vocab_rows, device=h.device))
            distinct, inverse = torch.unique(keys, return_inverse=True)
            if len(distinct) < len(keys):
                return self._distinct_vocab_outputs(h, plan, specs, distinct, inverse)
        dev = h.device
        rows, row_targets = plan.vocab_rows, plan.targets
        flags = [s.logits for s, (_, c) in zip(specs, plan.vocab_slices) for _ in range(c)]
        ks = [s.top_k for s, (_, c) in zip(specs, plan.vocab_slices) for _ in range(c)]
        # Whole row groups for the lm_head under batch invariance: copies of the last row, never read.
        rows = invariance.pad_rows(rows, self.row_multiple)
        fill = len(rows) - len(plan.vocab_rows)
        row_targets = row_targets + [-1] * fill
        flags, ks = flags + [False] * fill, ks + [0] * fill
        every_row = rows == list(range(h.shape[0]))  # every row, in order: no gather copy of h
        row_index = None if every_row else torch.tensor(rows, device=dev)
        targets, ask, scored = self._ask(plan, specs, row_targets, ks, dev)

        if not any(flags):
            # Scores only (perplexity, top-k): the lm_head runs in row chunks, no [R, vocab] tensor exists.
            # SCORE_CHUNK_ROWS is a multiple of invariance.ROW_MULTIPLE: every chunk is whole row groups.
            n, step = len(rows), self.SCORE_CHUNK_ROWS
            chunks = []
            for s in range(0, n, step):
                e = min(n, s + step)
                rows_h = h[s:e] if every_row else h.index_select(0, row_index[s:e])
                chunks.append(self.scores(rows_h, None if targets is None else targets[s:e], _rows_of(ask, s, e)))
            return _VocabOutputs(RowScores.cat(chunks))

        rows_h = h if every_row else h.index_select(0, row_index)
        local = self.model.compute_logits(rows_h)  # [R, V_local]
        scores = self.scores(rows_h, targets, ask, logits=local) if scored else RowScores()
        want_full = torch.tensor(flags, dtype=torch.bool, device=dev)
        # All rows wanted (the common case): the logits tensor itself, not a [R, V] copy of it.
        full = local if all(flags) else local.index_select(0, want_full.nonzero().squeeze(1))
        return _VocabOutputs(
            scores=RowScores.cat([scores]),
            logits=self.model.gather_logits(full).cpu(),
            logits_row_index=torch.cumsum(want_full.long(), 0).cpu() - 1,
        )

    def _ask(self, plan: _RowPlan, specs: Sequence[OutputSpec], row_targets: list[int], ks: list[int],
             dev: torch.device) -> tuple[torch.Tensor | None, ScoreAsk, bool]:
        """The vocab rows' targets (None: nobody reads them), what the reducer is asked, and whether anything is."""
        asking = [s for s in specs if s.needs_vocab]
        targets = torch.tensor(row_targets, device=dev) if any(s.needs_targets for s in asking) else None
        ask = ScoreAsk(top_k=max(ks, default=0),
                       row_top_k=torch.tensor(ks, dtype=torch.int64, device=dev),
                       vocab_ids=self._vocab_ids(plan, specs, len(row_targets), dev),
                       **{flag: any(s.amount(flag) for s in asking) for flag in ScoreAsk.flags()})
        scored = any(s.vocabulary_fields for s in asking)  # any score at all (else full logits alone)
        return targets, ask, scored

    def _distinct_vocab_outputs(
        self, h: torch.Tensor, plan: _RowPlan, specs: Sequence[OutputSpec], distinct: torch.Tensor,
        inverse: torch.Tensor,
    ) -> _VocabOutputs:
        """_vocab_outputs where several vocab rows are one row: the lm_head and what reads the whole vocabulary
        run on the D distinct rows (in chunks of SCORE_CHUNK_ROWS, padded to whole row groups), and each vocab
        row reads its target, chosen ids and own top-k from its distinct row. inverse int64 [R]: vocab row ->
        distinct row."""
        dev = h.device
        count = len(distinct)
        vocab_rows = torch.tensor(plan.vocab_rows, device=dev)
        # one row of h for each distinct row (its first vocab row)
        first = torch.full((count,), len(inverse), dtype=torch.int64, device=dev).scatter_reduce_(
            0, inverse, torch.arange(len(inverse), device=dev), "amin")
        h_rows = invariance.pad_rows(vocab_rows.index_select(0, first).tolist(), self.row_multiple)
        flags = [s.logits for s, (_, c) in zip(specs, plan.vocab_slices) for _ in range(c)]
        ks = [s.top_k for s, (_, c) in zip(specs, plan.vocab_slices) for _ in range(c)]
        targets, ask, scored = self._ask(plan, specs, plan.targets, ks, dev)
        h_index = torch.tensor(h_rows, device=dev)

        if not any(flags):
            # vocab rows sorted by their distinct row: a chunk of distinct rows is a slice of them
            order = torch.argsort(inverse, stable=True)
            sorted_inverse = inverse.index_select(0, order)
            step, chunks = self.SCORE_CHUNK_ROWS, []
            for s in range(0, len(h_rows), step):
                e = min(len(h_rows), s + step)
                a, b = (int(x) for x in torch.searchsorted(sorted_inverse, torch.tensor([s, e], device=dev)))
                picked = order[a:b]
                chunk_ask = replace(ask, row_top_k=ask.row_top_k.index_select(0, picked),
                                    vocab_ids=None if ask.vocab_ids is None else ask.vocab_ids.index_select(0, picked))
                chunks.append(self.scores(h.index_select(0, h_index[s:e]),
                                          None if targets is None else targets.index_select(0, picked), chunk_ask,
                                          row_of=sorted_inverse[a:b] - s))
            back = torch.argsort(order)  # sorted position of each vocab row
            joined = RowScores.cat(chunks)
            for name, value in vars(joined).items():
                if value is not None:
                    setattr(joined, name, value.index_select(0, back.cpu()))
            return _VocabOutputs(joined)

        rows_h = h.index_select(0, h_index)
        local = self.model.compute_logits(rows_h)  # [D (padded), V_local]
        scores = self.scores(rows_h, targets, ask, logits=local, row_of=inverse) if scored else RowScores()
        want_full = torch.tensor(flags, dtype=torch.bool, device=dev)
        full = local.index_select(0, inverse[want_full])
        return _VocabOutputs(
            scores=RowScores.cat([scores]),
            logits=self.model.gather_logits(full).cpu(),
            logits_row_index=torch.cumsum(want_full.long(), 0).cpu() - 1,
        )

    # What a cached row's kept products give (model/runtime/prefix_cache.py): a sequence asking for nothing else
    # from the vocabulary has its cached rows' scores made without the lm_head.
    REUSABLE_FIELDS = frozenset({"target_logprobs", "entropy"})

    def _cached_vocab_outputs(
        self, h: torch.Tensor, plan: _RowPlan, specs: Sequence[OutputSpec], trunk: TrunkResult
    ) -> _VocabOutputs:
        """_vocab_outputs, where the rows read from the prefix cache whose kept products give all their sequence
        asks take them from there, the others run as before, and the rows of cache nodes that ran the lm_head here
        leave their products in the node for later requests."""
        if not trunk.slots:
            return self._vocab_outputs(h, plan, specs, trunk.row_keys)
        keys = trunk.row_keys.index_select(0, torch.tensor(plan.vocab_rows, device=h.device)).tolist()
        kept: dict[int, tuple[Products, int]] = {}  # vocab row -> the products it reads, position in its block
        rest = _RowPlan([], [], [], {}, [])  # the vocab rows that run the lm_head
        rest_of: list[int] = []  # rest's rows -> vocab row
        for spec, (start, count) in zip(specs, plan.vocab_slices):
            reusable = not spec.logits and set(spec.vocabulary_fields) <= self.REUSABLE_FIELDS
            first = len(rest.vocab_rows)
            for i in range(start, start + count):
                node, p = trunk.slots.get(keys[i], (None, 0))
                if reusable and node is not None and keys[i] >= trunk.cached_from:
                    stored = node.products
                    if (stored.has[LSE][p] and (not spec.entropy or stored.has[ENTROPY][p])
                            and (not spec.target_logprobs or stored.target_logit(p, plan.targets[i]))):
                        kept[i] = (stored, p)
                        continue
                rest.vocab_rows.append(plan.vocab_rows[i])
                rest.targets.append(plan.targets[i])
                rest_of.append(i)
            rest.vocab_slices.append((first, len(rest.vocab_rows) - first))
        computed = self._vocab_outputs(h, rest, specs, trunk.row_keys) if rest.vocab_rows else None
        if computed is not None:
            self._keep_products(computed.scores, rest, rest_of, keys, trunk)
        if not kept:
            return computed
        return _merge_kept(computed, kept, rest_of, plan, specs)

    @staticmethod
    def _keep_products(scores: RowScores, rest: _RowPlan, rest_of: list[int], keys: list[int],
                       trunk: TrunkResult) -> None:
        """Each computed vocab row of a cache node leaves its log-sum-exp, entropy and target logit there."""
        if scores.lse is None:
            return  # full logits alone: no normalizer was computed
        lse = scores.lse.tolist()
        entropy = scores.entropy.tolist() if scores.entropy is not None else None
        logit = scores.target_logit.tolist() if scores.target_logit is not None else None
        for j, i in enumerate(rest_of):
            node, p = trunk.slots.get(keys[i], (None, 0))
            if node is not None:
                node.keep_products(p, rest.targets[j], lse[j], None if entropy is None else entropy[j],
                                   None if logit is None else logit[j])

    @staticmethod
    def _vocab_ids(plan: _RowPlan, specs: Sequence[OutputSpec], rows: int, dev: torch.device) -> torch.Tensor | None:
        """int64 [rows, n_max]: each vocab row's chosen ids (its sequence's vocab_ids), -1 past them and in the rows
        past the plan's (padding); None if none."""
        widths = [len(s.vocab_ids) if s.vocab_ids is not None else 0 for s in specs]
        if not any(widths):
            return None
        ids = torch.full((rows, max(widths)), -1, dtype=torch.int64)
        for spec, (start, count), width in zip(specs, plan.vocab_slices, widths):
            if width and count:
                ids[start : start + count, :width] = torch.tensor(spec.vocab_ids, dtype=torch.int64)
        return ids.to(dev)

    def run(self, input_ids: torch.Tensor, input_row_offsets: torch.Tensor, specs: Sequence[OutputSpec],
            should_stop: Callable[[], bool] | None = None) -> list[SequenceOutput]:
        """input_ids int64 [T] packed; input_row_offsets int64 [B+1]; one OutputSpec per sequence.

        should_stop: asked before each block; True raises model.errors.Cancelled there (with tp > 1 every rank's
        must answer the same at the same block).

        A classifier (config.task CLASSIFICATION) returns rows of num_labels logits; its last_token row is the
        sequence's pooled row (the last token that is not pad_token_id), positions saying which; the outputs that
        read a next-token vocabulary (outputs.VOCABULARY_FIELDS) raise ValueError.

        With tp > 1 every rank calls this with the same arguments and gets the same outputs."""
        self.model.should_stop = should_stop
        try:
            return self._run(input_ids, input_row_offsets, specs)
        finally:
            self.model.should_stop = None

    @torch.inference_mode()
    def _run(self, input_ids: torch.Tensor, input_row_offsets: torch.Tensor, specs: Sequence[OutputSpec]
             ) -> list[SequenceOutput]:
        if len(specs) != len(input_row_offsets) - 1:
            raise ValueError("one OutputSpec per sequence is needed")
        self._check_specs(specs)
        dev = self.parallel.device
        batch = RaggedBatch.from_offsets(input_row_offsets, dev)
        if min(batch.seq_lens) < 1:
            raise ValueError("empty sequence")
        pooled = self._pooled_positions(input_ids, batch)
        needs = self._needs(specs, batch.seq_lens, pooled)
        plan = self._plan(input_ids.tolist(), batch.bounds, specs, pooled)
        depth, final_rows = self._prune(plan, batch.num_tokens)
        if self.batch_invariant:
            # Every matmul gets a multiple of invariance.ROW_MULTIPLE rows: a filler sequence after the real ones
            # (nothing reads its rows) and copies of the last row in the last block's row subset.
            input_ids, input_row_offsets = invariance.pad_batch(input_ids, input_row_offsets)
            batch = RaggedBatch.from_offsets(input_row_offsets, dev)
            final_rows = None if final_rows is None else invariance.pad_rows(final_rows)
        capture = {layer: torch.tensor(rows, device=dev) for layer, rows in plan.hidden_rows.items()}
        final = None if final_rows is None else torch.tensor(final_rows, device=dev)
        if self.prefix_sharing:
            # Shared and cached prefixes computed once (model/runtime/prefix_cache.py)
            cache = self.prefix_cache if depth > 0 else None
            trunk = cached_trunk(self.model, cache, input_ids.to(dev), batch, needs, capture, depth, final)
        else:
            trunk = TrunkResult(*self.model.trunk(input_ids.to(dev), batch, capture, depth=depth, final_rows=final),
                                None, 0, 0)
        h, captured = trunk.h, trunk.captured
        self.prefix_shared_tokens += trunk.shared_tokens
        self.prefix_cache_hit_tokens += trunk.cache_hit_tokens
        self.last_run = RunStats(trunk.shared_tokens, trunk.cache_hit_tokens, self.prefix_cache_bytes)
        vocab = self._cached_vocab_outputs(h, plan, specs, trunk) if plan.vocab_rows else None
        captured_cpu = {layer: t.cpu() for layer, t in captured.items()}
        return [self._sequence_output(b, spec, batch.seq_lens[b], pooled[b], plan, vocab, captured_cpu)
                for b, spec in enumerate(specs)]

    def _sequence_output(self, b: int, spec: OutputSpec, n: int, pooled: int | None, plan: _RowPlan,
                         vocab: _VocabOutputs | None, captured: dict[int, torch.Tensor]) -> SequenceOutput:
        """Sequence b's outputs (n tokens), sliced from the batch's vocab outputs and captured hidden rows (CPU)."""
        positions = torch.tensor(list(self._logit_rows(spec, n, pooled)), dtype=torch.int64)
        seq = SequenceOutput(positions=positions)
        start, count = plan.vocab_slices[b]
        if count:
            if spec.logits:
                first = int(vocab.logits_row_index[start])
                seq.logits = vocab.logits[first : first + count]
            for kind in SCORE_KINDS:
                if kind.asked_by(spec):
                    mine = getattr(vocab.scores, kind.name)[start : start + count]  # [count] or [count, widest]
                    setattr(seq, kind.name, mine if mine.dim() == 1 else mine[:, : kind.columns(spec)])
        if plan.hidden_slices[b]:
            stacked = torch.stack([captured[layer][s : s + c] for layer, s, c in plan.hidden_slices[b]])
            if spec.return_hidden_states.normalized:
                stacked = self.model.norm(stacked.to(self.parallel.device)).cpu()
            seq.hidden_states = stacked
            seq.hidden_positions = torch.tensor(list(spec.hidden_rows(n)), dtype=torch.int64)
            seq.layers = tuple(layer for layer, _, _ in plan.hidden_slices[b])
        return seq
