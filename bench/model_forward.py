"""Forward throughput of logitserve's model against transformers, on one ragged workload, in one run.

Workload: N sequences (48; 16 with --quick), lengths uniform in 16..512, random token ids, all seeded.
Systems, for all-rows logits and for last-token logits:

* ours: ``ModelRunner.run`` on the ragged (packed) batches of 8 sequences in arrival order;
* hf-sorted: transformers on batches of 8 after sorting the workload by length (padding + attention mask);
* hf-arrival: transformers on the batches of 8 in arrival order (padding + attention mask);
* roofline: ``F.linear`` on the model's own weights with the matmul shapes of the real tokens (every layer's
  qkv, o, gate_up and down on the batch's packed tokens, then the lm_head on the rows asked for). Its rate
  (FLOP/s) is the machine's float32 matmul rate for this model, measured in the same run.

The machine's speed drifts, so the systems take turns on the same slice of work: round i runs batch i of each
system (the order reversed every other round) and the summed times are compared. Useful tokens/s counts real
tokens only; a roofline share is the FLOPs of the real tokens (matmuls + causal attention + lm_head rows
computed) over (time x measured matmul rate).

    python bench/model_forward.py [--model CKPT] [--quick] [--seed 0]

Without --model it uses the default model (service.default_model.ensure_default_model) and, if that is not
available, a random checkpoint with SmolLM2-135M's config (weights do not change speed).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Roofline, machine, model_path, real_flops  # noqa: E402
from service.packing import pack_ids  # noqa: E402
from model import ModelRunner, OutputSpec, ReturnLogits  # noqa: E402

BATCH = 8


class Workload:
    def __init__(self, n: int, seed: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lens = torch.randint(16, 513, (n,), generator=g).tolist()
        self.seqs = [torch.randint(0, vocab, (n_,), generator=g) for n_ in self.lens]
        order = sorted(range(n), key=lambda i: self.lens[i])
        self.arrival = [list(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]
        self.sorted = [order[i : i + BATCH] for i in range(0, n, BATCH)]
        self.tokens = sum(self.lens)


# ------------------------------------------------------------------------------------------------ systems


def run_ours(runner: ModelRunner, work: Workload, batch: list[int], last_only: bool) -> float:
    seqs = [work.seqs[i] for i in batch]
    ids, offsets = (torch.from_numpy(a) for a in pack_ids([s.numpy() for s in seqs]))
    spec = OutputSpec(return_logits=ReturnLogits.LAST_TOKEN if last_only else ReturnLogits.ALL)
    t0 = time.perf_counter()
    out = runner.run(ids, offsets, [spec] * len(seqs))
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def run_hf(model, work: Workload, batch: list[int], last_only: bool) -> float:
    seqs = [work.seqs[i] for i in batch]
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.int64)
    mask = torch.zeros(len(seqs), longest, dtype=torch.int64)
    for b, s in enumerate(seqs):
        if last_only:  # left padding: the last column is every sequence's last token
            ids[b, longest - len(s) :], mask[b, longest - len(s) :] = s, 1
        else:
            ids[b, : len(s)], mask[b, : len(s)] = s, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1 if last_only else 0)
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


# --------------------------------------------------------------------------------------------------- main


def measure(runner, hf, roof, work: Workload, last_only: bool) -> dict[str, float]:
    """Summed seconds per system (and the roofline's FLOPs) over rounds that alternate the systems."""
    totals = {"ours": 0.0, "hf-sorted": 0.0, "hf-arrival": 0.0, "roofline": 0.0, "roofline_flops": 0.0}
    for i in range(len(work.arrival)):
        arrival, srt = work.arrival[i], work.sorted[i]
        tokens = sum(work.lens[j] for j in arrival)
        steps = [
            ("ours", lambda: run_ours(runner, work, arrival, last_only)),
            ("hf-sorted", lambda: run_hf(hf, work, srt, last_only)),
            ("hf-arrival", lambda: run_hf(hf, work, arrival, last_only)),
            ("roofline", lambda: roof(tokens, len(arrival) if last_only else tokens)),
        ]
        for name, fn in steps if i % 2 == 0 else steps[::-1]:
            gc.collect()
            if name == "roofline":
                seconds, flops = fn()
                totals["roofline"] += seconds
                totals["roofline_flops"] += flops
            else:
                totals[name] += fn()
        print(f"  round {i + 1}/{len(work.arrival)}: " + ", ".join(f"{k} {v:.2f}s" for k, v in totals.items() if k != "roofline_flops"),
              file=sys.stderr, flush=True)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the default model, else random SmolLM2-135M)")
    parser.add_argument("--quick", action="store_true", help="16 sequences instead of 48")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequences", type=int, default=None, help="number of sequences (overrides --quick)")
    parser.add_argument("--cases", default="all,last", help="comma-separated: all (all-rows logits), last (last token)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    path, label = model_path(args.model)
    runner = ModelRunner.load(path, device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    cfg = runner.config
    n = args.sequences or (16 if args.quick else 48)
    work = Workload(n, args.seed, cfg.vocab_size)
    roof = Roofline(runner)

    # Warm-up (allocator, oneDNN primitives) and a correctness check of the bench itself.
    with torch.inference_mode():
        s = work.seqs[0][:64]
        ours = runner.run(s, torch.tensor([0, len(s)]), [OutputSpec(return_logits=ReturnLogits.ALL)])[0].logits
        ref = hf(input_ids=s[None]).logits[0]
        print(f"ours vs transformers max |logit diff| = {(ours - ref).abs().max().item():.2e}", file=sys.stderr)
    run_hf(hf, work, work.sorted[0], True)
    roof(256, 8)

    print(f"model: {label} ({path})\nmachine: {machine()}\ndate: {datetime.date.today()}; torch {torch.__version__}; "
          f"transformers {__import__('transformers').__version__}\nworkload: {n} sequences, lengths 16..512 "
          f"(seed {args.seed}), {work.tokens} tokens, batches of {BATCH}\n")
    rows = []
    for case in args.cases.split(","):
        last_only = case == "last"
        print(f"case {case}:", file=sys.stderr)
        t = measure(runner, hf, roof, work, last_only)
        rate = t["roofline_flops"] / t["roofline"]
        flops = real_flops(cfg, work.lens, last_only)
        share = {k: flops / (t[k] * rate) for k in ("ours", "hf-sorted", "hf-arrival")}
        rows.append((case, t, rate, share))

    print("| logits | matmul rate (GFLOP/s) | ours tok/s | hf sorted tok/s | hf arrival tok/s "
          "| ours / hf sorted | ours / hf arrival | roofline share ours / sorted / arrival |")
    print("|---|---|---|---|---|---|---|---|")
    for case, t, rate, share in rows:
        tps = {k: work.tokens / t[k] for k in ("ours", "hf-sorted", "hf-arrival")}
        print(f"| {'all rows' if case == 'all' else 'last token'} | {rate / 1e9:.0f} | {tps['ours']:.0f} "
              f"| {tps['hf-sorted']:.0f} | {tps['hf-arrival']:.0f} | {t['hf-sorted'] / t['ours']:.2f}x "
              f"| {t['hf-arrival'] / t['ours']:.2f}x | {share['ours']:.0%} / {share['hf-sorted']:.0%} / "
              f"{share['hf-arrival']:.0%} |")


if __name__ == "__main__":
    main()
