"""`score-dataset --ray`: the Ray Data actor pool (two actors on a local cluster) writes the same shards as the
single-process run."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service.conftest import REPO

pytest.importorskip("ray")


def _score(model, source, outdir, *extra) -> None:
    done = subprocess.run([sys.executable, "-m", "service", "score-dataset", str(source), "-o", str(outdir), "--model",
                           str(model), "--rows-per-shard", "60", "--outputs",
                           "num_tokens,sum_logprob,perplexity,token_logprobs,top_k=3,target_ranks,entropy,embedding",
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ray_run_equals_local_run(tiny_checkpoint, tmp_path):
    source = tmp_path / "in.parquet"
    texts = [f"row {i} " + "token " * (i % 11) for i in range(200)]
    pq.write_table(pa.table({"text": texts, "id": list(range(200))}), source)
    _score(tiny_checkpoint, source, tmp_path / "local")
    _score(tiny_checkpoint, source, tmp_path / "ray", "--ray", "local", "--ray-actors", "2")
    local = sorted(p.name for p in (tmp_path / "local").glob("part-*.parquet"))
    assert local == sorted(p.name for p in (tmp_path / "ray").glob("part-*.parquet")) and len(local) == 4
    for name in local:
        assert pq.read_table(tmp_path / "ray" / name).equals(pq.read_table(tmp_path / "local" / name)), name
