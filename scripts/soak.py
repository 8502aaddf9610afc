#!/usr/bin/env python
"""Load and soak a running logitserve (not a CI test).

    python scripts/soak.py --url http://127.0.0.1:8000 --duration 600 --rate R [--api-key KEY]
    python scripts/soak.py --url ... --measure 20          # find the capacity first (closed loop, 8 clients)
    python scripts/soak.py --url ... --duration 120 --rate R --overload 2   # then 2x the rate for 1/4 of the time

Open-loop arrivals (Poisson at --rate requests/s) of mixed requests: /v1/logits (last token, all rows with target
log-probs and top-k, binary safetensors), /v1/hidden_states, /v1/embeddings, /v1/completions (echo + logprobs).
Reports per phase: requests, status counts, transport errors, p50/p99 latency per minute (stability), and the
resident memory of the server and its workers at start and end (from /proc, by the pids of /info and --server-pid).

Loopback only: the URL must point at 127.0.0.1/localhost (a soak is not a load generator against others' hosts);
the duration is capped at 3600 s and the rate at 2000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from urllib.parse import urlparse

import httpx


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def request_mix(rng: random.Random, vocab: int):
    n = rng.randint(8, 96)
    seqs = [[rng.randrange(1, vocab) for _ in range(n)] for _ in range(rng.randint(1, 4))]
    k = rng.random()
    if k < 0.35:
        return "/v1/logits", {"input_ids": seqs, "logits": False, "top_k": 5}, {}
    if k < 0.6:
        return "/v1/logits", {"input_ids": seqs, "return_logits": "all", "logits": False, "target_logprobs": True,
                              "top_k": 2}, {}
    if k < 0.7:
        return "/v1/logits", {"input_ids": seqs, "return_logits": "variable", "return_n_logits": 2,
                              "dtype": "bfloat16"}, {"accept": "application/x-safetensors"}
    if k < 0.8:
        return "/v1/hidden_states", {"input_ids": seqs, "return_hidden_states": "last_normalized", "layers": [-1, 1]}, {}
    if k < 0.9:
        return "/v1/embeddings", {"input": seqs}, {}
    return "/v1/completions", {"prompt": seqs, "echo": True, "logprobs": 1, "max_tokens": 1}, {}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def open_loop(client, rate: float, duration: float, vocab: int, seed: int) -> list[tuple]:
    """(start offset s, endpoint, status or error name, latency s) of every request."""
    rng = random.Random(seed)
    results: list[tuple] = []
    tasks = set()
    t0 = time.monotonic()

    async def one(path, body, headers, start):
        t = time.monotonic()
        try:
            r = await client.post(path, json=body, headers=headers)
            status = r.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        results.append((start, path, status, time.monotonic() - t))

    next_at = 0.0
    while next_at < duration:
        now = time.monotonic() - t0
        if next_at > now:
            await asyncio.sleep(next_at - now)
        path, body, headers = request_mix(rng, vocab)
        task = asyncio.create_task(one(path, body, headers, next_at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += rng.expovariate(rate)
    if tasks:
        await asyncio.gather(*tasks)
    return results


async def closed_loop(client, seconds: float, clients: int, vocab: int) -> float:
    """Requests/s completed by `clients` back-to-back clients: the measured capacity."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(i):
        nonlocal done
        rng = random.Random(1000 + i)
        while time.monotonic() < stop:
            path, body, headers = request_mix(rng, vocab)
            r = await client.post(path, json=body, headers=headers)
            if r.status_code == 200:
                done += 1

    t = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    return done / (time.monotonic() - t)


