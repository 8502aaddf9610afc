"""Response bodies: JSON through orjson (numpy arrays serialized natively) and safetensors, both built from a
`Scored` result by looping over the output kinds (`model.runtime.outputs.OUTPUT_KINDS`).

Large bodies are never built whole: safetensors is sent from views of the workers' shared memory, and JSON is
encoded row by row as it is sent (`iter_json`), with the socket's backpressure. A scored response releases its
results' bytes in the results budget once it is fully sent, its client is gone or stopped reading past the send
timeout (`BudgetedResponse`, `send_timeout.py`); a body built at once is built inside the route's `with` block
on the results' handle (`engine.Scored`), which releases them as the route returns it."""

from __future__ import annotations

import json
import struct
import time
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import orjson
from starlette.responses import Response, StreamingResponse

from model.runtime.outputs import HIDDEN_POSITIONS, HIDDEN_STATES, OUTPUT_KINDS, Rows

from .engine import Scored
from .packing import row_offsets
from .schemas import SAFETENSORS_MEDIA as SAFETENSORS
from .send_timeout import SendTimedOut

STREAM_BYTES = 1 << 20  # binary bodies above this are streamed in slices of this size
JSON_STREAM_BYTES = 1 << 20  # JSON of results above this many bytes is streamed, encoded as it is sent
JSON_CHUNK = 1 << 18  # bytes of encoded JSON gathered per chunk sent
JSON_LEAF_BYTES = 1 << 16  # arrays up to this size are encoded in one orjson call
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS  # id2label: int keys


def to_json(obj: Any) -> bytes:
    """NaN (a missing next token's log-probability) becomes null."""
    return orjson.dumps(obj, option=JSON_OPTIONS)


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(to_json(obj), status_code=status, media_type="application/json", headers=headers)


def _json_pieces(obj: Any) -> Iterator[bytes]:
    """`to_json(obj)` in pieces: arrays of more than one dimension and `JSON_LEAF_BYTES` one sub-array (row) at a
    time, so that no piece is larger than one row's text; arrays may be views that are not contiguous. Joined, the pieces are to_json's bytes exactly (orjson's compact separators)."""
    if isinstance(obj, dict):
        yield b"{"
        for i, (key, value) in enumerate(obj.items()):
            yield (b"," if i else b"") + to_json({key: 0})[1:-2]  # '"key":' as orjson writes it (int keys too)
            yield from _json_pieces(value)
        yield b"}"
    elif isinstance(obj, np.ndarray) and (obj.ndim <= 1 or obj.nbytes <= JSON_LEAF_BYTES):
        yield to_json(np.ascontiguousarray(obj))
    elif isinstance(obj, Iterator):  # items made as they are encoded, each encoded whole (one choice, one row)
        yield b"["
        for i, item in enumerate(obj):
            yield (b"," if i else b"") + to_json(item)
        yield b"]"
    elif isinstance(obj, (list, tuple, np.ndarray)):
        yield b"["
        for i, item in enumerate(obj):
            if i:
                yield b","
            yield from _json_pieces(item)
        yield b"]"
    else:
        yield to_json(obj)


def iter_json(obj: Any, chunk: int = JSON_CHUNK) -> Iterator[bytes]:
    """The JSON of `obj` (dicts, lists, numpy arrays as they lie in shared memory) in chunks of about `chunk` bytes,
    encoded as they are asked for: the whole body never exists at once."""
    parts: list[bytes] = []
    size = 0
    for piece in _json_pieces(obj):
        parts.append(piece)
        size += len(piece)
        if size >= chunk:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


# ---------------------------------------------------------------------------------------------------- JSON


def _nullable(arr: np.ndarray, null: int) -> list:
    """The array as nested lists with `null` written as None."""
    if arr.ndim == 1:
        return [None if v == null else v for v in arr.tolist()]
    return [_nullable(a, null) for a in arr]


