"""`logitserve score-dataset`: a dataset scored shard by shard into OUTDIR.

OUTDIR holds `part-NNNNN.parquet` (shard N: input rows [N * rows_per_shard, (N + 1) * rows_per_shard) with the
input's columns, then the output columns and `error`), `part-NNNNN.hidden_states.safetensors` beside a shard when
hidden states were asked for (one tensor [tokens, hidden] per row, named by the row's `hidden_states_key`), and
`job.json` (what was asked: a resumed run must ask the same). A shard is written to a temporary name and renamed
when complete, so after a crash or kill every `part-*.parquet` present is whole, and `--resume` scores only the
shards missing. `_SUCCESS` marks a finished run.

Memory: the input is read as a stream of record batches; at most `SHARDS_IN_FLIGHT` shards being scored plus the
one being read (their input rows and outputs) are held at once, plus the server's own results budget
(--max-result-bytes), whatever the dataset's size.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .dataset_io import read_batches, shards
from .inprocess import InProcessServer
from .scorer import ScoreOptions, ScoreSetupError, ScoredRows, check_options, input_kind, score_table

DEFAULT_ROWS_PER_SHARD = 1000
# Shards held at once: one being scored while the previous one's last requests finish and it is written.
SHARDS_IN_FLIGHT = 2
# Requests in flight at once: enough to keep every replica's batches full.
REQUESTS_IN_FLIGHT = 8
JOB_FILE = "job.json"
SUCCESS_FILE = "_SUCCESS"


@dataclass(frozen=True)
class DatasetJob:
    """What one score-dataset run is asked: a resumed run must ask exactly this."""

    input: str
    options: ScoreOptions
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    split: str = "train"

    def describe(self) -> dict:
        options = asdict(self.options)
        options.pop("rows_per_request")  # how rows are grouped into requests changes no output
        return {"input": self.input, "split": self.split, "rows_per_shard": self.rows_per_shard,
                "column": options["column"], "outputs": list(options["outputs"]), "top_k": options["top_k"]}


@dataclass
class DatasetSummary:
    rows: int = 0  # scored in this run
    tokens: int = 0
    shards_written: int = 0
    shards_skipped: int = 0  # already complete (--resume)
    failed_rows: int = 0
    seconds: float = 0.0


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def prepare_outdir(outdir: Path, job: DatasetJob, model: dict, resume: bool) -> None:
    """Record the job in OUTDIR, or check that a resumed run asks the same as the run it finishes."""
    outdir.mkdir(parents=True, exist_ok=True)
    record = {**job.describe(), "model": model}
    path = outdir / JOB_FILE
    if path.exists():
        if not resume:
            raise ScoreSetupError(f"{outdir} holds a score-dataset run already: --resume finishes it, or give "
                                  "another OUTDIR")
        before = json.loads(path.read_text())
        if before != record:
            changed = sorted(k for k in record if before.get(k) != record[k])
            raise ScoreSetupError(f"--resume: {outdir} was a run with other {', '.join(changed)} ({JOB_FILE})")
    else:
        path.write_text(json.dumps(record, indent=1))
    (outdir / SUCCESS_FILE).unlink(missing_ok=True)


def write_shard(outdir: Path, index: int, table: pa.Table, scored: ScoredRows, first_row: int) -> None:
    """The shard's Parquet (and safetensors) under a temporary name, renamed when whole."""
    name = shard_name(index)
    for column, values in scored.columns.items():
        table = table.append_column(column, values)
    if scored.tensors:
        from safetensors.numpy import save_file

        tensors_name = f"{name}.hidden_states.safetensors"
        keys = [f"row-{first_row + i}" if i in scored.tensors else None for i in range(table.num_rows)]
        table = table.append_column("hidden_states_file", pa.array(
            [tensors_name if k else None for k in keys], type=pa.string()))
        table = table.append_column("hidden_states_key", pa.array(keys, type=pa.string()))
        tmp = outdir / f".{tensors_name}.tmp"
        save_file({f"row-{first_row + i}": t for i, t in scored.tensors.items()}, str(tmp))
        os.replace(tmp, outdir / tensors_name)
    tmp = outdir / f".{name}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, outdir / f"{name}.parquet")


def is_done(outdir: Path, index: int) -> bool:
    return (outdir / f"{shard_name(index)}.parquet").is_file()


def _tokens(scored: ScoredRows) -> int:
    counts = scored.columns.get("num_tokens")
    return int(pc.sum(counts).as_py() or 0) if counts is not None else 0


async def _next(it: Iterator):
    """The next item of a blocking iterator (file reads), off the event loop that feeds the workers."""
    return await asyncio.to_thread(next, it, None)


async def score_dataset(server: InProcessServer, job: DatasetJob, outdir: str | Path, *, resume: bool = False,
                        progress: bool = True) -> DatasetSummary:
    """Score `job.input` into `outdir` (see the module's docstring for the layout)."""
    from tqdm.auto import tqdm

    outdir = Path(outdir)
    summary = DatasetSummary()
    start = time.perf_counter()
    it = shards(read_batches(job.input, job.split), job.rows_per_shard)
    first = await _next(it)
    if first is None:
        raise ScoreSetupError(f"{job.input}: no rows")
    check_options(server, job.options, input_kind(first.schema, job.options.column))
    prepare_outdir(outdir, job, model_record(server), resume)
    limit = asyncio.Semaphore(REQUESTS_IN_FLIGHT)
    bar = tqdm(unit="row", desc="score-dataset", disable=not progress)
    window: deque[tuple[int, pa.Table, asyncio.Task]] = deque()

    async def finish() -> None:
        index, table, task = window.popleft()
        scored = await task
        await asyncio.to_thread(write_shard, outdir, index, table, scored, index * job.rows_per_shard)
        summary.rows += table.num_rows
        summary.tokens += _tokens(scored)
        summary.failed_rows += table.num_rows - scored.columns["error"].null_count
        summary.shards_written += 1
        elapsed = time.perf_counter() - start
        bar.update(table.num_rows)
        bar.set_postfix(tokens=summary.tokens, tok_s=f"{summary.tokens / max(elapsed, 1e-9):.0f}", refresh=False)

    index, table = 0, first
    while table is not None:
        if resume and is_done(outdir, index):
            summary.shards_skipped += 1
            bar.update(table.num_rows)
        else:
            window.append((index, table, asyncio.ensure_future(score_table(server, table, job.options, limit))))
            while len(window) >= SHARDS_IN_FLIGHT:
                await finish()
        index += 1
        table = await _next(it)
    while window:
        await finish()
    bar.close()
    summary.seconds = time.perf_counter() - start
    (outdir / SUCCESS_FILE).write_text(json.dumps(asdict(summary)))
    return summary


def model_record(server: InProcessServer) -> dict:
    """What makes a resumed run's numbers comparable with the first run's: the model and its numerics."""
    s = server.settings
    return {"name": server.served.name, "checkpoint": str(server.engine.checkpoint), "dtype": s.dtype,
            "batch_invariant": s.batch_invariant, "pooling": s.pooling}
