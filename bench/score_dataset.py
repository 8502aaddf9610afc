"""score-dataset perplexity over a generated corpus against the HTTP server driven by a concurrent client, same
run, same model, plus the float32 matmul roofline measured in the same run.

roofline: the model's matmul FLOPs per token (every layer's qkv, o, gate_up, down and the lm_head on every row, as
perplexity needs each position's distribution) divided by the rate `torch.nn.functional.linear` (MKL sgemm, what the
decoder runs) reaches on the model's own weights at the same shapes (one batch of --max-batch-tokens real tokens):
bench/common.Roofline. It counts no attention, norm or softmax, so a share of it is a lower bound of efficiency.

    python bench/score_dataset.py [--docs 5000] [--model PATH] [--concurrency 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from common import machine, model_path, start_server

WORDS = ("the of and to in is was for on that with as by at from it an be this which or are have not but had his "
         "they you were their one all we can her has there been if more when will would who so no data model time "
         "science river music city history energy language market water system people world").split()


def corpus(docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 400))) for _ in range(docs)]


async def http_client(url: str, texts: list[str], concurrency: int, rows: int) -> int:
    import httpx

    queue = [texts[i : i + rows] for i in range(0, len(texts), rows)]
    tokens = 0

    async def worker(client):
        nonlocal tokens
        while queue:
            chunk = queue.pop(0)
            r = await client.post("/v1/logits", json={"inputs": chunk, "return_logits": "all", "logits": False,
                                                      "target_logprobs": True})
            r.raise_for_status()
            tokens += r.json()["usage"]["prompt_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=5000)
    p.add_argument("--model")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--json")
    args = p.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model.runtime.runner import ModelRunner
    from service.batch import Scorer

    from common import Roofline

    path, label = model_path(args.model)
    texts = corpus(args.docs)
    work = Path(tempfile.mkdtemp(prefix="bench-score-dataset-"))
    pq.write_table(pa.table({"text": texts}), work / "corpus.parquet")
    flags = ("--max-batch-tokens", str(args.max_batch_tokens))

    server, url = start_server(path, *flags)
    try:
        t0 = time.perf_counter()
        http_tokens = asyncio.run(http_client(url, texts, args.concurrency, 32))
        http_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait()

    with Scorer(model=str(path), max_batch_tokens=args.max_batch_tokens) as scorer:
        summary = scorer.score_dataset(work / "corpus.parquet", work / "out", outputs="num_tokens,perplexity",
                                       progress=False)
    assert summary.tokens == http_tokens, (summary.tokens, http_tokens)

    runner = ModelRunner.load(path, device="cpu", dtype="float32")
    roof_s, roof_flops = Roofline(runner)(args.max_batch_tokens, args.max_batch_tokens)
    roof_tok_s = args.max_batch_tokens / roof_s
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": label, "docs": args.docs,
        "tokens": http_tokens, "http_tok_s": http_tokens / http_s, "score_dataset_tok_s": summary.tokens / summary.seconds,
        "roofline_tok_s": roof_tok_s, "matmul_gflop_s": roof_flops / roof_s / 1e9,
    }
    result["speedup_vs_http"] = result["score_dataset_tok_s"] / result["http_tok_s"]
    result["roofline_share"] = result["score_dataset_tok_s"] / roof_tok_s
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
