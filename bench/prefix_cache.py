"""The prefix cache in the runner (model/runtime/prefix_cache.py): cache on against off in one process, on the
default model (SmolLM2-135M, float32, CPU), requests one at a time.

    python bench/prefix_cache.py preamble      # (a) a 600-token preamble, then 40 texts of 20-60 tokens:
                                               #     last-token log-probs of two label ids
    python bench/prefix_cache.py conversation  # (b) a conversation growing over 8 turns, each request the whole
                                               #     conversation, every row's target log-prob
    python bench/prefix_cache.py inbatch       # one batch, 4 contexts of 300 tokens x 4 continuations of 5-12,
                                               #     every row's log-prob and top-1 (lm-eval's echo): sharing off,
                                               #     on with the lm_head per sequence, on with one row everywhere
    python bench/prefix_cache.py unique        # (d) 16 prompts of 300-700 tokens that share nothing (the cache
                                               #     fills and evicts, nothing hits): last-token log-probs

Each request runs with the cache on, then with it off (the order reversed every other request); the outputs are
compared bit for bit. Reports wall and process CPU seconds summed over the requests, their ratios, and the ideal
ratios off / on: token rows (whole blocks of 64 tokens are what the cache holds), and decoder FLOPs (row-wise
matmuls, the attention's query blocks, the lm_head).
"""

from __future__ import annotations

import dataclasses

import argparse
import datetime
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, model_path  # noqa: E402
from model import ModelRunner, OutputSpec, ReturnLogits  # noqa: E402
from model.runtime.outputs import SequenceOutput  # noqa: E402
from service.packing import pack_ids  # noqa: E402

FIELDS = ("logits", "target_logprobs", "vocab_logprobs")


def same(a: SequenceOutput, b: SequenceOutput) -> bool:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None):
            return False
        if x is not None and not torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)):
            return False
    return True


def workload(name: str, vocab: int, seed: int = 0) -> tuple[list[list[int]], OutputSpec]:
    rng = random.Random(seed)

    def text(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    if name == "preamble":
        preamble = text(600)
        return ([preamble + text(rng.randint(20, 60)) for _ in range(40)],
                OutputSpec(logits=False, vocab_ids=(rng.randrange(vocab), rng.randrange(vocab))))
    if name == "unique":
        return ([text(rng.randint(300, 700)) for _ in range(16)],
                OutputSpec(logits=False, target_logprobs=True, top_k=5))
    conversation, requests = [], []
    for _ in range(8):
        conversation = conversation + text(rng.randint(60, 140))
        requests.append(list(conversation))
    return requests, OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True)


