from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(arch, **overrides) -> folder; equal arguments reuse one folder per test session."""
    cache: dict = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        key = (arch, repr(sorted(kwargs.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"ckpt-{arch}")
            cache[key] = make_checkpoint(folder, arch, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    """A tiny Llama checkpoint with a tokenizer: the default model of service tests."""
    return checkpoint_factory("llama")
