"""Tokens/s through HTTP (16 concurrent clients) against the same batches run in-process, in one run.

    python bench/service.py [--model DIR] [--requests 192] [--seq-len 128] [--clients 16] [--max-batch-tokens 2048]

Without --model a random Llama checkpoint (hidden 256, 4 layers, vocab 8192) is written to a temporary folder.
Two workloads: last-token logits as JSON, and all-rows logits as binary (safetensors). The in-process baseline runs
`ModelRunner.run` on batches packed exactly as the server packs them (whole requests up to --max-batch-tokens)
with the thread count a single worker gets. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import start_server  # noqa: E402
from service.packing import pack_ids, plan_batches  # noqa: E402  (the server's packing rule)

WORKLOADS = {
    "last-token, JSON": ({"return_logits": "last_token"}, {}),
    "all rows, binary": ({"return_logits": "all"}, {"Accept": "application/x-safetensors"}),
}


def make_requests(n: int, seq_len: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(seq_len)] for _ in range(n)]


def in_process(model: str, requests, options: dict, max_batch_tokens: int) -> float:
    import torch

    from model.runtime.outputs import OutputSpec, ReturnLogits
    from model.runtime.runner import ModelRunner

    torch.set_num_threads(os.cpu_count() or 1)
    runner = ModelRunner.load(model, device="cpu", dtype="float32")
    spec = OutputSpec(return_logits=ReturnLogits(options["return_logits"]))
    batches = [[requests[i] for i in b] for b in plan_batches(requests, max_batch_tokens)]

    def run(batch):
        ids, offsets = pack_ids(batch)
        return runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), [spec] * len(batch))

    run(batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    return sum(map(len, requests)) / (time.perf_counter() - t0)


async def through_http(url: str, requests, options: dict, headers: dict, clients: int) -> float:
    import httpx

    queue = list(enumerate(requests))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        # warm-up
        r = await c.post("/v1/logits", json={"input_ids": [requests[0]], **options}, headers=headers)
        r.raise_for_status()

        async def client():
            while queue:
                _, ids = queue.pop()
                r = await c.post("/v1/logits", json={"input_ids": [ids], **options}, headers=headers)
                r.raise_for_status()
                _ = r.content

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return sum(map(len, requests)) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    args = p.parse_args()

    model = args.model
    if model is None:
        from tests.checkpoints import make_checkpoint

        model = str(make_checkpoint(Path(tempfile.mkdtemp()) / "bench-llama", "llama", vocab_size=8192, hidden_size=256,
                                    intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2,
                                    with_tokenizer=False, max_position_embeddings=4096))
    from model.families.config import ModelConfig

    vocab = ModelConfig.from_pretrained(model).vocab_size
    requests = make_requests(args.requests, args.seq_len, vocab)

    server, url = start_server(model, "--max-batch-tokens", str(args.max_batch_tokens), "--max-queue-tokens", "10000000")
    rows = []
    try:
        for name, (options, headers) in WORKLOADS.items():
            http = asyncio.run(through_http(url, requests, options, headers, args.clients))
            base = in_process(model, requests, options, args.max_batch_tokens)
            rows.append((name, http, base))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    cfg = ModelConfig.from_pretrained(model)
    print(f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores, CPU only); "
          f"date: {datetime.date.today().isoformat()}")
    print(f"Model: {Path(model).name} (hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}); "
          f"{args.requests} requests of 1 x {args.seq_len} tokens, {args.clients} concurrent clients, "
          f"--max-batch-tokens {args.max_batch_tokens}, tp=1, replicas=1\n")
    print("| workload | HTTP tokens/s | in-process tokens/s | HTTP / in-process |")
    print("| --- | ---: | ---: | ---: |")
    for name, http, base in rows:
        print(f"| {name} | {http:,.0f} | {base:,.0f} | {100 * http / base:.0f}% |")


if __name__ == "__main__":
    main()