def flops(runner: ModelRunner, n: int, hit: int, vocab_rows: int) -> float:
    """Decoder FLOPs of one sequence of n tokens whose first `hit` are cached: row-wise matmuls on the computed
    rows, the attention's query blocks from the first computed one (64 queries against 64 (j + 1) keys), the
    lm_head on `vocab_rows` rows."""
    from model.layers.attention_stable import BLOCK

    cfg = runner.config
    layers = runner.model.layers
    row = 2 * sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() >= 2)  # matmul weights
    pair = 4 * cfg.num_heads * cfg.head_dim * len(layers)
    blocks = range(hit // BLOCK, -(-n // BLOCK))
    head = 2 * cfg.hidden_size * cfg.vocab_size * vocab_rows
    return (n - hit) * row + sum(BLOCK * BLOCK * (j + 1) for j in blocks) * pair + head


def head_rows(runner: ModelRunner, spec: OutputSpec, n: int, hit: int) -> int:
    """Rows the lm_head runs on: a cached row whose sequence asks only for what the cache keeps of it (its
    log-sum-exp, entropy, target logit) runs none."""
    rows = spec.logit_rows(n)
    if not spec.logits and set(spec.vocabulary_fields) <= runner.REUSABLE_FIELDS:
        return sum(1 for p in rows if p >= hit)
    return len(rows)


def in_batch(runner: ModelRunner, rounds: int = 3) -> None:
    """Issue 27 item 6: a shared row's lm_head, normalizers and top-k once per batch, against once per sequence
    (the runner's distinct-row path bypassed) and against sharing off. Medians of process CPU seconds."""
    import statistics

    rng = random.Random(0)
    vocab = runner.config.vocab_size
    seqs = []
    for _ in range(4):
        context = [rng.randrange(10, vocab) for _ in range(300)]
        seqs += [context + [rng.randrange(10, vocab) for _ in range(rng.randint(5, 12))] for _ in range(4)]
    spec = OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, top_k=1)
    ids, offsets = (torch.from_numpy(a) for a in pack_ids(seqs))
    distinct = ModelRunner._vocab_outputs

    def per_sequence(self, h, plan, specs, row_keys=None):
        return distinct(self, h, plan, specs, None)

    runner.prefix_cache = None  # one batch's sharing only
    modes = {"off": (False, distinct), "on, lm_head per sequence": (True, per_sequence),
             "on, one row everywhere": (True, distinct)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    outs = {}
    runners = {on: runner.with_numerics(dataclasses.replace(runner.numerics, prefix_sharing=on)) for on in (False, True)}
    try:
        for r in range(rounds + 1):
            for mode in (list(modes) if r % 2 else list(modes)[::-1]):
                sharing, ModelRunner._vocab_outputs = modes[mode]
                c0 = time.process_time()
                outs[mode] = runners[sharing].run(ids, offsets, [spec] * len(seqs))
                if r:  # round 0 warms up
                    times[mode].append(time.process_time() - c0)
    finally:
        ModelRunner._vocab_outputs = distinct
    fields = ("target_logprobs", "top_k_ids", "top_k_logprobs")
    equal = all(torch.equal(getattr(a, f).nan_to_num(7.0) if f != "top_k_ids" else getattr(a, f),
                            getattr(b, f).nan_to_num(7.0) if f != "top_k_ids" else getattr(b, f))
                for m in modes for a, b in zip(outs[m], outs["off"]) for f in fields)
    rows = len({tuple(s[: p + 1]) for s in seqs for p in range(len(s))})
    off = statistics.median(times["off"])
    print(f"tokens {sum(map(len, seqs))}, distinct rows {rows}, ideal {sum(map(len, seqs)) / rows:.2f}, "
          f"same bits {equal}")
    print("| mode | CPU s | off / mode |\n| --- | --- | --- |")
    for mode in modes:
        print(f"| {mode} | {statistics.median(times[mode]):.2f} | {off / statistics.median(times[mode]):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["preamble", "conversation", "unique", "inbatch"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cache-bytes", type=int, default=1 << 30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path, label = model_path(args.model)
    runner = ModelRunner.load(path, dtype="float32", prefix_cache_bytes=args.cache_bytes)
    if args.workload == "inbatch":
        now = datetime.datetime.now(datetime.timezone.utc)
        print(f"# one row everywhere: {label}; {machine()}; {now:%Y-%m-%d %H:%M} UTC")
        return in_batch(runner)
    requests, spec = workload(args.workload, runner.config.vocab_size)
    # warm the allocator and the kernels on a request that shares nothing with the workload
    warm = [[(t * 7 + 3) % runner.config.vocab_size for t in range(len(requests[-1]))]]
    ids, offsets = pack_ids(warm)
    cache = runner.prefix_cache
    runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), [spec])
    cache.clear()

    totals = {"on": [0.0, 0.0], "off": [0.0, 0.0]}
    rows = {"on": 0, "off": 0}
    work = {"on": 0.0, "off": 0.0}
    equal = True
    for repeat in range(args.repeats):
        cache.clear()
        for i, seq in enumerate(requests):
            ids, offsets = pack_ids([seq])
            outs = {}
            for system in (("on", "off") if (i + repeat) % 2 == 0 else ("off", "on")):
                runner.prefix_cache = cache if system == "on" else None
                t0, c0 = time.perf_counter(), time.process_time()
                outs[system] = runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), [spec])[0]
                totals[system][0] += time.perf_counter() - t0
                totals[system][1] += time.process_time() - c0
                hit = runner.last_run.prefix_cache_hit_tokens
                rows[system] += len(seq) - hit
                work[system] += flops(runner, len(seq), hit, head_rows(runner, spec, len(seq), hit))
            equal &= same(outs["on"], outs["off"])
    runner.prefix_cache = cache
    print(f"# prefix cache, {args.workload}: {label}; {machine()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}")
    print(f"requests {len(requests)} x {args.repeats}, tokens {sum(map(len, requests)) * args.repeats}, "
          f"cache bytes {cache.bytes} ({cache.nodes} blocks)")
    print("| workload | ideal (token rows) | ideal (FLOPs) | off wall s | on wall s | wall ratio | off CPU s "
          "| on CPU s | CPU ratio | same bits |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.workload} | {rows['off'] / rows['on']:.2f} | {work['off'] / work['on']:.2f} | "
          f"{totals['off'][0]:.2f} | {totals['on'][0]:.2f} | "
          f"{totals['off'][0] / totals['on'][0]:.2f} | {totals['off'][1]:.2f} | {totals['on'][1]:.2f} | "
          f"{totals['off'][1] / totals['on'][1]:.2f} | {equal} |")


if __name__ == "__main__":
    main()
