"""Prefix-stable attention and prefix sharing, measured on the default model (SmolLM2-135M, float32, CPU).

    python bench/prefix_sharing.py kernel      # which rows of torch's one causal call per sequence keep their bits
    python bench/prefix_sharing.py stability   # prefix-stable attention: every prefix length, packed batches
    python bench/prefix_sharing.py accuracy    # max |logit diff| from transformers, per attention variant
    python bench/prefix_sharing.py cost        # attention and forward time: current vs prefix-stable attention
    python bench/prefix_sharing.py sharing     # shared-prefix forwards: time with sharing off / on, ideal ratio
    python bench/prefix_sharing.py http        # served: two servers, --prefix-sharing off / on, over HTTP

Every subcommand prints a markdown table (results: docs/prefix_sharing.md). Timings interleave the systems compared
(round i runs each once, the order reversed every other round) and report medians of wall and process CPU time;
on a shared machine `--threads 1` keeps parallel regions from waiting on descheduled threads.
"""

from __future__ import annotations

import dataclasses

import argparse
import asyncio
import datetime
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.layers.base as layers  # noqa: E402
from bench.common import machine, model_path, start_server  # noqa: E402
from model import ModelRunner, OutputSpec, ReturnLogits  # noqa: E402
from model.layers.attention_stable import BLOCK, BlockLayout, layout_of, prefix_stable_attention  # noqa: E402
from model.layers.modules import RaggedBatch, ragged_attention  # noqa: E402
from model.runtime.prefix_sharing import SharedPrefixBatch  # noqa: E402

ACCURACY_LENGTHS = [5, 17, 37, 64, 100, 150, 191, 250, 300, 384, 450, 500]


# ------------------------------------------------------------------------------------------------ variants


