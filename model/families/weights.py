"""Safetensors checkpoints, memory-mapped, read by slices (never pickle).

A rank asks for rows or columns of a tensor and only those bytes are copied out of the memory map, so its
resident weight memory is its shard, not the model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """The folder is not a usable checkpoint."""


class CheckpointReader:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{self.folder} holds no *.safetensors weights (pickled .bin weights are not loaded)")
        self._stack = ExitStack()
        self._handles = {f: self._stack.enter_context(safe_open(str(self.folder / f), framework="pt")) for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where = weight_map

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        """The whole tensor, or `size` entries from `start` along `dim`, copied out of the map."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from {self.folder}")
        sl = self._handles[self._where[name]].get_slice(name)
        if dim is None:
            return sl[:]
        stop = start + (size if size is not None else sl.get_shape()[dim] - start)
        return sl[(slice(None),) * dim + (slice(start, stop),)]


class ShapeReader(CheckpointReader):
    """A reader that finds tensors and their shapes but copies no data (meta tensors): loading a model built on
    the meta device through it checks that every tensor the model reads is in the checkpoint, in the time it takes
    to read the safetensors headers."""

    def read(self, name: str, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from {self.folder}")
        shape = list(self._handles[self._where[name]].get_slice(name).get_shape())
        if dim is not None:
            shape[dim] = size if size is not None else shape[dim] - start
        return torch.empty(shape, device="meta")
