"""Response encodings: JSON through orjson (numpy arrays serialized natively) and safetensors bytes."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def to_json(obj: Any) -> bytes:
    """NaN (a missing next token's log-probability) becomes null."""
    return orjson.dumps(obj, option=JSON_OPTIONS)


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

        t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16)
        return t.view(torch.int16).numpy(), "BF16"
    raise ValueError(dtype)


def safetensors_parts(tensors: list[tuple[str, np.ndarray, str | None]], metadata: dict[str, str]) -> list:
    """A safetensors file as [header bytes, then each tensor's bytes as a memoryview of the array itself]: the data
    is not copied here (large responses are streamed from these views, straight from the workers' shared memory)."""
    header: dict[str, Any] = {}
    chunks = []
    offset = 0
    for name, arr, code in tensors:
        arr = np.ascontiguousarray(arr)
        code = code or _ST_DTYPES[arr.dtype]
        n = arr.nbytes
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
        if n:
            chunks.append(memoryview(arr.reshape(-1).view(np.uint8)))
    header["__metadata__"] = metadata
    head = orjson.dumps(header)
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)) + head, *chunks]
