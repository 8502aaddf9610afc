"""The prefix cache across requests (--prefix-cache-bytes), measured on the default model (SmolLM2-135M, float32,
CPU) over HTTP: the same workloads against a server with the cache on (its default) and one with
`--prefix-cache-bytes 0`, in interleaved rounds (round i runs each once, the order reversed every other round;
medians of wall seconds), every request sent one at a time unless the workload says otherwise. Results:
docs/benchmarks.md.

    python bench/prefix_cache_http.py [--workloads a,b,d,e] [--rounds 3]
    python bench/prefix_cache_http.py --workloads c [--docs 16]   # lm-evaluation-harness local-completions
    python bench/prefix_cache_http.py --workloads routing         # 2 replicas: hit rate, routing on vs least busy
    python bench/prefix_cache_http.py --workloads routing-sim     # the same dispatch, replicas simulated (no model)

(a) a fixed 600-token preamble, then 40 different 20-60-token texts after it, each request one sequence's
    last-token log-probs of two label ids (a guard model after its policy);
(b) a conversation growing over 8 turns of 60-120 tokens, each request the whole conversation, every row's target
    log-prob (a reward model turn after turn);
(c) lm-evaluation-harness `local-completions` on a generated multiple-choice task at batch_size 1 and 8, with
    lm-eval's default concurrency (1) and 4 concurrent requests, cache on / off, and lm-eval's own transformers
    backend (`hf`) at the same batch sizes: wall time and the same log-likelihoods;
(d) prompts that never repeat (200-400 tokens, last-token log-probs): the cache's cost, and its bytes within the limit;
(e) the in-batch workload of bench/prefix_sharing.py, with prose: multiple-choice contexts x 4 continuations in
    lm-eval's order, 8 prompts a request, 4 clients, echo log-probs, against `--prefix-sharing off`.

Each workload draws new token sequences every round (seeded by the round), so a round on the cache-on server starts
cold, as the workload would on a fresh server. The ideal ratio is the tokens the uncached server computes over the
tokens the cached one must (the tokens its cache cannot hold: each distinct prefix once).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, model_path, start_server  # noqa: E402
from bench.lm_eval_prefix_sharing import WORDS, write_task  # noqa: E402
from bench.prefix_sharing import run_clients, trie_nodes  # noqa: E402

HITS = "logitserve_prefix_cache_hit_tokens_total"


def metric(url: str, name: str) -> float:
    """A series' value from /metrics (0 when absent); `name` may carry labels: name{replica="0"}."""
    import httpx

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def without_volatile(answers: list) -> list:
    """The answers less the fields that differ between any two calls (ids, timestamps)."""
    return [{k: v for k, v in a.items() if k not in ("id", "created")} for a in answers]


# ------------------------------------------------------------------------------------------------ workloads
# Each returns (request bodies, clients, tokens the uncached server computes, tokens the cached one must).


def guard(vocab: int, seed: int):
    """(a): one preamble of 600 tokens, 40 texts of 20-60 tokens, the log-probs of two labels at the last token."""
    rng = random.Random(seed)
    pre = [rng.randrange(vocab) for _ in range(600)]
    texts = [[rng.randrange(vocab) for _ in range(rng.randint(20, 60))] for _ in range(40)]
    bodies = [{"input_ids": [pre + t], "return_logits": "last_token", "logits": False, "vocab_ids": [28, 253]}
              for t in texts]
    total = sum(len(pre) + len(t) for t in texts)
    return bodies, 1, total, len(pre) + sum(map(len, texts))


def conversation(vocab: int, seed: int):
    """(b): 8 turns of 60-120 tokens; request k is turns 1..k, every row's target log-prob."""
    rng = random.Random(seed)
    convo: list[int] = []
    bodies = []
    for _ in range(8):
        convo = convo + [rng.randrange(vocab) for _ in range(rng.randint(60, 120))]
        bodies.append({"input_ids": [convo], "return_logits": "all", "logits": False, "target_logprobs": True})
    return bodies, 1, sum(len(b["input_ids"][0]) for b in bodies), len(convo)


def never_repeat(vocab: int, seed: int):
    """(d): 20 prompts of 200-400 tokens that share nothing (the first token differs), last-token log-probs."""
    rng = random.Random(seed)
    seqs = [[i] + [rng.randrange(vocab) for _ in range(rng.randint(200, 400))] for i in range(20)]
    bodies = [{"input_ids": [s], "return_logits": "last_token", "logits": False, "vocab_ids": [28, 253]} for s in seqs]
    total = sum(map(len, seqs))
    return bodies, 1, total, total