def stable_variant(block: int, key_multiple: int = 0, softmax: str = "flash") -> Callable:
    """A prefix-stable attention of another geometry, for the accuracy table: query blocks of `block` rows, keys
    padded up to a multiple of `key_multiple` (0: none), softmax by torch's flash kernel (one SDPA call per block)
    or written out (scores, plain softmax, weights @ v). One sequence at a time (accuracy only, not speed)."""

    def attend(q, k, v, batch, scale, window):
        out = q.new_empty(q.shape)
        hq, hkv = q.shape[1], k.shape[1]
        for s, e in zip(batch.bounds[:-1], batch.bounds[1:]):
            n = e - s
            blocks = -(-n // block)
            keys = block * blocks if not key_multiple else -(-block * blocks // key_multiple) * key_multiple
            qs, ks, vs = (t.new_zeros(keys, t.shape[1], t.shape[2]) for t in (q, k, v))
            qs[:n], ks[:n], vs[:n] = q[s:e], k[s:e], v[s:e]
            for j in range(blocks):
                hi = block * (j + 1)
                kh = hi if not key_multiple else -(-hi // key_multiple) * key_multiple
                lo = max(0, block * j - window + 1) if window else 0
                i = torch.arange(block * j, hi)[:, None]
                c = torch.arange(lo, kh)[None, :]
                visible = (c <= i) & ((i - c < window) if window else True)
                mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
                qb = qs[block * j : hi].transpose(0, 1)[None]
                kb, vb = ks[lo:kh].transpose(0, 1)[None], vs[lo:kh].transpose(0, 1)[None]
                if softmax == "flash":
                    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
                else:
                    kb, vb = kb.repeat_interleave(hq // hkv, 1), vb.repeat_interleave(hq // hkv, 1)
                    o = torch.softmax(qb @ kb.transpose(-1, -2) * scale + mask, dim=-1) @ vb
                rows = slice(block * j, min(hi, n))
                out[s + rows.start : s + rows.stop] = o[0].transpose(0, 1)[: rows.stop - rows.start]
        return out

    return attend


VARIANTS: dict[str, tuple[str, Callable]] = {
    "current": ("current (one causal call per sequence: transformers' bits)", ragged_attention),
    "stable64": ("prefix-stable, 64-row blocks (model/layers/attention_stable.py)", prefix_stable_attention),
    "stable32": ("prefix-stable, 32-row blocks", stable_variant(32)),
    "stable128": ("prefix-stable, 128-row blocks", stable_variant(128)),
    "stable64-keys512": ("prefix-stable, 64-row blocks, keys padded to a multiple of 512", stable_variant(64, 512)),
    "stable32-keys512": ("prefix-stable, 32-row blocks, keys padded to a multiple of 512", stable_variant(32, 512)),
    "stable64-plain": ("prefix-stable, 64-row blocks, plain softmax (bmm)", stable_variant(64, softmax="plain")),
    "stable64-f64": (
        "prefix-stable, 64-row blocks, computed in float64",
        lambda q, k, v, batch, scale, window: prefix_stable_attention(
            q.double(), k.double(), v.double(), batch, scale, window
        ).to(q.dtype),
    ),
}


def set_attention(runner: ModelRunner, fn: Callable) -> None:
    for layer in runner.model.layers:
        layer.self_attn.attention_fn = fn


class HeadKernel:
    """Switches the lm_head between oneDNN (the runner's default in float32) and F.linear (MKL, transformers')."""

    def __init__(self) -> None:
        self.onednn = layers.head_linear

    def use(self, mkl: bool) -> None:
        layers.head_linear = (lambda x, w: F.linear(x, w)) if mkl else self.onednn


# ------------------------------------------------------------------------------------------------ kernel


def cmd_kernel(args) -> None:
    """Rows of torch's one causal call per sequence: how often row r's bits change with the call's length n, and how
    often the prefix-stable geometry gives the one call's bits."""
    g = torch.Generator().manual_seed(0)
    n_max, hq, hkv, d = args.max_len, 9, 3, 64
    q, k, v = (torch.randn(1, h, n_max, d, generator=g) for h in (hq, hkv, hkv))

    def one_call(n):
        return F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True, scale=0.125,
                                              enable_gqa=True)[0].transpose(0, 1)

    batch = RaggedBatch.from_offsets(torch.tensor([0, n_max]), torch.device("cpu"))
    stable = prefix_stable_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), batch, 0.125,
                                     None)
    lengths = range(1, n_max + 1, args.step or 1)
    alone = {}  # row r -> its bits in the (r + 1)-row call
    pairs = varied = same_as_alone = same_as_stable = 0
    rows_varying = set()
    for n in lengths:
        out = one_call(n)
        alone[n - 1] = out[n - 1]
        eq_stable = (out == stable[:n]).flatten(1).all(1)
        same_as_stable += int(eq_stable.sum())
        for r in range(n):
            if r in alone and r < n - 1:
                pairs += 1
                if torch.equal(out[r], alone[r]):
                    same_as_alone += 1
                else:
                    varied += 1
                    rows_varying.add(r)
    total_rows = sum(lengths)
    print(f"machine: {machine()}; torch {torch.__version__}; q/k/v [n, 9 or 3, 64] float32, n in 1..{n_max} step "
          f"{args.step}\n")
    print("| measure | count |\n| --- | --- |")
    print(f"| (row r, length n > r + 1) pairs: r's bits in the n-call equal its bits in the (r + 1)-call | "
          f"{same_as_alone} of {pairs} ({same_as_alone / max(pairs, 1):.1%}) |")
    print(f"| rows r whose bits take two or more values over the lengths | {len(rows_varying)} of "
          f"{len([r for r in alone if r < n_max - 1])} |")
    print(f"| rows of all n-calls with the prefix-stable geometry's bits | {same_as_stable} of {total_rows} "
          f"({same_as_stable / total_rows:.1%}) |")


def cmd_stability(args) -> None:
    """prefix_stable_attention at the default model's head shapes: every prefix length 1..max_len alone against the
    full sequence, and the full sequence packed among random others, bit for bit."""
    import random

    n_max = args.max_len
    cpu = torch.device("cpu")

    def batch_of(lengths):
        return RaggedBatch.from_offsets(torch.tensor([0, *lengths]).cumsum(0), cpu)

    print(f"machine: {machine()}; torch {torch.__version__}; q [n, 9, 64], k/v [n, 3, 64]\n")
    print("| dtype | window | prefix lengths whose rows differ from the full sequence's | packed batches whose "
          "sequence differs from it alone |\n| --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(n_max, h, 64, generator=g).to(dtype) for h in (9, 3, 3))
        lengths = range(1, n_max + 1, 1 if dtype == torch.float32 else args.step or 7)
        for window in (None, 16, 200):
            full = prefix_stable_attention(q, k, v, batch_of([n_max]), 0.125, window)
            unstable = [n for n in lengths
                        if not torch.equal(prefix_stable_attention(q[:n], k[:n], v[:n], batch_of([n]), 0.125, window),
                                           full[:n])]
            rng = random.Random(window or 0)
            differing = 0
            for _ in range(args.batches):
                others = [rng.randint(1, n_max) for _ in range(rng.randint(1, 7))]
                at = rng.randint(0, len(others))
                lens = others[:at] + [n_max] + others[at:]
                parts = [tuple(torch.randn(n, h, 64, generator=g).to(dtype) for h in (9, 3, 3)) for n in others]
                parts = parts[:at] + [(q, k, v)] + parts[at:]
                out = prefix_stable_attention(*(torch.cat(t) for t in zip(*parts)), batch_of(lens), 0.125, window)
                start = sum(lens[:at])
                differing += not torch.equal(out[start : start + n_max], full)
            print(f"| {str(dtype).removeprefix('torch.')} | {window} | {len(unstable)} of {len(lengths)} "
                  f"| {differing} of {args.batches} |", flush=True)


# ------------------------------------------------------------------------------------------------ accuracy


def cmd_accuracy(args) -> None:
    """Each sequence alone through the runner, every row's logits against transformers' (same checkpoint, float32)."""
    import numpy as np
    import transformers

    folder, name = model_path(args.model)
    runner = ModelRunner.load(folder, device="cpu", dtype="float32")
    seeds = [int(x) for x in args.seeds.split(",")]
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    refs_impl = args.references.split(",")
    heads = args.heads.split(",")
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else ACCURACY_LENGTHS
    sequences = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        sequences[seed] = [torch.tensor(rng.integers(0, runner.config.vocab_size, n)) for n in lengths]
    refs: dict[tuple[str, int], list[torch.Tensor]] = {}
    for impl in refs_impl:
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl)
        with torch.inference_mode():
            for seed in seeds:
                refs[impl, seed] = [hf(input_ids=s[None]).logits[0] for s in sequences[seed]]
        del hf
    head = HeadKernel()
    print(f"model: {name}; machine: {machine()}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"per seed: random-token sequences of {lengths} tokens ({sum(lengths)} rows), each alone; max |logit diff| "
          f"over every row; seeds {seeds}\n")
    columns = [f"vs {impl}, seed {seed}" for impl in refs_impl for seed in seeds]
    print(f"| attention | lm_head | {' | '.join(columns)} | rows with sdpa's bits |")
    print("| --- " * (3 + len(columns)) + "|")
    for key in variants:
        label, fn = VARIANTS[key]
        set_attention(runner, fn)
        for kernel in heads:
            head.use(kernel == "mkl")
            cells, exact, total = [], 0, 0
            outs = {}
            for seed in seeds:
                outs[seed] = []
                for seq in sequences[seed]:
                    spec = OutputSpec(return_logits=ReturnLogits.ALL)
                    (out,) = runner.run(seq, torch.tensor([0, len(seq)]), [spec])
                    outs[seed].append(out.logits)
            for impl in refs_impl:
                for seed in seeds:
                    pairs = list(zip(outs[seed], refs[impl, seed]))
                    cells.append(f"{max(float((a - b).abs().max()) for a, b in pairs):.2e}")
                    if impl == "sdpa":
                        exact += sum(int((a == b).all(1).sum()) for a, b in pairs)
                        total += sum(len(a) for a, _ in pairs)
            kernel_name = "F.linear (MKL)" if kernel == "mkl" else "oneDNN"
            print(f"| {label} | {kernel_name} | {' | '.join(cells)} | {exact} of {total} |", flush=True)
    head.use(False)


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Seconds:
    wall: float
    cpu: float  # this process's CPU time (all threads): less disturbed by other processes than wall time


def timed(fn: Callable[[], object]) -> Seconds:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return Seconds(time.perf_counter() - w, time.process_time() - c)


def interleaved(systems: dict[str, Callable[[], Seconds]], repeats: int) -> dict[str, list[Seconds]]:
    """Each system once per round, the order reversed every other round; one warm-up round first."""
    for fn in systems.values():
        fn()
    times: dict[str, list[Seconds]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(systems[name]())
    return times


def medians(samples: list[Seconds]) -> Seconds:
    return Seconds(statistics.median(s.wall for s in samples), statistics.median(s.cpu for s in samples))


class TimedAttention:
    """Wraps an attention function and adds up the time spent in it."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.spent = fn, Seconds(0.0, 0.0)

    def __call__(self, *args):
        w, c = time.perf_counter(), time.process_time()
        out = self.fn(*args)
        self.spent.wall += time.perf_counter() - w
        self.spent.cpu += time.process_time() - c
        return out


def cmd_cost(args) -> None:
    """A perplexity-like batch: 16 sequences of 16..512 tokens, target log-probs of every row."""
    folder, name = model_path(args.model)
    runner = ModelRunner.load(folder, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(16, 513, (16,), generator=g).tolist()
    ids = torch.cat([torch.randint(0, runner.config.vocab_size, (n,), generator=g) for n in lens])
    offsets = torch.tensor([0, *lens]).cumsum(0)
    specs = [OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True)] * len(lens)
    attention = {"current": TimedAttention(ragged_attention), "prefix-stable": TimedAttention(prefix_stable_attention)}
    attention_time: dict[str, list[Seconds]] = {k: [] for k in attention}

    def system(label: str) -> Callable[[], Seconds]:
        def run() -> Seconds:
            set_attention(runner, attention[label])
            attention[label].spent = Seconds(0.0, 0.0)
            took = timed(lambda: runner.run(ids, offsets, specs))
            attention_time[label].append(attention[label].spent)
            return took

        return run

    times = interleaved({label: system(label) for label in attention}, args.repeats)
    print(f"model: {name}; machine: {machine()}; 16 sequences, {sum(lens)} tokens (16..512 each), target log-probs "
          f"of every row; {args.repeats} interleaved rounds, medians (wall / process CPU seconds)\n")
    print("| attention | forward wall s | forward CPU s | attention wall s | attention CPU s | tokens/s (wall) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in attention:
        fwd, att = medians(times[label]), medians(attention_time[label][1:])  # [0]: the warm-up round
        print(f"| {label} | {fwd.wall:.3f} | {fwd.cpu:.3f} | {att.wall:.3f} | {att.cpu:.3f} "
              f"| {sum(lens) / fwd.wall:.0f} |")


# ------------------------------------------------------------------------------------------------ sharing


def sharing_workloads(vocab: int, seed: int) -> dict[str, tuple[list[torch.Tensor], list[OutputSpec]]]:
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n,), generator=g)

    def between(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    workloads = {}
    # (a) multiple choice (lm-evaluation-harness loglikelihood): contexts with 4 continuations each, log-probs of
    # the continuation's tokens.
    seqs, specs = [], []
    for _ in range(4):
        context = tokens(between(150, 500))
        for _ in range(4):
            cont = tokens(between(1, 12))
            seqs.append(torch.cat([context, cont]))
            specs.append(OutputSpec(return_logits=ReturnLogits.VARIABLE, return_n_logits=len(cont) + 1, logits=False,
                                    target_logprobs=True))
    workloads["(a) 4 contexts of 150-500 tokens x 4 continuations of 1-12"] = (seqs, specs)
    # (b) reranking: one 300-token query, 16 items of 10-30 tokens, the last token's logits.
    query = tokens(300)
    seqs = [torch.cat([query, tokens(between(10, 30))]) for _ in range(16)]
    workloads["(b) a 300-token query x 16 items of 10-30 tokens"] = (seqs, [OutputSpec()] * 16)
    return workloads


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, NaN included (a last position's target log-prob is NaN)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def decoder_flops(config, layout: BlockLayout, rows: int) -> float:
    """Matmul FLOPs of the decoder layers: the row-wise projections on `rows` rows and the attention blocks that
    `layout` computes (q.k and weights.v, masked halves included)."""
    d, hq, hkv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    per_row = 2 * (d * (hq + 2 * hkv) * hd + hq * hd * d + 3 * d * config.intermediate_size)
    keys = 0
    for call in layout.calls:
        count = call.seqs.stop - call.seqs.start if isinstance(call.seqs, slice) else len(call.seqs)
        keys += count * BLOCK * (call.block + 1)
    return config.num_layers * (rows * per_row + 4 * keys * hd * hq)


def cmd_sharing(args) -> None:
    folder, name = model_path(args.model)
    runner = ModelRunner.load(folder, device="cpu", dtype="float32")
    print(f"model: {name}; machine: {machine()}; {args.repeats} interleaved rounds, medians; wall / process CPU "
          "seconds. Ideal ratios: token rows, and decoder FLOPs (row-wise matmuls + attention blocks computed), "
          "without over with sharing (both prefix-stable)\n")
    print("| workload | tokens | unique rows | ideal (rows) | ideal (FLOPs) | off, current attention | off | on "
          "| measured (wall) | measured (CPU) | same bits on/off |")
    print("| --- " * 11 + "|")
    for label, (seqs, specs) in sharing_workloads(runner.config.vocab_size, args.seed).items():
        ids = torch.cat(seqs)
        offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        batch = RaggedBatch.from_offsets(offsets, torch.device("cpu"))
        shared = SharedPrefixBatch.build(ids, batch)
        flops_off = decoder_flops(runner.config, layout_of(batch), len(ids))
        flops_on = decoder_flops(runner.config, shared.block_layout, shared.num_tokens)
        outputs = {}

        def system(key: str, sharing: bool, attention: Callable) -> Callable[[], Seconds]:
            def run() -> Seconds:
                set_attention(runner, attention)  # a measurement of kernels, not the serving path
                chosen = runner.with_numerics(dataclasses.replace(runner.numerics, prefix_sharing=sharing))
                return timed(lambda: outputs.__setitem__(key, chosen.run(ids, offsets, specs)))

            return run

        times = interleaved(
            {
                "current": system("current", False, ragged_attention),
                "off": system("off", False, prefix_stable_attention),
                "on": system("on", True, prefix_stable_attention),
            },
            args.repeats,
        )
        same = all(
            same_bits(getattr(a, f), getattr(b, f))
            for a, b in zip(outputs["off"], outputs["on"])
            for f in ("logits", "target_logprobs")
            if getattr(a, f) is not None
        )
        cur, off, on = (medians(times[k]) for k in ("current", "off", "on"))
        print(f"| {label} | {len(ids)} | {shared.unique_rows} | {len(ids) / shared.unique_rows:.2f} "
              f"| {flops_off / flops_on:.2f} | {cur.wall:.2f} / {cur.cpu:.2f} | {off.wall:.2f} / {off.cpu:.2f} "
              f"| {on.wall:.2f} / {on.cpu:.2f} | {off.wall / on.wall:.2f} | {off.cpu / on.cpu:.2f} | {same} |",
              flush=True)


# ------------------------------------------------------------------------------------------------ http


def trie_nodes(seqs: list[list[int]]) -> int:
    return len({tuple(s[: p + 1]) for s in seqs for p in range(len(s))})


def multiple_choice_requests(vocab: int, seed: int, contexts: int) -> list[list[list[int]]]:
    """lm-evaluation-harness local-completions loglikelihood, multiple choice: contexts of 150-500 tokens with 4
    continuations of 1-12 tokens, sorted as lm-eval's Collator sorts them (longest first, then by tokens) and sent
    in requests of 8 prompts."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(contexts):
        context = [rng.randrange(vocab) for _ in range(rng.randint(150, 500))]
        seqs += [context + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(4)]
    seqs.sort(key=lambda s: (-len(s), tuple(s)))
    return [seqs[i : i + 8] for i in range(0, len(seqs), 8)]


def score_request(vocab: int, seed: int) -> dict:
    """/v1/score: a 300-token query and 16 items of 10-30 tokens (token ids), two label tokens."""
    rng = random.Random(seed)
    query = [rng.randrange(vocab) for _ in range(300)]
    items = [[rng.randrange(vocab) for _ in range(rng.randint(10, 30))] for _ in range(16)]
    return {"query": query, "items": items, "label_token_ids": [28, 253]}


async def run_clients(url: str, path: str, bodies: list[dict], clients: int) -> tuple[float, list]:
    """Seconds to answer every body with `clients` concurrent clients, and the answers in body order."""
    import httpx

    answers: list = [None] * len(bodies)
    pending = list(range(len(bodies)))[::-1]
    async with httpx.AsyncClient(base_url=url, timeout=1800) as c:

        async def client():
            while pending:
                i = pending.pop()
                r = await c.post(path, json=bodies[i])
                r.raise_for_status()
                answers[i] = r.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - t0, answers


def shared_counter(url: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("logitserve_prefix_shared_tokens_total "):
            return float(line.split()[-1])
    return 0.0


def cmd_http(args) -> None:
    """Two servers of the model, --prefix-sharing off and on, the same workloads on each in interleaved rounds."""
    folder, name = model_path(args.model)
    from model.families.config import ModelConfig

    vocab = ModelConfig.from_pretrained(folder).vocab_size
    requests = multiple_choice_requests(vocab, args.seed, args.contexts)
    completions = [{"prompt": r, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0} for r in requests]
    scores = [score_request(vocab, args.seed + i) for i in range(args.score_requests)]
    workloads = {
        f"(a) multiple choice: {args.contexts} contexts x 4 continuations, requests of 8 prompts, 4 clients, "
        "/v1/completions echo + logprobs": ("/v1/completions", completions, 4,
                                            [s for r in requests for s in r]),
        f"(b) /v1/score: 300-token query x 16 items of 10-30 tokens ({args.score_requests} requests, one client)": (
            "/v1/score", scores, 1, [s["query"] + item for s in scores for item in s["items"]]),
    }
    workloads = {label: w for label, w in workloads.items() if label[1] in args.workloads.split(",")}
    servers = {mode: start_server(folder, "--prefix-sharing", mode) for mode in ("off", "on")}
    try:
        print(f"model: {name}; machine: {machine()}; date: {datetime.date.today().isoformat()}; one server per "
              f"mode (2 worker threads each, used one at a time), {args.repeats} interleaved rounds after a warm-up "
              "round, medians of wall seconds\n")
        print("| workload | tokens | ideal ratio (tokens / trie nodes) | realized ratio (tokens / computed) | off s "
              "| on s | measured ratio | same answers on/off |")
        print("| --- " * 8 + "|")
        for label, (path, bodies, clients, seqs) in workloads.items():
            times: dict[str, list[float]] = {"off": [], "on": []}
            answers: dict[str, list] = {}
            shared = []
            for r in range(args.repeats + 1):
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    url = servers[mode][1]
                    before = shared_counter(url)
                    took, answers[mode] = asyncio.run(run_clients(url, path, bodies, clients))
                    if mode == "on":
                        shared.append(shared_counter(url) - before)
                    if r:  # round 0 warms up
                        times[mode].append(took)
            tokens = sum(map(len, seqs))
            same = _without_timing(answers["off"]) == _without_timing(answers["on"])
            off, on = statistics.median(times["off"]), statistics.median(times["on"])
            computed = tokens - statistics.median(shared)
            print(f"| {label} | {tokens} | {tokens / trie_nodes(seqs):.2f} | {tokens / computed:.2f} | {off:.2f} "
                  f"| {on:.2f} | {off / on:.2f} | {same} |", flush=True)
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def _without_timing(answers: list) -> list:
    """The answers less the fields that differ between any two calls (ids, timestamps)."""
    return [{k: v for k, v in a.items() if k not in ("id", "created")} for a in answers]


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["kernel", "stability", "accuracy", "cost", "sharing", "http"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", default="1", help="accuracy: comma-separated seeds of the sequence sets")
    parser.add_argument("--variants", default="", help=f"accuracy: comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--references", default="sdpa,eager", help="accuracy: transformers attention implementations")
    parser.add_argument("--lengths", default="", help="accuracy: comma-separated sequence lengths")
    parser.add_argument("--heads", default="onednn,mkl", help="accuracy: lm_head kernels (onednn, mkl)")
    parser.add_argument("--max-len", type=int, default=800)
    parser.add_argument("--step", type=int, default=0, help="kernel/stability: length step (default 1; 7 for "
                        "float64/bfloat16 stability)")
    parser.add_argument("--batches", type=int, default=20, help="stability: random packed batches per case")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--contexts", type=int, default=16, help="http: multiple-choice contexts (4 prompts each)")
    parser.add_argument("--score-requests", type=int, default=4, help="http: /v1/score requests per round")
    parser.add_argument("--workloads", default="a,b", help="http: which of the workloads (a, b) to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {"kernel": cmd_kernel, "stability": cmd_stability, "accuracy": cmd_accuracy, "cost": cmd_cost,
                "sharing": cmd_sharing, "http": cmd_http}
    commands[args.command](args)


if __name__ == "__main__":
    main()
