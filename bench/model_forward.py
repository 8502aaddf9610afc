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
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelRunner, OutputSpec, ReturnLogits  # noqa: E402

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    tie_word_embeddings=True,
)
BATCH = 8


def model_path(arg: str | None) -> tuple[Path, str]:
    if arg:
        return Path(arg), Path(arg).name
    try:
        from service.default_model import ensure_default_model

        return ensure_default_model(), "SmolLM2-135M (default model)"
    except Exception as error:  # noqa: BLE001 - any failure falls back to the random checkpoint
        print(f"default model unavailable ({type(error).__name__}); using a random SmolLM2-135M-shaped checkpoint",
              file=sys.stderr)
    from tests.checkpoints import make_checkpoint

    path = Path(tempfile.gettempdir()) / "logitserve-bench-smollm2-135m-random"
    if not (path / "model.safetensors").is_file():
        make_checkpoint(path, "llama", with_tokenizer=False, max_position_embeddings=2048, **SMOLLM2_135M)
    return path, "random weights, SmolLM2-135M config"


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        name = platform.processor() or "unknown CPU"
    return f"{name}, {torch.get_num_threads()} threads"


class Workload:
    def __init__(self, n: int, seed: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lens = torch.randint(16, 513, (n,), generator=g).tolist()
        self.seqs = [torch.randint(0, vocab, (n_,), generator=g) for n_ in self.lens]
        order = sorted(range(n), key=lambda i: self.lens[i])
        self.arrival = [list(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]
        self.sorted = [order[i : i + BATCH] for i in range(0, n, BATCH)]
        self.tokens = sum(self.lens)


def real_flops(cfg, lens: list[int], last_only: bool) -> float:
    """Matmuls of every real token, causal attention per sequence, lm_head on the rows computed."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer_params = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * inter
    tokens = sum(lens)
    matmul = 2 * per_layer_params * layers * tokens
    attention = layers * sum(2 * 2 * n * n / 2 * cfg.q_size for n in lens)
    rows = len(lens) if last_only else tokens
    return matmul + attention + 2 * h * cfg.vocab_size * rows


# ------------------------------------------------------------------------------------------------ systems


def run_ours(runner: ModelRunner, work: Workload, batch: list[int], last_only: bool) -> float:
    seqs = [work.seqs[i] for i in batch]
    ids = torch.cat(seqs)
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
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


class Roofline:
    """The model's matmuls (its own weights) on the real tokens of a batch; returns (seconds, FLOPs)."""

    def __init__(self, runner: ModelRunner) -> None:
        m = runner.model
        self.mats = []
        for layer in m.layers:
            a, p = layer.self_attn, layer.mlp
            self.mats.append((a.qkv_proj.weight, a.o_proj.weight, p.gate_up_proj.weight, p.down_proj.weight))
        self.head = m.lm_head.weight

    def __call__(self, tokens: int, rows: int) -> tuple[float, float]:
        h = self.head.shape[1]
        x = torch.randn(tokens, h)
        inner = torch.randn(tokens, self.mats[0][3].shape[1])
        heads = torch.randn(tokens, self.mats[0][1].shape[1])
        flops = 0.0
        with torch.inference_mode():
            t0 = time.perf_counter()
            for wqkv, wo, wgu, wd in self.mats:
                F.linear(x, wqkv)
                F.linear(heads, wo)
                F.linear(x, wgu)
                F.linear(inner, wd)
            F.linear(x[:rows], self.head)
            elapsed = time.perf_counter() - t0
        for w in (*self.mats[0],):
            flops += 2 * tokens * w.numel() * len(self.mats)
        flops += 2 * rows * self.head.numel()
        return elapsed, flops


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
