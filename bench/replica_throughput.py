"""Throughput of one server replica under a perplexity-scoring load: the figure autoscaling is sized from.

Starts `logitserve serve` (the embedded default model unless --model) with its defaults, and drives it with closed
loops of C concurrent clients (--concurrency 1,4,16), each sending one sequence per request and waiting for the
answer before sending the next: seeded random token ids, lengths uniform in --min-len..--max-len, every row's
target log-prob (`return_logits: "all"`, `logits: false`, `target_logprobs: true`), JSON. After a warm-up, for
--seconds it counts the tokens of completed requests, their latencies and the CPU seconds the server's processes
used (tokens per CPU-second holds on a shared machine, where tokens/s does not), and samples
`logitserve_queue_tokens` from /metrics every 0.25 s. Prints a markdown table; --json writes the raw figures.

    python bench/replica_throughput.py [--model DIR] [--concurrency 1,4,16] [--seconds 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import cpu_name, start_server  # noqa: E402

BODY = {"return_logits": "all", "logits": False, "target_logprobs": True}


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the server and all its processes (front end, workers) so far."""
    import psutil

    total = 0.0
    for proc in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def closed_loop(url: str, pid: int, clients: int, seconds: float, warmup: float, lengths: tuple[int, int],
                      vocab: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    done: list[tuple[float, float, int]] = []  # (finish time, latency, tokens)
    queue_samples: list[float] = []
    start = time.monotonic()
    stop_at = start + warmup + seconds

    async def client(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            ids = [rng.randrange(vocab) for _ in range(rng.randint(*lengths))]
            t0 = time.monotonic()
            r = await c.post("/v1/logits", json={"input_ids": [ids], **BODY})
            r.raise_for_status()
            r.json()
            done.append((time.monotonic(), time.monotonic() - t0, len(ids)))

    cpu = {}

    async def sample_queue(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(0.25)
            if time.monotonic() < start + warmup:
                continue
            if "start" not in cpu:
                cpu["start"] = (time.monotonic(), server_cpu_seconds(pid))
            text = (await c.get("/metrics")).text
            line = next(ln for ln in text.splitlines() if ln.startswith("logitserve_queue_tokens "))
            queue_samples.append(float(line.split()[1]))

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)), sample_queue(c))
    cpu_end = server_cpu_seconds(pid)
    measured = [(t, lat, n) for t, lat, n in done if t >= cpu["start"][0]]
    window = max(t for t, _, _ in measured) - cpu["start"][0]
    lat = sorted(lat for _, lat, _ in measured)
    tokens = sum(n for _, _, n in measured)
    return {
        "clients": clients,
        "requests": len(measured),
        "tokens": tokens,
        "seconds": window,
        "tokens_per_s": tokens / window,
        "p50_s": lat[len(lat) // 2],
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "mean_queue_tokens": sum(queue_samples) / max(1, len(queue_samples)),
        # CPU the server's processes used over the window; on a shared machine the wall rate understates what
        # the replica does with cores of its own, tokens per CPU-second does not.
        "server_cpu_seconds": cpu_end - cpu["start"][1],
        "tokens_per_cpu_second": tokens / max(1e-9, cpu_end - cpu["start"][1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--warmup", type=float, default=8.0)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    if args.model is None:
        from service.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    server, url = start_server(args.model)
    try:
        import httpx

        info = httpx.get(url + "/info").json()
        rows = []
        for i, clients in enumerate(int(c) for c in args.concurrency.split(",")):
            load_before = os.getloadavg()[0]
            row = asyncio.run(closed_loop(url, server.pid, clients, args.seconds, args.warmup, (args.min_len, args.max_len),
                                          vocab, seed=i))
            row["load_average_1m"] = [load_before, os.getloadavg()[0]]
            rows.append(row)
            print(f"clients {clients}: {row['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=120)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit, "cpu": cpu_name(), "cores": os.cpu_count(),
            "model": info["model"], "dtype": info["dtype"], "device": info["device"],
            "max_batch_tokens": info["limits"]["max_batch_tokens"], "lengths": [args.min_len, args.max_len]}
    print(f"\n{meta['model']} ({meta['dtype']}, {meta['device']}), {meta['cpu']}, {meta['cores']} cores, "
          f"{meta['date']}, commit {commit}; lengths {args.min_len}..{args.max_len}, perplexity rows (JSON)\n")
    print("| clients | tokens/s | server CPU cores busy | tokens per CPU-second | requests | p50 / p99 latency (s) "
          "| mean queued tokens | load average (1 min) before / after |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for r in rows:
        print(f"| {r['clients']} | {r['tokens_per_s']:.0f} | {r['server_cpu_seconds'] / r['seconds']:.2f} "
              f"| {r['tokens_per_cpu_second']:.0f} | {r['requests']} | {r['p50_s']:.2f} / {r['p99_s']:.2f} "
              f"| {r['mean_queue_tokens']:.0f} | {r['load_average_1m'][0]:.1f} / {r['load_average_1m'][1]:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
