"""Batch invariance (model/runtime/invariance.py) on a real model: what it costs, that it holds, and what it does to a lone
sequence's parity with transformers. Two runners of the same checkpoint, the switch on and off, in one run.

Parts (``--parts``, default all):

* cost: the same batches on both runners, back to back, the order reversed every other time, `--repeats` times;
  the sum over batches of each batch's fastest run per runner (and the summed wall and CPU seconds of all runs).
  Workloads: ``ppl`` (every row's target log-prob, the perplexity path: batches of 8 sequences of 16-512 tokens),
  ``last`` (last-token logits: the last block runs on a row subset) and ``short`` (32 sequences of 1-11 tokens
  per batch, where the row padding weighs most).
* bits: three batches (two of the ppl workload, one with all but two of its sequences cut to 1-11 tokens), each
  sequence alone against in its batch: all rows' logits, target log-probs, top-5 and the hidden states of layers 0,
  1, 15 and the last; the count of sequences whose bits differ, switch on and off.
* parity: lone sequences of 1-12, 37 and 300 tokens against transformers: max |logit difference|, on and off.

    python bench/batch_invariance.py [--model CKPT] [--sequences 48] [--seed 0] [--parts cost,bits,parity]
        [--repeats 4] [--threads 2] [--json F]

Without --model it uses the default model (service.default_model.ensure_default_model).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, model_path  # noqa: E402
from model import ModelRunner, OutputSpec, ReturnHiddenStates, ReturnLogits  # noqa: E402
from service.packing import pack_ids  # noqa: E402

PPL = OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True)
LAST = OutputSpec()
EVERYTHING = OutputSpec(return_logits=ReturnLogits.ALL, target_logprobs=True, top_k=5,
                        return_hidden_states=ReturnHiddenStates.ALL, layers=(0, 1, 15, -1))


def pack(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and offsets for ModelRunner.run, by the server's packer."""
    ids, offsets = pack_ids([s.numpy() for s in seqs])
    return torch.from_numpy(ids), torch.from_numpy(offsets)


def batches(n: int, size: int, low: int, high: int, vocab: int, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high + 1, (n,), generator=g).tolist()
    seqs = [torch.randint(0, vocab, (m,), generator=g) for m in lens]
    return [seqs[i : i + size] for i in range(0, n, size)]


def timed(runner, seqs, spec) -> tuple[float, float]:
    """(wall, process CPU) seconds of one batch. CPU time counts this process's threads only: on a machine shared
    with other work it moves less than wall time."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    runner.run(*pack(seqs), [spec] * len(seqs))
    return time.perf_counter() - w0, time.process_time() - c0


def cost(on, off, work, spec, name: str, repeats: int) -> dict:
    """Both runners on each batch, back to back, `repeats` times. The machine's speed drifts (other work shares it):
    besides the summed wall and CPU seconds, the sum over batches of each batch's fastest run is compared."""
    timed(on, work[0], spec), timed(off, work[0], spec)  # warm-up: allocator, oneDNN primitives
    runs = {"on": [[] for _ in work], "off": [[] for _ in work]}  # per batch: (wall, cpu) of each repeat
    for r in range(repeats):
        for i, batch in enumerate(work):
            order = [("on", on), ("off", off)] if (i + r) % 2 == 0 else [("off", off), ("on", on)]
            for key, runner in order:
                runs[key][i].append(timed(runner, batch, spec))
    wall = {k: sum(w for batch in v for w, _ in batch) for k, v in runs.items()}
    cpu = {k: sum(c for batch in v for _, c in batch) for k, v in runs.items()}
    fastest = {k: sum(min(w for w, _ in batch) for batch in v) for k, v in runs.items()}
    tokens = sum(len(s) for b in work for s in b)
    result = {"workload": name, "batches": len(work), "repeats": repeats, "tokens": tokens, "wall": wall, "cpu": cpu,
              "fastest": fastest, "wall_ratio": wall["on"] / wall["off"], "cpu_ratio": cpu["on"] / cpu["off"],
              "fastest_ratio": fastest["on"] / fastest["off"]}
    print(f"cost {name}: {len(work)} batches x {repeats}, {tokens} tokens per pass: fastest runs on "
          f"{fastest['on']:.2f} s, off {fastest['off']:.2f} s, on/off {result['fastest_ratio']:.4f}; all runs: "
          f"wall on/off {result['wall_ratio']:.4f}, CPU on/off {result['cpu_ratio']:.4f}", flush=True)
    return result


def same_bits(a, b) -> bool:
    for name in ("logits", "target_logprobs", "top_k_ids", "top_k_logprobs", "hidden_states"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None:
            if x.dtype == torch.float32:
                x, y = x.view(torch.int32), y.view(torch.int32)
            if not torch.equal(x, y):
                return False
    return True


def bits(runner, work) -> tuple[int, int]:
    differ = total = 0
    for batch in work:
        outs = runner.run(*pack(batch), [EVERYTHING] * len(batch))
        for seq, out in zip(batch, outs):
            alone = runner.run(*pack([seq]), [EVERYTHING])[0]
            differ += not same_bits(alone, out)
            total += 1
    return differ, total


def parity(on, off, hf, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    spec = OutputSpec(return_logits=ReturnLogits.ALL)
    for n in [*range(1, 13), 37, 300]:
        seq = torch.randint(0, vocab, (n,), generator=g)
        with torch.inference_mode():
            ref = hf(input_ids=seq[None]).logits[0]
        row = {"tokens": n}
        for key, runner in (("on", on), ("off", off)):
            got = runner.run(*pack([seq]), [spec])[0].logits
            row[key] = (got - ref).abs().max().item()
        rows.append(row)
        print(f"parity {n:4d} tokens alone: max |logit - transformers| on {row['on']:.2e}, off {row['off']:.2e}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the default model)")
    parser.add_argument("--sequences", type=int, default=48, help="sequences of the ppl and last workloads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="cost,bits,parity")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each cost batch per runner")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (1 on a shared machine: each run's "
                        "CPU time then follows its own work, not the wait for a descheduled thread)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)

    path, label = model_path(args.model)
    on = ModelRunner.load(path, dtype="float32", batch_invariant=True)
    off = ModelRunner.load(path, dtype="float32", batch_invariant=False)
    vocab = on.config.vocab_size
    print(f"{label}; {machine()}; torch {torch.__version__}; {datetime.date.today()}", flush=True)
    long_work = batches(args.sequences, 8, 16, 512, vocab, args.seed)
    results: dict = {}
    if "cost" in parts:
        short_work = batches(8 * 32, 32, 1, 11, vocab, args.seed + 1)
        results["cost"] = [cost(on, off, long_work, PPL, "ppl", args.repeats),
                           cost(on, off, long_work, LAST, "last", args.repeats),
                           cost(on, off, short_work, PPL, "short", args.repeats)]
    if "bits" in parts:
        # two batches as they come, and one whose sequences are cut to 1-11 tokens but its first two
        work = long_work[:2] + [[s if i < 2 else s[: 1 + i % 11] for i, s in enumerate(long_work[-1])]]
        for key, runner in (("on", on), ("off", off)):
            differ, total = bits(runner, work)
            results[f"bits_{key}"] = (differ, total)
            print(f"bits, switch {key}: {differ} of {total} sequences differ from their lone run", flush=True)
    if "parity" in parts:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        results["parity"] = parity(on, off, hf, vocab, args.seed)
    if args.json:
        results.update(model=label, machine=machine(), torch=torch.__version__, threads=args.threads,
                       date=str(datetime.date.today()))
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