def _put(item: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        item = item.setdefault(key, {})
    item[path[-1]] = value


def logits_json(scored: Scored, model_name: str) -> dict:
    """/v1/logits: per sequence, every output the request asked for at its key path (OutputKind.json). The body as
    an object whose arrays are views of the results (encoded by `scored_response`, streamed when large)."""
    out = scored.outputs
    kinds = [k for k in OUTPUT_KINDS if k.json is not None and out.get(k) is not None]
    starts = {rows: out.offsets(rows) for rows in Rows}
    data = []
    for i, n in enumerate(scored.inputs.lengths):
        item: dict = {"index": i, "num_tokens": n}
        for kind in kinds:
            a, b = starts[kind.rows][i : i + 2]
            value = out[kind][(slice(None),) * kind.row_dim + (slice(a, b),)]
            _put(item, kind.json, value if kind.json_null is None else _nullable(value, kind.json_null))
        data.append(item)
    n = scored.inputs.num_tokens
    return {"object": "logits", "model": model_name, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}


def hidden_states_json(scored: Scored, model_name: str) -> dict:
    out = scored.outputs
    offsets = out.offsets(Rows.HIDDEN)
    data = []
    for i, n in enumerate(scored.inputs.lengths):
        a, b = offsets[i : i + 2]
        data.append({"index": i, "num_tokens": n, "positions": out[HIDDEN_POSITIONS][a:b],
                     "layers": list(out.layers),
                     "hidden_states": out[HIDDEN_STATES][:, a:b]})
    n = scored.inputs.num_tokens
    return {"object": "hidden_states", "model": model_name, "data": data,
            "usage": {"prompt_tokens": n, "total_tokens": n}}


# ---------------------------------------------------------------------------------------------- safetensors

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.float64): "F64",
}


def cast(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """float32 array -> (array of the wire bytes, safetensors dtype code)."""
    if dtype == "float32":
        return arr, "F32"
    if dtype == "float16":
        return arr.astype(np.float16), "F16"
    if dtype == "bfloat16":
        import torch

        # torch's rounding (what a client's .to(torch.bfloat16) gives); it only reads the array, which is a
        # read-only view of the workers' shared memory, so its warning about writing to one does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16)
        return t.view(torch.int16).numpy(), "BF16"
    raise ValueError(dtype)


class CastBytes:
    """The bytes of a large float32 array in a half-precision wire dtype, cast one slice at a time as they are sent
    (`_slices`): no whole half-precision copy in the front end beside the results in shared memory."""

    itemsize = 2

    def __init__(self, arr: np.ndarray, dtype: str):
        self.flat = np.ascontiguousarray(arr).reshape(-1)  # a view of shared memory (results are contiguous)
        self.dtype = dtype
        self.shape = arr.shape

    def __len__(self) -> int:
        return self.flat.size * self.itemsize

    def __getitem__(self, part: slice) -> bytes:
        """Bytes [start, stop) of the cast array; whole elements (the streamed slice size is even)."""
        start, stop, _ = part.indices(len(self))
        cast_part, _ = cast(self.flat[start // self.itemsize : -(-stop // self.itemsize)], self.dtype)
        return cast_part.tobytes()


def wire_array(arr: np.ndarray, dtype: str) -> tuple[np.ndarray | CastBytes, str]:
    """`cast`, lazily (CastBytes) for arrays above STREAM_BYTES in a half-precision dtype."""
    if dtype != "float32" and arr.nbytes > STREAM_BYTES:
        return CastBytes(arr, dtype), {"float16": "F16", "bfloat16": "BF16"}[dtype]
    return cast(arr, dtype)


def safetensors_parts(tensors: list[tuple[str, np.ndarray, str | None]], metadata: dict[str, str]) -> list:
    """A safetensors file as [header bytes, then each tensor's bytes as a memoryview of the array itself, or a
    CastBytes that casts it as it is read]: the data is not copied here (large responses are streamed from these views, straight from the workers' shared memory)."""
    header: dict[str, Any] = {}
    chunks = []
    offset = 0
    for name, arr, code in tensors:
        if not isinstance(arr, CastBytes):
            arr = np.ascontiguousarray(arr)
            code = code or _ST_DTYPES[arr.dtype]
        n = len(arr) if isinstance(arr, CastBytes) else arr.nbytes
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
        if n:
            chunks.append(arr if isinstance(arr, CastBytes) else memoryview(arr.reshape(-1).view(np.uint8)))
    header["__metadata__"] = metadata
    head = orjson.dumps(header)
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)) + head, *chunks]


