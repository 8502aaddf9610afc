"""The results budget (`--max-result-bytes`): bytes of result tensors held for responses not yet fully sent, in the
workers' shared memory and the front end together.

A request's result size is known before any forward runs: rows (from its OutputSpec) x elements per row (each
output kind's `per_row`, `model.runtime.outputs.OUTPUT_KINDS`) x element size, laid out as the workers' result segment
lays it (`wire.py`, each tensor 64-byte aligned). The batcher reserves a request's bytes when it dispatches it and
holds batches back while the budget is spent; the bytes come back when the response is fully sent, or at once
when the request fails, times out or its client goes away (`Reservation.release`, idempotent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from model.runtime.outputs import OUTPUT_KINDS, OutputKind, OutputSpec, Rows

ALIGN = 64  # each tensor of a result segment starts on this boundary (wire.py)

# A batch holds at most this fraction of the budget in results: the worker holds a batch's tensors twice while it
# copies them into shared memory, so a batch's share bounds that transient too.
BATCH_SHARE = 4


@dataclass(frozen=True)
class ResultDims:
    """The model's sizes that output kinds' rows are made of."""

    columns: int  # logits per row: the vocabulary (a classifier's labels)
    hidden: int

    @classmethod
    def of(cls, config) -> ResultDims:
        return cls(columns=getattr(config, "num_labels", None) or config.vocab_size, hidden=config.hidden_size)


def _factor(name: str, spec: OutputSpec, dims: ResultDims) -> int:
    if hasattr(dims, name):
        return int(getattr(dims, name))
    if not hasattr(spec, name):
        raise ValueError(f"per_row names {name!r}, neither an OutputSpec field nor a model size")
    return spec.amount(name)


def _rows(rows: Rows, spec: OutputSpec, num_tokens: int) -> int:
    return len(spec.logit_rows(num_tokens) if rows == Rows.LOGIT else spec.hidden_rows(num_tokens))


def kind_bytes(kind: OutputKind, spec: OutputSpec, dims: ResultDims, lengths: Sequence[int]) -> int:
    """Bytes of this kind's tensor for sequences of these lengths, all under `spec` (one request)."""
    elements = sum(_rows(kind.rows, spec, n) for n in lengths)
    for name in kind.per_row:
        elements *= _factor(name, spec, dims)
    return elements * np.dtype(kind.dtype).itemsize


def result_bytes(spec: OutputSpec, dims: ResultDims, lengths: Sequence[int]) -> int:
    """Bytes one request's results take in its result segment (what the budget counts)."""
    total = 0
    for kind in OUTPUT_KINDS:
        n = kind_bytes(kind, spec, dims, lengths)
        total += n + (-n % ALIGN)
    return total


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class ResultBudget:
    """Bytes reserved for results not yet sent; the gauge `logitserve_result_bytes` follows it. `on_release` is
    called whenever bytes come back (the batcher's wake-up: released bytes may let a held batch go)."""

    def __init__(self, capacity: int, gauge, on_release: Callable[[], None] | None = None):
        self.capacity = capacity
        self.used = 0
        self._gauge = gauge
        self._on_release = on_release

    @property
    def batch_limit(self) -> int:
        """Result bytes one batch may hold (a request larger than this runs alone)."""
        return max(1, self.capacity // BATCH_SHARE)

    @property
    def free(self) -> int:
        """Bytes that can be reserved now."""
        return self.capacity - self.used

    def fits(self, nbytes: int) -> bool:
        """Whether these bytes can be reserved now (anything fits an empty budget that is large enough for it)."""
        return self.used + nbytes <= self.capacity

    def reserve(self, nbytes: int) -> Reservation:
        self._add(nbytes)
        return Reservation(self, nbytes)

    def _add(self, n: int) -> None:
        self.used += n
        self._gauge.set(self.used)
        if n < 0 and self._on_release is not None:
            self._on_release()


class Reservation:
    """One request's bytes in the budget, released once."""

    def __init__(self, budget: ResultBudget, nbytes: int):
        self._budget = budget
        self.nbytes = nbytes
        self.released = False

    def release(self) -> bool:
        """Give the bytes back; True if this call did (a second call does nothing)."""
        if self.released:
            return False
        self.released = True
        self._budget._add(-self.nbytes)  # noqa: SLF001
        return True
