"""Past one machine: the dataset scorer as a Ray Data callable class, one actor per model replica.

    ds.map_batches(DatasetScorer, fn_constructor_kwargs={"settings": {...}, "options": ScoreOptions(...)},
                   batch_format="pyarrow", concurrency=N, num_cpus=...)

Each actor starts the in-process server (its own tp group of worker processes, `settings` as `logitserve serve`
takes them) and scores every batch it is given exactly as `score-dataset` does on one machine (scorer.py), so the
columns are the same bits. `score_dataset_ray` runs it for `score-dataset --ray ADDRESS`: Ray reads the input
(blocks spread over the cluster), the actor pool scores it, and the driver writes the scored rows, in input order,
as the same `part-NNNNN.parquet` shards the local run writes (see docs/offline.md)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from .scorer import ScoreOptions, ScoreSetupError, check_options, input_kind, score_table


class DatasetScorer:
    """A Ray Data actor: the model (one replica) loaded once, then `__call__` per batch of rows."""

    def __init__(self, settings: dict, options: ScoreOptions):
        from ..cli import resolve_model
        from ..settings import Settings
        from .inprocess import BackgroundLoop, InProcessServer

        settings = Settings(**settings)
        settings = settings.model_copy(update={"model": resolve_model(settings.model, settings.revision)})
        self.options = options
        self._loop = BackgroundLoop()

        async def start():
            server = InProcessServer(settings)
            await server.__aenter__()
            return server

        self.server = self._loop.run(start())
        self._checked = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self._checked:
            check_options(self.server, self.options, input_kind(batch.schema, self.options.column))
            self._checked = True
        scored = self._loop.run(score_table(self.server, batch, self.options))
        for name, values in scored.columns.items():
            batch = batch.append_column(name, values)
        return batch

    def __del__(self):
        loop = getattr(self, "_loop", None)
        if loop is not None:
            self._loop = None
            loop.run(self.server.__aexit__(None, None, None))
            loop.close()


def read_ray_dataset(source: str, split: str = "train"):
    """The input as a Ray Dataset, read by Ray's own readers (blocks spread over the cluster)."""
    import ray.data

    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".parquet":
        return ray.data.read_parquet(str(path))
    if path.is_file() and path.suffix in (".jsonl", ".json", ".ndjson"):
        return ray.data.read_json(str(path))
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        return ray.data.from_huggingface(ds[split] if isinstance(ds, datasets.DatasetDict) else ds)
    if path.is_dir() and (files := sorted(path.rglob("*.parquet"))):
        return ray.data.read_parquet([str(f) for f in files])
    if path.exists():
        raise ScoreSetupError(f"{source}: not a .parquet or .jsonl file, a folder of Parquet files or a datasets folder")
    import datasets

    return ray.data.from_huggingface(datasets.load_dataset(source, split=split, streaming=True))


def score_dataset_ray(job, outdir: str | Path, settings, *, address: str | None = "auto", actors: int | None = None,
                      resume: bool = False, progress: bool = True):
    """`score-dataset --ray ADDRESS`: the same OUTDIR as the local run (shards, job.json, _SUCCESS)."""
    import json
    from dataclasses import asdict

    import ray

    from .score_dataset import SUCCESS_FILE, DatasetSummary, is_done, prepare_outdir, write_shard
    from .scorer import ScoredRows

    if "hidden_states" in job.options.outputs:
        raise ScoreSetupError("--outputs hidden_states is written by the local run only (its safetensors shards); "
                              "drop --ray or ask for the other outputs")
    outdir = Path(outdir)
    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # shards in input order
    settings_fields = settings.model_dump(exclude_unset=False)
    model = {"name": settings.served_model_name or Path(settings.model).name, "checkpoint": str(settings.model),
             "dtype": settings.dtype, "batch_invariant": settings.batch_invariant, "pooling": settings.pooling}
    prepare_outdir(outdir, job, model, resume)
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, settings.tp))
    if settings.device.startswith("cuda"):
        device_resources = {"num_gpus": settings.tp}
    else:
        # The model's threads run in the actor's worker processes, outside Ray's accounting; what an actor claims
        # must leave a CPU for Ray Data's read tasks (one CPU each), or the pool holds them and the reads never start.
        cpus = ray.cluster_resources().get("CPU", 1)
        device_resources = {"num_cpus": min(settings.tp, max(0.1, (cpus - 1) / actors))}
    scored = read_ray_dataset(job.input, job.split).map_batches(
        DatasetScorer, fn_constructor_kwargs={"settings": settings_fields, "options": job.options},
        batch_format="pyarrow", batch_size=job.options.rows_per_request * 8, concurrency=actors,
        **device_resources)
    summary = DatasetSummary()
    batches = scored.iter_batches(batch_size=job.rows_per_shard, batch_format="pyarrow")
    for index, table in enumerate(batches):
        if resume and is_done(outdir, index):  # scored again by the pool, not rewritten
            summary.shards_skipped += 1
            continue
        write_shard(outdir, index, table, ScoredRows({}), index * job.rows_per_shard)
        summary.rows += table.num_rows
        summary.shards_written += 1
        if "num_tokens" in table.column_names:
            summary.tokens += sum(n or 0 for n in table.column("num_tokens").to_pylist())
        summary.failed_rows += table.num_rows - table.column("error").null_count
    summary.seconds = time.perf_counter() - start
    (outdir / SUCCESS_FILE).write_text(json.dumps(asdict(summary)))
    return summary