def scoring_safetensors(scored: Scored, rows: tuple[Rows, ...], dtype: str, metadata: dict[str, str]) -> list:
    """The binary body: input_row_offsets, then every output of these row sets in table order, each row set's
    offsets right after its first tensor; `dtype` applies to the kinds that follow it."""
    out = scored.outputs
    tensors: list = [("input_row_offsets", row_offsets(scored.inputs.lengths), None)]
    for kind in OUTPUT_KINDS:
        arr = out.get(kind)
        if kind.rows not in rows or arr is None:
            continue
        tensors.append((kind.name, *wire_array(arr, dtype)) if kind.follows_dtype else (kind.name, arr, None))
        if not any(name == kind.rows.offsets for name, _, _ in tensors):
            tensors.append((kind.rows.offsets, out.offsets(kind.rows), None))
    return safetensors_parts(tensors, {**metadata, "layers": json.dumps(list(out.layers)), "dtype": dtype})


async def _slices(parts: list, step: int):
    for part in parts:
        for i in range(0, len(part), step):
            yield part[i : i + step]


class BudgetedResponse(StreamingResponse):
    """A streamed body built from one request's results, which it owns: their handle is handed over to it and
    closed (their bytes in the results budget released) when the body is fully sent, the client is gone, or a send
    waited past the send timeout (the connection is then dropped already); the views over them are dropped too, so
    the mapping goes."""

    def __init__(self, content, results: Scored, **kwargs):
        super().__init__(content, **kwargs)
        self._content = content
        self._results = results.hand_over()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimedOut:  # counted and logged where it timed out: this body ends here, as on a disconnect
            pass
        finally:
            self._results.close()
            for iterator in (self.body_iterator, self._content):
                close = getattr(iterator, "aclose", None)
                try:
                    if close is not None:
                        await close()
                    elif hasattr(iterator, "close"):
                        iterator.close()
                except (RuntimeError, ValueError):  # still running in its thread: it ends with the request
                    pass
            self.body_iterator = self._content = None


def _encode_json(body_obj: Any, metrics) -> Iterator[bytes]:
    t0 = time.perf_counter()
    try:
        yield from iter_json(body_obj)
    finally:
        metrics.serialization_duration.labels("json").observe(time.perf_counter() - t0)


def budgeted_json(body: Any, scored: Scored, *, streamed: bool) -> Response:
    """A JSON body made from a scored request's results (with its timing headers): streamed as it is encoded when
    `streamed` (the response then owns the results), else built here."""
    if streamed:
        return BudgetedResponse(iter_json(body), scored, media_type="application/json",
                                headers=scored.timing_headers)
    content = to_json({k: list(v) if isinstance(v, Iterator) else v for k, v in body.items()})
    return Response(content, media_type="application/json", headers=scored.timing_headers)


def _results_nbytes(scored: Scored) -> int:
    return scored.outputs.nbytes


def scored_response(scored: Scored, accept: str, metrics, *, json_body: Callable[[], Any],
                    binary_parts: Callable[[], list]) -> Response:
    """The safetensors body when the client accepts it, else JSON; with the timing headers. `json_body` gives the
    body as an object (streamed when the results are large: the response then owns the results) or as bytes."""
    t0 = time.perf_counter()
    headers = scored.timing_headers
    if SAFETENSORS in accept:
        parts = binary_parts()
        metrics.serialization_duration.labels("safetensors").observe(time.perf_counter() - t0)
        size = sum(len(p) for p in parts)
        if size > STREAM_BYTES:
            # Streamed from views of the request's shared memory, with the socket's backpressure: no copy of the
            # whole body in this process (full-vocabulary logits are ~200 KB per row).
            headers["content-length"] = str(size)
            return BudgetedResponse(_slices(parts, STREAM_BYTES), scored, media_type=SAFETENSORS,
                                    headers=headers)
        body = b"".join(p[0 : len(p)] if isinstance(p, CastBytes) else p for p in parts)
    else:
        body = json_body()
        if not isinstance(body, bytes):
            if _results_nbytes(scored) > JSON_STREAM_BYTES:
                # Encoded row by row in a worker thread as the client reads (no Content-Length: chunked).
                return BudgetedResponse(_encode_json(body, metrics), scored,
                                        media_type="application/json", headers=headers)
            body = b"".join(iter_json(body))
        metrics.serialization_duration.labels("json").observe(time.perf_counter() - t0)
    return Response(body, media_type=SAFETENSORS if SAFETENSORS in accept else "application/json", headers=headers)
