"""Reading a dataset as a stream of Arrow record batches (never loaded whole) and cutting it into shards of a fixed
number of rows. Sources: a Parquet file or folder, a JSON Lines file, a Hugging Face `datasets` folder
(`save_to_disk`) or name (streamed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

# Rows read from the source at a time (the shard size cuts them further).
READ_ROWS = 1024


def read_batches(source: str, split: str = "train", read_rows: int = READ_ROWS) -> Iterator[pa.RecordBatch]:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".parquet":
        yield from _parquet_batches([path], read_rows)
    elif path.is_file() and path.suffix in (".jsonl", ".json", ".ndjson"):
        import pyarrow.json as pj

        # JSON Lines, read block by block; the first block's types stand for the file.
        with pj.open_json(path, read_options=pj.ReadOptions(block_size=1 << 22)) as reader:
            yield from reader
    elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        # Memory-mapped Arrow files: batches are views of the file, not copies.
        for table in ds.with_format("arrow").iter(batch_size=read_rows):
            yield from table.to_batches()
    elif path.is_dir() and (files := sorted(path.rglob("*.parquet"))):
        yield from _parquet_batches(files, read_rows)
    elif path.exists():
        raise ValueError(f"{source}: not a .parquet or .jsonl file, a folder of Parquet files or a datasets folder")
    else:
        import datasets

        stream = datasets.load_dataset(source, split=split, streaming=True)
        for rows in stream.iter(batch_size=read_rows):
            yield from pa.Table.from_pydict(rows).to_batches()


def _parquet_batches(files: list[Path], read_rows: int) -> Iterator[pa.RecordBatch]:
    """One row group at a time: pyarrow's own batch iterators read ahead many row groups, which holds far more than
    a shard when rows are wide."""
    import pyarrow.parquet as pq

    for path in files:
        with pq.ParquetFile(path) as parquet:
            for group in range(parquet.num_row_groups):
                yield from parquet.read_row_group(group).to_batches(max_chunksize=read_rows)


def shards(batches: Iterator[pa.RecordBatch], rows_per_shard: int) -> Iterator[pa.Table]:
    """Consecutive tables of exactly `rows_per_shard` rows (the last one shorter), in the source's order."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch.num_rows, rows_per_shard - count)
            held.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == rows_per_shard:
                yield pa.Table.from_batches(held).combine_chunks()
                held, count = [], 0
    if count:
        yield pa.Table.from_batches(held).combine_chunks()
