"""The result segments: how rank 0 lays a batch's output tensors into shared memory, one segment per request, and
how the front end maps them back as numpy views.

Each request's tensors are its sequences' outputs concatenated along their row dimension, one tensor per output
kind (`model.runtime.outputs.OUTPUT_KINDS`), each 64-byte aligned. The front end maps each segment read-only and unlinks it
at once: the mapping lives as long as the numpy views over it, and responses are serialized straight from them. One
segment per request, so that a request's memory goes back when its own response is done (a slow reader holds only
its own results), and its bytes in the results budget (`service.budget`) with it.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import weakref
from dataclasses import dataclass

import numpy as np

from model.runtime.outputs import OUTPUT_KINDS, OutputKind, Rows

from ..packing import row_offsets
from .protocol import BatchDone, RequestResult, RequestSpan, TensorSlot

logger = logging.getLogger("logitserve.workers")

SHM_PREFIX = "logitserve_"
_ALIGN = 64


@dataclass
class OutOfMemoryAlone:
    """Stands for the outputs of a sequence that ran out of memory even in a batch of its own."""

    message: str


# ----------------------------------------------------------------------------------------------- worker side


def write_results(outs: list, spans: list[RequestSpan], name: str) -> list[RequestResult]:
    """Write each request's tensors into a new shared-memory segment `name`_`i` (i: the request's index in the
    batch); one result per span, naming its segment.

    `outs` holds a SequenceOutput (or an OutOfMemoryAlone) per sequence of the batch."""
    results = []
    for i, span in enumerate(spans):
        seqs = outs[span.start : span.stop]
        failed = next((o for o in seqs if isinstance(o, OutOfMemoryAlone)), None)
        if failed is not None:
            results.append(RequestResult(error=failed.message))
            continue
        results.append(_write_request(seqs, f"{name}_{i}"))
    return results


def _write_request(seqs: list, name: str) -> RequestResult:
    import torch
    from multiprocessing import resource_tracker, shared_memory

    plan = []  # (offset, dtype, shape, parts, dim)
    offset = 0
    result = RequestResult(logit_rows=[len(s.positions) for s in seqs],
                           hidden_rows=[0 if s.hidden_positions is None else len(s.hidden_positions) for s in seqs],
                           layers=tuple(seqs[0].layers))
    for kind in OUTPUT_KINDS:
        if getattr(seqs[0], kind.name) is None:  # one spec per request: absent for one, absent for all
            continue
        parts = [getattr(s, kind.name) for s in seqs]
        shape = list(parts[0].shape)
        shape[kind.row_dim] = sum(p.shape[kind.row_dim] for p in parts)
        nbytes = int(np.prod(shape)) * np.dtype(kind.dtype).itemsize
        result.tensors[kind.name] = TensorSlot(offset, kind.dtype, tuple(shape))
        plan.append((offset, getattr(torch, kind.dtype), shape, parts, kind.row_dim))
        offset += nbytes + (-nbytes % _ALIGN)
    size = max(offset, 1)
    shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    # The front end unlinks the segment; this process must not (its resource tracker would at exit).
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    except Exception:  # pragma: no cover
        pass
    _fill(torch.frombuffer(shm.buf, dtype=torch.uint8, count=size), plan)  # no view may outlive close()
    shm.close()
    result.segment, result.nbytes = name, size
    return result


def _fill(buf, plan: list) -> None:
    for off, dtype, shape, parts, dim in plan:
        n = int(np.prod(shape)) * dtype.itemsize
        if n == 0:
            continue
        dest = buf[off : off + n].view(dtype).view(shape)
        pos = 0
        for p in parts:  # converts to the wire dtype (hidden states of a half-precision model become float32)
            k = p.shape[dim]
            dest.narrow(dim, pos, k).copy_(p)
            pos += k


# ------------------------------------------------------------------------------------------- front-end side


@dataclass
class RequestOutputs:
    """One request's result as the encoders and routes read it: an array per output kind asked for (read by kind:
    `outputs[LOGITS]`, `outputs.get(kind)`), and how rows split into sequences."""

    arrays: dict[str, np.ndarray]  # by OutputKind.name, as the result segment lays them out
    logit_rows: list[int]  # per sequence
    hidden_rows: list[int]
    layers: tuple[int, ...]

    def __getitem__(self, kind: OutputKind) -> np.ndarray:
        """The kind's tensor, every sequence's rows concatenated along `kind.row_dim`."""
        array = self.get(kind)
        if array is None:
            raise KeyError(f"{kind.name} was not asked for by this request")
        return array

    def get(self, kind: OutputKind) -> np.ndarray | None:
        """The kind's tensor, or None when the request did not ask for it."""
        return self.arrays.get(kind.name)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor (what the results budget holds for them)."""
        return sum(a.nbytes for a in self.arrays.values())

    def rows(self, rows: Rows) -> list[int]:
        return self.logit_rows if rows == Rows.LOGIT else self.hidden_rows

    def offsets(self, rows: Rows) -> np.ndarray:
        """int64 [B+1]: where each sequence's rows start in the tensors of this row set."""
        return row_offsets(self.rows(rows))


class MappedBatch:
    """A batch's results mapped from shared memory, one mapping per request; numpy views keep a mapping alive, and
    a mapping nobody takes (its request was abandoned) goes with this object."""

    def __init__(self, done: BatchDone):
        self.done = done
        self._bufs = [_attach(r.segment, r.nbytes) if r.segment else None for r in done.results]

    def outputs(self, index: int, reservation=None) -> RequestOutputs:
        """Views of request `index`'s tensors; `reservation` (its bytes in the results budget) is released when the
        last view is gone, should its handle not have released it first (`release_when_collected`)."""
        result = self.done.results[index]
        buf, self._bufs[index] = self._bufs[index], None  # handed over: only the views keep it now
        if reservation is not None and buf is not None:
            release_when_collected(buf, reservation)
        arrays = {name: np.frombuffer(buf, dtype=slot.dtype, count=int(np.prod(slot.shape)),
                                      offset=slot.offset).reshape(slot.shape)
                  for name, slot in result.tensors.items()}
        return RequestOutputs(arrays, result.logit_rows, result.hidden_rows, result.layers)


def release_when_collected(buf, reservation) -> None:
    """The safety net behind the results' handle (`service.engine.Scored`): when the mapping `buf` goes (its last
    view is collected), the reservation is released if it still holds bytes, and that is logged as the bug it is
    (every handle is closed by its route or its response, which releases first)."""
    try:
        weakref.finalize(buf, _release_leaked, reservation, len(buf))
    except TypeError:  # pragma: no cover - the non-Linux fallback's bytes cannot be watched
        pass


def _release_leaked(reservation, size: int) -> None:
    if reservation.release():
        logger.warning("results of %d bytes were released by the garbage collector, not by their handle: a route or "
                       "response did not close engine.Scored (a bug)", size)


def _attach(name: str, nbytes: int):
    path = f"/dev/shm/{name}"
    if sys.platform.startswith("linux") and os.path.exists(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
            os.unlink(path)
        return buf
    from multiprocessing import shared_memory  # pragma: no cover - non-Linux fallback

    shm = shared_memory.SharedMemory(name=name)
    data = bytes(shm.buf[:nbytes])
    shm.close()
    shm.unlink()
    return data


def remove_segments(pid: int) -> None:
    """Unlink the segments a dead rank 0 may have left behind."""
    import glob

    for path in glob.glob(f"/dev/shm/{SHM_PREFIX}{pid}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def segment_name(pid: int, counter: int) -> str:
    return f"{SHM_PREFIX}{pid}_{counter}"
