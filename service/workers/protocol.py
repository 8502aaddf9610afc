"""The contract between the front end and its worker processes: every message either way is one of these.

A `Batch` goes to every rank of one replica (pickled through its pipe: both ends are this service's own
processes). Rank 0 answers with a `BatchDone`, whose result tensors lie in shared memory, one segment per request
(see `wire.py`), each described by its `RequestResult`, or a `BatchFailed`. Each rank says `WorkerReady` once its
shard is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.families.config import ModelConfig
from model.runtime.numerics import Numerics, resolve_numerics
from model.runtime.outputs import OutputSpec


@dataclass(frozen=True)
class RequestSpan:
    """The sequences [start, stop) of a batch that belong to one request (they share its OutputSpec)."""

    start: int
    stop: int


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [T], every sequence packed
    offsets: np.ndarray  # int64 [B+1]
    specs: list[OutputSpec]  # one per sequence
    spans: list[RequestSpan]  # one per request, in order

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


@dataclass(frozen=True)
class Job:
    """A batch as sent to a replica, with the id its answer carries."""

    batch_id: int
    batch: Batch


@dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor of one request lies in the request's shared-memory segment."""

    offset: int  # bytes from the segment's start
    dtype: str  # numpy name
    shape: tuple[int, ...]


@dataclass
class RequestResult:
    """What rank 0 computed for one request: its tensors (by output kind name) and how their rows split."""

    tensors: dict[str, TensorSlot] = field(default_factory=dict)
    logit_rows: list[int] = field(default_factory=list)  # rows of each sequence in the LOGIT-row tensors
    hidden_rows: list[int] = field(default_factory=list)  # rows of each sequence in the HIDDEN-row tensors
    layers: tuple[int, ...] = ()  # resolved layers of hidden_states
    error: str | None = None  # out of memory even alone: this request fails alone, its batch is answered
    segment: str = ""  # shared-memory name of its tensors (none on error); the front end maps and unlinks it
    nbytes: int = 0


@dataclass
class BatchDone:
    batch_id: int
    results: list[RequestResult]  # one per RequestSpan of the batch
    forward_s: float
    oom_retries: int  # sub-batches re-run after the device ran out of memory
    prefix_shared_tokens: int = 0  # token rows not recomputed thanks to prefix sharing
    prefix_cache_hit_tokens: int = 0  # token rows not recomputed because the replica's prefix cache held them
    prefix_cache_bytes: int = 0  # bytes the replica's prefix cache holds after this batch


@dataclass
class BatchCancelled:
    """The batch stopped before a block, or before its first, because the front end cancelled it (`CancelFlags`)."""

    batch_id: int


@dataclass
class BatchFailed:
    batch_id: int
    message: str


@dataclass(frozen=True)
class RunnerOptions:
    """What the serve settings ask of the model's numerics (None: the default), resolved by `numerics`."""

    dtype: str  # "auto", "float32", ...
    batch_invariant: bool | None = None
    prefix_sharing: bool | None = None  # None: wherever the model can share ("--prefix-sharing on")
    prefix_cache_bytes: int | None = None

    @classmethod
    def from_settings(cls, settings) -> RunnerOptions:
        """From service.settings.Settings."""
        return cls(dtype=settings.dtype, batch_invariant={None: None, "on": True, "off": False}[settings.batch_invariant],
                   prefix_sharing=None if settings.prefix_sharing == "on" else False,
                   prefix_cache_bytes=settings.prefix_cache_bytes)

    def numerics(self, config: ModelConfig, device: torch.device | str) -> Numerics:
        """The numerics the workers load the model with and /info reports (before the workers are ready too): the
        server keeps its promise that under batch invariance the sharing and cache switches change no bit."""
        return resolve_numerics(config, device, dtype=self.dtype, batch_invariant=self.batch_invariant,
                                prefix_sharing=self.prefix_sharing, prefix_cache_bytes=self.prefix_cache_bytes,
                                switches_keep_bits=True)


@dataclass
class WorkerReady:
    rank: int
    pid: int
    loaded: Numerics  # what the rank loaded the model with, as RunnerOptions.numerics resolved it


class CancelFlags:
    """A replica's cancellation flags, in shared memory that the front end writes and every rank reads between blocks.

    Slot `batch_id % SLOTS` holds the id of a batch that was cancelled; a replica never holds more batches than
    slots, so the batches in flight never share one."""

    SLOTS = 8

    def __init__(self, ctx):
        self._ids = ctx.RawArray("q", [-1] * self.SLOTS)  # int64 writes and reads: whole, without a lock

    def cancel(self, batch_id: int) -> None:
        self._ids[batch_id % self.SLOTS] = batch_id

    def is_cancelled(self, batch_id: int) -> bool:
        return self._ids[batch_id % self.SLOTS] == batch_id


WorkerMessage = WorkerReady | BatchDone | BatchCancelled | BatchFailed
