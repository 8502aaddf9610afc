"""Offline scoring on the server's own engine, without HTTP: `run-batch` (OpenAI batch files), `score-dataset`
(Parquet / JSON Lines / `datasets` in, Parquet shards out) and the same scorer for Ray Data (ray_scorer.py).

For notebooks::

    from service.batch import Scorer
    Scorer().score_dataset("corpus.parquet", "scored/", outputs="perplexity")

`Scorer` starts the model (the in-process server, configured as `logitserve serve` is) on a thread of its own,
so it works inside a running event loop (Jupyter) too; `close()` or a `with` block stops it.
"""

from __future__ import annotations

from pathlib import Path

from .run_batch import BatchSummary
from .score_dataset import DEFAULT_ROWS_PER_SHARD, DatasetJob, DatasetSummary
from .scorer import DEFAULT_OUTPUTS, ScoreOptions, ScoreSetupError

__all__ = ["BatchSummary", "DatasetJob", "DatasetSummary", "ScoreOptions", "ScoreSetupError", "Scorer"]


class Scorer:
    """The in-process server for synchronous callers. Keyword arguments are `logitserve serve`'s settings
    (`model=`, `tp=`, `replicas=`, ...)."""

    def __init__(self, settings=None, **overrides):
        from ..cli import resolve_model
        from ..settings import Settings
        from .inprocess import BackgroundLoop, InProcessServer

        settings = settings or Settings(**overrides)
        settings = settings.model_copy(update={"model": resolve_model(settings.model, settings.revision)})
        self._loop = BackgroundLoop()

        async def start():
            server = InProcessServer(settings)
            await server.__aenter__()
            return server

        try:
            self.server = self._loop.run(start())
        except BaseException:
            self._loop.close()
            raise

    def score_dataset(self, input: str | Path, outdir: str | Path, *, column: str = "text",
                      outputs: str | tuple[str, ...] = DEFAULT_OUTPUTS, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                      split: str = "train", resume: bool = False, progress: bool = True) -> DatasetSummary:
        from .score_dataset import score_dataset

        names, k = ScoreOptions.parse_outputs(outputs if isinstance(outputs, str) else ",".join(outputs))
        job = DatasetJob(str(input), ScoreOptions(column, names, k), rows_per_shard, split)
        return self._loop.run(score_dataset(self.server, job, outdir, resume=resume, progress=progress))

    def run_batch(self, input: str | Path, output: str | Path, *, resume: bool = False,
                  progress: bool = True) -> BatchSummary:
        from .run_batch import run_batch

        return self._loop.run(run_batch(self.server, input, output, resume=resume, progress=progress))

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run(self.server.__aexit__(None, None, None))
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