def summarize(name: str, results: list[tuple], window: float = 60.0) -> dict:
    statuses: dict = {}
    for _, _, s, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    ok = [lat for _, _, s, lat in results if s == 200]
    refused = [lat for _, _, s, lat in results if s == 429]
    windows = []
    if results:
        end = max(r[0] for r in results)
        w = 0.0
        while w <= end:
            lat = [x for st, _, s, x in results if s == 200 and w <= st < w + window]
            if lat:
                windows.append({"from_s": w, "n": len(lat), "p50_ms": round(pct(lat, 0.5) * 1000, 1),
                                "p99_ms": round(pct(lat, 0.99) * 1000, 1)})
            w += window
    out = {"phase": name, "requests": len(results), "statuses": statuses,
           "p50_ms": round(pct(ok, 0.5) * 1000, 1), "p99_ms": round(pct(ok, 0.99) * 1000, 1),
           "max_ms": round(max(ok) * 1000, 1) if ok else None, "windows": windows}
    if refused:
        out["refusal_p99_ms"] = round(pct(refused, 0.99) * 1000, 1)
    return out


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--rate", type=float, help="requests/s (default: the measured capacity)")
    p.add_argument("--measure", type=float, default=0, help="seconds of closed-loop load to measure the capacity")
    p.add_argument("--overload", type=float, default=0, help="then this multiple of the rate for duration/4")
    p.add_argument("--api-key", default=os.environ.get("LOGITSERVE_API_KEY"))
    p.add_argument("--server-pid", type=int, action="append", default=[], help="front-end pid(s) to watch RSS of")
    p.add_argument("--window", type=float, default=60.0, help="seconds per latency window")
    p.add_argument("--json", help="write the report here")
    a = p.parse_args()
    host = urlparse(a.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"soak.py: loopback only, not {host}", file=sys.stderr)
        return 2
    duration = min(a.duration, 3600)
    headers = {"authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    report: dict = {"url": a.url, "duration_s": duration}
    async with httpx.AsyncClient(base_url=a.url, headers=headers, timeout=600, limits=limits) as client:
        info = (await client.get("/info")).json()
        vocab = info["config"]["vocab_size"]
        pids = list(a.server_pid) + [pid for w in info["workers"] for pid in w["pids"]]
        report["limits"] = info["limits"]
        rate = a.rate
        if a.measure or rate is None:
            cap = await closed_loop(client, a.measure or 20, 8, vocab)
            report["measured_capacity_rps"] = round(cap, 2)
            print(f"measured capacity: {cap:.1f} requests/s", flush=True)
            rate = rate or cap
        report["rate_rps"] = rate
        rss0 = {pid: rss_kib(pid) for pid in pids}
        # Resident memory every window: a plateau (a worker reaching its largest batch's working set) and a leak
        # (growth in every window) give the same start/end difference.
        samples: list[list] = []

        async def sample_rss():
            while True:
                await asyncio.sleep(a.window)
                samples.append([round(time.monotonic() - t_steady), sum(rss_kib(pid) or 0 for pid in pids)])

        t_steady = time.monotonic()
        sampler = asyncio.create_task(sample_rss())
        steady = await open_loop(client, rate, duration, vocab, 1)
        sampler.cancel()
        rss1 = {pid: rss_kib(pid) for pid in pids}
        report["rss_total_kib_by_window"] = samples
        report["steady"] = summarize("steady", steady, a.window)
        report["rss_kib"] = {str(pid): [rss0[pid], rss1[pid]] for pid in pids}
        total0 = sum(v for v in rss0.values() if v)
        total1 = sum(v for v in rss1.values() if v)
        report["rss_growth_pct"] = round(100 * (total1 - total0) / total0, 2) if total0 else None
        if a.overload:
            over = await open_loop(client, rate * a.overload, duration / 4, vocab, 2)
            report["overload"] = summarize(f"{a.overload:g}x", over, a.window)
        metrics = (await client.get("/metrics")).text
        report["worker_restarts"] = next((float(l.split()[-1]) for l in metrics.splitlines()
                                          if l.startswith("logitserve_worker_restarts_total ")), None)
    print(json.dumps(report, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    bad = {k: v for k, v in report["steady"]["statuses"].items() if k != "200"}
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
