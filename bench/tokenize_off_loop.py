"""The event loop's lag while a large text is tokenized: on the loop, on a thread, on a process (service/tokenizing.py).

A coroutine wakes every 10 ms and records how late it woke (what /health would wait); meanwhile one text is
tokenized (the tiny checkpoints' tokenizer, or --tokenizer a tokenizer.json) and its ids made into a list, as
/tokenize does. Prints the lag's p50 / p99 / max and the tokenizing time for each placement.

    python bench/tokenize_off_loop.py [--mb 8] [--tokenizer path/tokenizer.json]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

_TOK = None


def _load(path: str | None):
    global _TOK
    if _TOK is None:
        if path:
            from tokenizers import Tokenizer

            _TOK = Tokenizer.from_file(path)
        else:
            from tests.checkpoints import make_tokenizer

            _TOK = make_tokenizer()
    return _TOK


def encode(path: str | None, text: str) -> list[int]:
    """encode_batch (releases the GIL) and the ids as a list (holds it), as /tokenize does; a process pool pickles
    the text there and the list back."""
    return _load(path).encode_batch([text])[0].ids


async def measure(placement: str, path: str | None, text: str) -> tuple[list[float], float, int]:
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker():
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t0 - 0.01)

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    if placement == "loop":
        n = len(encode(path, text))
    elif placement == "thread":
        with ThreadPoolExecutor(1) as pool:
            n = len(await loop.run_in_executor(pool, encode, path, text))
    else:
        with ProcessPoolExecutor(1) as pool:
            await loop.run_in_executor(pool, _load, path)  # the tokenizer loaded once, as a pool would keep it
            t0 = time.perf_counter()
            n = len(await loop.run_in_executor(pool, encode, path, text))
    elapsed = time.perf_counter() - t0
    done.set()
    await tick
    return lags, elapsed, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=8)
    ap.add_argument("--tokenizer")
    args = ap.parse_args()
    from tests.checkpoints import TRAINING_TEXT

    size = int(args.mb * (1 << 20))
    text = (TRAINING_TEXT * (size // len(TRAINING_TEXT) + 1))[:size]
    _load(args.tokenizer)
    for placement in ("loop", "thread", "process"):
        lags, elapsed, n = asyncio.run(measure(placement, args.tokenizer, text))
        ms = np.array(lags) * 1000
        print(f"{placement:8s} tokens {n}  tokenize {elapsed:6.1f} s  loop lag ms: p50 {np.percentile(ms, 50):7.1f} "
              f"p99 {np.percentile(ms, 99):7.1f} max {ms.max():7.1f}  ({len(ms)} ticks)")


if __name__ == "__main__":
    main()
