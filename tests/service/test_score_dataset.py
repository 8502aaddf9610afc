"""`logitserve score-dataset`: numbers equal to the live server's, a killed run resumed equals an uninterrupted
one, and a dataset larger than the memory bound is streamed within it."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service.conftest import REPO


def _corpus(path, rows: int) -> None:
    texts = [f"document {i} " + "word " * (i % 13) + "end" for i in range(rows)]
    pq.write_table(pa.table({"text": texts, "row": list(range(rows))}), path)


def _score(model, source, outdir, *extra, **popen):
    cmd = [sys.executable, "-m", "service", "score-dataset", str(source), "-o", str(outdir), "--model", str(model),
           *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _read(outdir) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(outdir.glob("part-*.parquet"))])


def test_outputs_equal_the_server(tiny_checkpoint, start_server, tmp_path):
    source, outdir = tmp_path / "in.jsonl", tmp_path / "out"
    texts = ["hello world", "the cat sat on the mat", "a"]
    source.write_text("".join(f'{{"text": "{t}", "k": {i}}}\n' for i, t in enumerate(texts)))
    proc = _score(tiny_checkpoint, source, outdir, "--outputs",
                  "num_tokens,sum_logprob,perplexity,token_logprobs,top_k=3,target_ranks,entropy,embedding,hidden_states")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    table = _read(outdir)
    assert table.column("k").to_pylist() == [0, 1, 2] and table.column("text").to_pylist() == texts
    server = start_server(tiny_checkpoint)
    with server.client() as client:
        live = client.post("/v1/logits", json={"inputs": texts, "return_logits": "all", "logits": False,
                                               "target_logprobs": True, "top_k": 3, "target_ranks": True,
                                               "entropy": True}).json()["data"]
        emb = client.post("/v1/embeddings", json={"input": texts}).json()["data"]
        hidden = client.post("/v1/hidden_states", json={"inputs": texts, "return_hidden_states": "all"}).json()["data"]
    from safetensors.numpy import load_file

    for i, row in enumerate(table.to_pylist()):
        lp = np.asarray(live[i]["target_logprobs"][:-1], dtype=np.float32)
        assert row["num_tokens"] == live[i]["num_tokens"]
        assert np.array_equal(np.asarray(row["token_logprobs"], dtype=np.float32), lp)
        assert row["sum_logprob"] == float(np.sum(lp, dtype=np.float64))
        if len(lp):
            assert row["perplexity"] == math.exp(-row["sum_logprob"] / len(lp))
        assert row["top_k_ids"] == live[i]["top_k"]["ids"]
        assert np.array_equal(np.asarray(row["top_k_logprobs"], dtype=np.float32),
                              np.asarray(live[i]["top_k"]["logprobs"], dtype=np.float32))
        assert row["target_ranks"] == live[i]["target_ranks"][:-1]
        assert np.array_equal(np.asarray(row["entropy"], np.float32), np.asarray(live[i]["entropy"], np.float32))
        assert np.array_equal(np.asarray(row["embedding"], np.float32), np.asarray(emb[i]["embedding"], np.float32))
        tensors = load_file(str(outdir / row["hidden_states_file"]))
        assert np.array_equal(tensors[row["hidden_states_key"]],
                              np.asarray(hidden[i]["hidden_states"][0], dtype=np.float32))
        assert row["error"] is None


def test_killed_run_resumed_equals_uninterrupted(tiny_checkpoint, tmp_path):
    source = tmp_path / "in.parquet"
    _corpus(source, 1200)
    flags = ("--rows-per-shard", "40", "--outputs", "num_tokens,perplexity,token_logprobs,top_k=2")
    whole = _score(tiny_checkpoint, source, tmp_path / "whole", *flags)
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]

    cut = tmp_path / "cut"
    killed = _score(tiny_checkpoint, source, cut, *flags)
    deadline = time.monotonic() + 300
    while not (cut / "part-00002.parquet").exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1][-3000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    done_before = len(list(cut.glob("part-*.parquet")))
    assert done_before < 30  # killed mid-run: shards were missing
    refused = _score(tiny_checkpoint, source, cut, *flags)
    assert refused.wait(timeout=300) == 2  # an existing run is not overwritten without --resume
    resumed = _score(tiny_checkpoint, source, cut, *flags, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"{done_before} already done" in err
    assert sorted(p.name for p in cut.glob("part-*")) == sorted(p.name for p in (tmp_path / "whole").glob("part-*"))
    for path in sorted((tmp_path / "whole").glob("part-*.parquet")):
        assert pq.read_table(cut / path.name).equals(pq.read_table(path)), path.name


ROW_PAYLOAD = 64 * 1024  # bytes of an incompressible passthrough column per row
ROWS = 5000  # ~320 MiB of input
ROWS_PER_SHARD = 50  # ~3.2 MiB of payload per shard
MEMORY_BOUND = 128 << 20  # peak RSS growth allowed while streaming: a few shards and row groups, not the dataset


def test_dataset_larger_than_the_bound_is_streamed(tiny_checkpoint, tmp_path):
    psutil = pytest.importorskip("psutil")
    from service.batch import Scorer

    source = tmp_path / "big.parquet"
    rng = np.random.default_rng(0)
    schema = pa.schema([("text", pa.string()), ("payload", pa.binary())])
    with pq.ParquetWriter(source, schema) as writer:  # written in pieces: the test itself stays small
        for start in range(0, ROWS, 100):
            writer.write_table(pa.table({"text": [f"row {i} text" for i in range(start, start + 100)],
                                         "payload": [rng.bytes(ROW_PAYLOAD) for _ in range(100)]}, schema=schema),
                               row_group_size=100)
    assert source.stat().st_size > 2 * MEMORY_BOUND
    me = psutil.Process()
    with Scorer(model=str(tiny_checkpoint)) as scorer:
        baseline = me.memory_info().rss
        peak = baseline
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, me.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            summary = scorer.score_dataset(source, tmp_path / "out", outputs="num_tokens,perplexity",
                                           rows_per_shard=ROWS_PER_SHARD, progress=False)
        finally:
            stop.set()
            sampler.join()
    assert summary.rows == ROWS and summary.failed_rows == 0
    assert peak - baseline < MEMORY_BOUND, f"peak RSS grew by {(peak - baseline) >> 20} MiB"
    first = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert first.num_rows == ROWS_PER_SHARD and first.column("payload").to_pylist()[0] == \
        pq.ParquetFile(source).read_row_group(0).column("payload")[0].as_py()
