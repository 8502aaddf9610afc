"""The offline subcommands of `logitserve`: `run-batch` and `score-dataset`. Besides their own arguments they take
every `serve` flag (the in-process server is configured as `serve` is)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

OFFLINE_COMMANDS = ("run-batch", "score-dataset")


def add_offline_commands(sub, add_settings_flags) -> None:
    from .score_dataset import DEFAULT_ROWS_PER_SHARD
    from .scorer import DEFAULT_OUTPUTS, OUTPUTS

    run = sub.add_parser("run-batch", help="answer an OpenAI batch file (JSON Lines) in-process, without HTTP")
    run.add_argument("-i", "--input-file", dest="input_file", required=True, metavar="REQUESTS.jsonl")
    run.add_argument("-o", "--output-file", dest="output_file", required=True, metavar="RESULTS.jsonl")
    run.add_argument("--resume", action="store_true", help="skip the custom_ids already in the output (appended to)")
    add_settings_flags(run)

    score = sub.add_parser("score-dataset", help="score a Parquet / JSON Lines / datasets dataset into Parquet shards")
    score.add_argument("input", metavar="INPUT", help="Parquet file or folder, .jsonl file, datasets folder or name")
    score.add_argument("-o", "--outdir", required=True, metavar="OUTDIR")
    score.add_argument("--column", default="text", help="the text, token-id list or messages column (default: text)")
    score.add_argument("--outputs", default=",".join(DEFAULT_OUTPUTS), metavar="LIST",
                       help=f"comma-separated, of {', '.join(OUTPUTS)}; top_k=K sets k (default 5) "
                            f"(default: {','.join(DEFAULT_OUTPUTS)})")
    score.add_argument("--ray", metavar="ADDRESS", default=None,
                       help="score with a Ray Data actor pool on this cluster ('auto', 'ray://host:10001', 'local')")
    score.add_argument("--ray-actors", type=int, default=None, metavar="N",
                       help="actors (model replicas) in the Ray pool (default: what the cluster's CPUs or GPUs hold)")
    score.add_argument("--resume", action="store_true", help="finish an interrupted run in OUTDIR")
    score.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD, metavar="N")
    score.add_argument("--split", default="train", help="the split of a datasets name or DatasetDict folder")
    add_settings_flags(score)


def run_offline(args: argparse.Namespace, settings) -> int:
    from model.families.config import UnsupportedModelError

    from ..rerankers import RerankerSetupError
    from .scorer import ScoreSetupError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per in-process request otherwise
    try:
        if args.command == "run-batch":
            return _run_batch(args, settings)
        return _score_dataset(args, settings)
    except (UnsupportedModelError, RerankerSetupError, ScoreSetupError, FileNotFoundError) as exc:
        print(f"logitserve: {exc}", file=sys.stderr)
        return 2


def _run_batch(args, settings) -> int:
    from .inprocess import InProcessServer
    from .run_batch import run_batch

    async def main():
        async with InProcessServer(settings) as server:
            return await run_batch(server, args.input_file, args.output_file, resume=args.resume)

    summary = asyncio.run(main())
    print(f"run-batch: {summary.lines} lines answered ({summary.failed} not 200), {summary.skipped} already done, "
          f"{summary.tokens} tokens in {summary.seconds:.1f} s", file=sys.stderr)
    return 0


def _score_dataset(args, settings) -> int:
    from .score_dataset import DatasetJob, score_dataset
    from .scorer import ScoreOptions

    outputs, k = ScoreOptions.parse_outputs(args.outputs)
    job = DatasetJob(args.input, ScoreOptions(args.column, outputs, k), args.rows_per_shard, args.split)
    if args.ray:
        from .ray_scorer import score_dataset_ray

        summary = score_dataset_ray(job, args.outdir, settings, address=args.ray, actors=args.ray_actors,
                                    resume=args.resume)
    else:
        from .inprocess import InProcessServer

        async def main():
            async with InProcessServer(settings) as server:
                return await score_dataset(server, job, args.outdir, resume=args.resume)

        summary = asyncio.run(main())
    print(f"score-dataset: {summary.rows} rows ({summary.failed_rows} failed), {summary.tokens} tokens, "
          f"{summary.shards_written} shards written, {summary.shards_skipped} already done, "
          f"{summary.seconds:.1f} s", file=sys.stderr)
    return 0
