#!/usr/bin/env python
"""Load and soak a running logitserve (not a CI test).

    python scripts/soak.py --url http://127.0.0.1:8000 --duration 600 --rate R [--api-key KEY]
    python scripts/soak.py --url ... --measure 20          # find the capacity first (closed loop, 8 clients)
    python scripts/soak.py --url ... --duration 120 --rate R --overload 2   # then 2x the rate for 1/4 of the time
    python scripts/soak.py --url ... --duration 600 --rate R --large-share 0.05 --large-tokens 2000
                                   # mix in all-rows JSON logits of 2000 tokens (bodies streamed and counted)
    python scripts/soak.py --url ... --slow-clients 6 --slow-tokens 6000 --server-pid PID
                                   # 6 slow readers of all-rows JSON at once; peak memory of the server tree

Open-loop arrivals (Poisson at --rate requests/s) of mixed requests: /v1/logits (last token, all rows with target
log-probs and top-k, binary safetensors), /v1/hidden_states, /v1/embeddings, /v1/completions (echo + logprobs).
Reports per phase: requests, status counts, transport errors, p50/p99 latency per minute (stability), and the
memory of the server and its workers (from /proc, by the pids of /info and --server-pid): resident memory at start
and end, and the proportional set size (PSS: shared-memory result segments counted once, not once per process that
maps them) summed over the tree every window.

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


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def large_request(rng: random.Random, vocab: int, tokens: int):
    """All-rows full-vocabulary logits as JSON: tokens x vocab x 4 bytes of results, ~3x that of JSON text."""
    return "/v1/logits", {"input_ids": [[rng.randrange(1, vocab) for _ in range(tokens)]], "return_logits": "all"}, {}


async def read_streamed(client, path: str, body: dict, headers: dict, delay: float = 0.0,
                        rate_bytes: float = 0.0) -> tuple[int, int, bool]:
    """(status, body bytes, whether the body ends as a complete /v1/logits object), reading the body in chunks
    (after `delay` seconds, at most `rate_bytes` per second when given) without keeping it."""
    async with client.stream("POST", path, json=body, headers=headers) as r:
        if delay:
            await asyncio.sleep(delay)
        n = 0
        head = tail = b""
        t = time.monotonic()
        async for chunk in r.aiter_bytes():
            if not head:
                head = chunk[:64]
            n += len(chunk)
            tail = (tail + chunk)[-64:]
            if rate_bytes:
                ahead = n / rate_bytes - (time.monotonic() - t)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        complete = r.status_code != 200 or (head.startswith(b'{"object":"logits"') and tail.endswith(b"}}"))
        return r.status_code, n, complete


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


async def open_loop(client, rate: float, duration: float, vocab: int, seed: int, large_share: float = 0.0,
                    large_tokens: int = 0) -> list[tuple]:
    """(start offset s, endpoint, status or error name, latency s) of every request; a large request counts as
    "truncated" when its streamed body does not end as a whole object."""
    rng = random.Random(seed)
    results: list[tuple] = []
    tasks = set()
    t0 = time.monotonic()

    async def one(path, body, headers, start, large=False):
        t = time.monotonic()
        try:
            if large:
                status, _, complete = await read_streamed(client, path, body, headers)
                status = status if complete else "truncated"
                path += " (large)"
            else:
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
        large = large_share > 0 and rng.random() < large_share
        path, body, headers = large_request(rng, vocab, large_tokens) if large else request_mix(rng, vocab)
        task = asyncio.create_task(one(path, body, headers, next_at, large))
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
    p.add_argument("--large-share", type=float, default=0.0, help="fraction of requests that are large")
    p.add_argument("--large-tokens", type=int, default=2000, help="tokens of a large request (all-rows logits)")
    p.add_argument("--slow-clients", type=int, default=0,
                   help="instead of a soak: this many slow readers of large requests at once, memory sampled")
    p.add_argument("--slow-tokens", type=int, default=6000)
    p.add_argument("--slow-delay", type=float, default=5.0, help="seconds a slow reader waits before reading")
    p.add_argument("--slow-rate", type=float, default=100e6, help="bytes/s a slow reader reads at")
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
        if a.slow_clients:
            report["slow"] = await slow_readers(client, a, vocab, pids)
            print(json.dumps(report, indent=1))
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(report, f, indent=1)
            return 0 if all(s == 200 and ok for s, _, ok in report["slow"]["answers"]) else 1
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
                samples.append([round(time.monotonic() - t_steady), sum(rss_kib(pid) or 0 for pid in pids),
                                sum(pss_kib(pid) or 0 for pid in pids)])

        t_steady = time.monotonic()
        samples.append([0, sum(rss_kib(pid) or 0 for pid in pids), sum(pss_kib(pid) or 0 for pid in pids)])
        sampler = asyncio.create_task(sample_rss())
        steady = await open_loop(client, rate, duration, vocab, 1, a.large_share, a.large_tokens)
        sampler.cancel()
        rss1 = {pid: rss_kib(pid) for pid in pids}
        report["memory_kib_by_window"] = {"columns": ["s", "rss_total", "pss_total"], "rows": samples}
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


async def slow_readers(client, a, vocab: int, pids: list[int]) -> dict:
    """`--slow-clients` readers of all-rows JSON at once (each waits `--slow-delay` s once its body starts, then
    reads at `--slow-rate`); the server tree's PSS sampled every 0.25 s."""
    rng = random.Random(7)
    baseline = sum(pss_kib(pid) or 0 for pid in pids)
    peak = [baseline]
    stop = asyncio.Event()

    async def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], sum(pss_kib(pid) or 0 for pid in pids))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    t = time.monotonic()
    requests = [large_request(rng, vocab, a.slow_tokens) for _ in range(a.slow_clients)]
    answers = await asyncio.gather(*(read_streamed(client, path, body, headers, a.slow_delay, a.slow_rate)
                                     for path, body, headers in requests))
    stop.set()
    await sampler
    return {"clients": a.slow_clients, "tokens": a.slow_tokens, "seconds": round(time.monotonic() - t, 1),
            "answers": [list(x) for x in answers], "pss_baseline_kib": baseline, "pss_peak_kib": peak[0],
            "results_bytes_per_request": a.slow_tokens * vocab * 4}


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