def prose_multiple_choice(tokenize, seed: int, contexts: int = 16):
    """(e): prose contexts of 130-430 words x 4 continuations of 1-6 words, tokenized by the server, sorted as
    lm-eval's Collator sorts them (longest first, then by tokens), 8 prompts a request, 4 clients."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(contexts):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(130, 430))).capitalize() + "."
        for _ in range(4):
            seqs.append(tokenize(context + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))))
    seqs.sort(key=lambda s: (-len(s), tuple(s)))
    bodies = [{"prompt": seqs[i : i + 8], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
              for i in range(0, len(seqs), 8)]
    return bodies, 4, sum(map(len, seqs)), trie_nodes(seqs)


# ------------------------------------------------------------------------------------------------ runs


def compare(label: str, make, servers: dict[str, str], rounds: int) -> None:
    """Interleaved rounds of one workload on each server; one markdown row."""
    times: dict[str, list[float]] = {mode: [] for mode in servers}
    hits: list[float] = []
    same = True
    for r in range(rounds + 1):  # round 0 warms up (and is not timed)
        bodies, clients, total, needed = make(r)
        path = "/v1/completions" if "prompt" in bodies[0] else "/v1/logits"
        answers = {}
        for mode in list(servers) if r % 2 == 0 else list(servers)[::-1]:
            before = metric(servers[mode], HITS)
            took, answers[mode] = asyncio.run(run_clients(servers[mode], path, bodies, clients))
            if r:
                times[mode].append(took)
                if mode == "on":
                    hits.append(metric(servers[mode], HITS) - before)
        same = same and len({repr(without_volatile(a)) for a in answers.values()}) == 1
    off_mode = next(m for m in servers if m != "on")
    on, off = statistics.median(times["on"]), statistics.median(times[off_mode])
    print(f"| {label} | {total} | {total / needed:.2f} | {statistics.median(hits):.0f} | {off:.2f} | {on:.2f} "
          f"| {off / on:.2f} | {same} |", flush=True)


def cmd_http(args, folder: Path, vocab: int) -> None:
    import httpx

    wanted = args.workloads.split(",")
    servers = {"on": start_server(folder), "off": start_server(folder, "--prefix-cache-bytes", "0")}
    if "e" in wanted:
        servers["sharing off"] = start_server(folder, "--prefix-sharing", "off")
    urls = {mode: url for mode, (_, url) in servers.items()}
    try:
        limit = httpx.get(urls["on"] + "/info").json()["prefix_cache_bytes"]
        print(f"model: {args.model_name}; machine: {machine()}; date: {datetime.date.today().isoformat()}; "
              f"--prefix-cache-bytes {limit} (on) vs 0; {args.rounds} interleaved rounds after a warm-up round, "
              "medians of wall seconds; new sequences every round\n")
        print("| workload | tokens | ideal ratio | hit tokens (on) | off s | on s | measured ratio | same answers |")
        print("| --- " * 8 + "|")
        pair = {"on": urls["on"], "off": urls["off"]}
        seed = args.seed * 1000
        if "a" in wanted:
            compare("(a) 600-token preamble + 40 texts of 20-60 tokens, two label log-probs, one at a time",
                    lambda r: guard(vocab, seed + r), pair, args.rounds)
        if "b" in wanted:
            compare("(b) conversation over 8 turns, every row's target log-prob, one at a time",
                    lambda r: conversation(vocab, seed + 100 + r), pair, args.rounds)
        if "d" in wanted:
            compare("(d) 20 prompts of 200-400 tokens that never repeat, one at a time",
                    lambda r: never_repeat(vocab, seed + 200 + r), pair, args.rounds)
            held = metric(urls["on"], 'logitserve_prefix_cache_bytes{replica="0"}')
            print(f"\n(d) cache bytes held after the run: {held:.0f} of {limit} ({held <= limit and 'within' or 'OVER'})\n")
        if "e" in wanted:
            def tokenize(text: str) -> list[int]:
                return httpx.post(urls["on"] + "/tokenize", json={"prompt": text}).json()["tokens"]

            compare("(e) prose multiple choice, lm-eval order, 8 prompts a request, 4 clients, vs --prefix-sharing off",
                    lambda r: prose_multiple_choice(tokenize, seed + 300 + r),
                    {"on": urls["on"], "sharing off": urls["sharing off"]}, args.rounds)
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def cmd_lm_eval(args, folder: Path) -> None:
    """(c): lm-eval local-completions against cache on / off, and lm-eval's hf backend, per batch size and
    concurrency; every log-likelihood compared."""
    import httpx
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from bench.lm_eval_prefix_sharing import TASK, evaluate

    work = Path(tempfile.mkdtemp(prefix="lm-eval-prefix-cache-"))
    write_task(work, args.docs, args.seed)
    servers = {"on": start_server(folder), "off": start_server(folder, "--prefix-cache-bytes", "0")}
    rows = []
    try:
        served = httpx.get(servers["on"][1] + "/v1/models").json()["data"][0]["id"]
        for batch_size in (1, 8):
            for concurrent in (1, 4):
                got = {}
                for mode in ("off", "on") if (batch_size + concurrent) % 2 else ("on", "off"):
                    _, answers, wall = evaluate(servers[mode][1], served, work, batch_size=batch_size,
                                                num_concurrent=concurrent)
                    got[mode] = (answers, wall)
                rows.append((batch_size, concurrent, got["off"][1], got["on"][1], got["off"][0] == got["on"][0],
                             got["on"][0]))
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    hf = {}
    for batch_size in (1, 8):
        t0 = time.perf_counter()
        results = simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32",
                                                          "device": "cpu"},
                                  tasks=[TASK], task_manager=TaskManager(include_path=str(work)),
                                  batch_size=batch_size, log_samples=True)
        samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
        hf[batch_size] = (time.perf_counter() - t0, [s["resps"] for s in samples])
    print(f"model: {args.model_name}; machine: {machine()}; date: {datetime.date.today().isoformat()}; lm-eval "
          f"local-completions, {args.docs} documents x 4 choices; hf: lm-eval's transformers backend, float32 CPU\n")
    print("| batch_size | num_concurrent | cache off s | cache on s | off / on | hf s | hf / on | same log-likelihoods "
          "on / off | max abs diff vs hf |")
    print("| --- " * 9 + "|")
    for batch_size, concurrent, off, on, same, answers in rows:
        hf_wall, hf_answers = hf[batch_size]
        diff = max(abs(a[0][0] - b[0][0]) for x, y in zip(answers, hf_answers) for a, b in zip(x, y))
        print(f"| {batch_size} | {concurrent} | {off:.1f} | {on:.1f} | {off / on:.2f} | {hf_wall:.1f} "
              f"| {hf_wall / on:.2f} | {same} | {diff:.2e} |", flush=True)


# ------------------------------------------------------------------------------------------------ routing


def routing_workload(vocab: int, seed: int, prefixes: int = 4, per_prefix: int = 12):
    """A few distinct 600-token prefixes, requests after each arriving interleaved (P1 t, P2 t, ... P1 t', ...),
    each a 20-60-token text after its prefix, last-token log-probs; sent by 4 clients."""
    rng = random.Random(seed)
    pres = [[rng.randrange(vocab) for _ in range(600)] for _ in range(prefixes)]
    bodies = []
    for _ in range(per_prefix):
        for pre in pres:
            text = [rng.randrange(vocab) for _ in range(rng.randint(20, 60))]
            bodies.append({"input_ids": [pre + text], "return_logits": "last_token", "logits": False,
                           "vocab_ids": [28, 253]})
    return bodies


def cmd_routing(args, folder: Path, vocab: int) -> None:
    """Two servers of 2 replicas each, their caches room for about 2.5 prefixes a replica: routing on, and off
    (LOGITSERVE_PREFIX_ROUTING=false: the least busy free replica). Hit rate = tokens not recomputed / tokens."""
    from model.families.config import ModelConfig
    from service.routing import cached_token_bytes

    limit = int(2.5 * 640 * cached_token_bytes(ModelConfig.from_pretrained(folder), "float32"))
    flags = ("--replicas", "2", "--prefix-cache-bytes", str(limit))
    servers = {"routing on": start_server(folder, *flags),
               "least busy": start_server(folder, *flags, env={"LOGITSERVE_PREFIX_ROUTING": "false"})}
    try:
        print(f"model: {args.model_name}; machine: {machine()}; date: {datetime.date.today().isoformat()}; 2 replicas,"
              f" --prefix-cache-bytes {limit} each; 4 prefixes of 600 tokens x 12 texts, interleaved, 4 clients\n")
        print("| router | tokens | hit tokens | hit rate | ideal hit rate | wall s |")
        print("| --- " * 6 + "|")
        for r in range(args.rounds):
            bodies = routing_workload(vocab, args.seed * 1000 + 400 + r)
            total = sum(len(b["input_ids"][0]) for b in bodies)
            ideal = (total - sum(len(b["input_ids"][0]) - 600 for b in bodies) - 4 * 600) / total
            for mode in servers if r % 2 == 0 else list(servers)[::-1]:
                url = servers[mode][1]
                before = metric(url, HITS)
                took, _ = asyncio.run(run_clients(url, "/v1/logits", bodies, 4))
                hit = metric(url, HITS) - before
                print(f"| {mode} | {total} | {hit:.0f} | {hit / total:.1%} | {ideal:.1%} | {took:.1f} |", flush=True)
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def cmd_routing_sim(args) -> None:
    """The routing workload through the real Batcher and PrefixRouter, replicas simulated: each keeps an exact LRU
    token trie of its byte budget (a ShadowTree used as the cache itself) and takes time proportional to the tokens
    it had not cached. The hit rate of the dispatch, not of a model."""
    from types import SimpleNamespace

    from service.batcher import Batcher, Work
    from service.metrics import Metrics
    from service.routing import PrefixRouter, ShadowTree, cached_token_bytes
    from model.layers.attention_kernels import AttentionKind
    from model.runtime.numerics import Numerics
    from service.workers.protocol import BatchDone, RequestResult

    import numpy as np

    config = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M
    SECONDS_A_TOKEN = 50e-6
    token_bytes = cached_token_bytes(config, "float32")
    limit = int(2.5 * 640 * token_bytes)

    class Replica:
        """Runs its batches one after another, each for SECONDS_A_TOKEN a token its cache did not hold."""

        def __init__(self, index: int):
            self.index, self.restarts, self.inflight, self.state = index, 0, [], "ready"
            self.loaded = Numerics("float32", True, AttentionKind.PREFIX_STABLE, True, limit)
            self.cache = ShadowTree(limit // token_bytes)
            self.busy_until = 0.0

        @property
        def free_slots(self) -> int:
            return 2 - len(self.inflight)

        def submit(self, batch):
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            ids, bounds = batch.input_ids.tolist(), batch.offsets.tolist()
            seqs = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
            hit = sum(self.cache.match(s) for s in seqs)
            for s in seqs:
                self.cache.insert(s)
            done = BatchDone(0, [RequestResult() for _ in batch.spans], 0.0, 0, 0, hit, 0)
            self.inflight.append(fut)
            self.busy_until = max(loop.time(), self.busy_until) + SECONDS_A_TOKEN * (batch.num_tokens - hit)

            def finish():
                self.inflight.remove(fut)
                fut.set_result(SimpleNamespace(done=done, outputs=lambda i, reservation=None: None))

            loop.call_at(self.busy_until, finish)
            return fut

    class Pool:
        def __init__(self):
            self.replicas = [Replica(0), Replica(1)]

        def pick(self):
            free = [r for r in self.replicas if r.free_slots > 0]
            return min(free, key=lambda r: (len(r.inflight), r.index)) if free else None

    async def run(routing: bool, bodies) -> tuple[float, float]:
        metrics, pool = Metrics(), Pool()
        batcher = Batcher(pool, 8192, 1 << 20, metrics, router=PrefixRouter(config, enabled=routing))
        batcher.start()
        loop = asyncio.get_running_loop()
        queue = list(bodies)[::-1]

        async def client():
            while queue:
                seq = queue.pop()["input_ids"][0]
                w = Work(np.array(seq, dtype=np.int64), [len(seq)], None, loop.create_future())
                batcher.submit(w)
                await w.future

        t0 = loop.time()
        await asyncio.gather(*(client() for _ in range(4)))
        await batcher.stop()
        return metrics.registry.get_sample_value(HITS), loop.time() - t0

    print(f"simulated replicas (exact LRU token tries of {limit} bytes = {limit // token_bytes} SmolLM2-135M tokens "
          "each, 50 us a computed token); the real Batcher and PrefixRouter; 4 prefixes of 600 tokens x 12 texts, "
          "interleaved, 4 clients\n")
    print("| router | tokens | hit tokens | hit rate | ideal hit rate | simulated s |")
    print("| --- " * 6 + "|")
    for r in range(args.rounds):
        bodies = routing_workload(49152, args.seed * 1000 + 400 + r)
        total = sum(len(b["input_ids"][0]) for b in bodies)
        ideal = (total - sum(len(b["input_ids"][0]) - 600 for b in bodies) - 4 * 600) / total
        for mode, routing in (("routing on", True), ("least busy", False)):
            hit, took = asyncio.run(run(routing, bodies))
            print(f"| {mode} | {total} | {hit:.0f} | {hit / total:.1%} | {ideal:.1%} | {took:.1f} |", flush=True)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--workloads", default="a,b,d,e", help="comma-separated: a, b, c, d, e, routing, routing-sim")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=16, help="(c): multiple-choice documents (4 choices each)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    wanted = args.workloads.split(",")
    if "routing-sim" in wanted:
        cmd_routing_sim(args)
        wanted.remove("routing-sim")
        if not wanted:
            return
    folder, args.model_name = model_path(args.model)
    from model.families.config import ModelConfig

    vocab = ModelConfig.from_pretrained(folder).vocab_size
    if {"a", "b", "d", "e"} & set(wanted):
        cmd_http(args, folder, vocab)
    if "c" in wanted:
        cmd_lm_eval(args, folder)
    if "routing" in wanted:
        cmd_routing(args, folder, vocab)


if __name__ == "__main__":
    main()
