"""/info's numerics before the workers are ready (the front end resolves them) equal what the workers report once
they have loaded: one resolution (RunnerOptions.numerics -> model/runtime/numerics.resolve_numerics)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

NUMERICS = ("dtype", "batch_invariant", "prefix_sharing", "prefix_cache_bytes", "attention", "numerics_reason")


@pytest.mark.parametrize("arch, flags", [
    ("llama", {}),
    ("gemma2", {}),  # cannot share: soft-capped eager attention
    ("llama", {"prefix_sharing": "off", "prefix_cache_bytes": 4096}),
])
def test_info_before_ready_equals_what_the_workers_report(checkpoint_factory, start_server, arch, flags):
    path = checkpoint_factory(arch, with_tokenizer=False)
    app = create_app(Settings(model=str(path), **flags))
    before = TestClient(app, base_url="http://localhost").get("/info").json()  # no lifespan: no worker started
    assert app.state.engine.loaded is None
    args = [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    server = start_server(path, *args)
    try:
        after = server.info()
    finally:
        server.stop()
    assert {k: before[k] for k in NUMERICS} == {k: after[k] for k in NUMERICS}
    assert after["prefix_sharing"] is (arch == "llama" and not flags)
    # the cache extends sharing across batches: with sharing off a size asked for is refused, saying why
    assert after["prefix_cache_bytes"] == (1 << 30 if arch == "llama" and not flags else 0)
