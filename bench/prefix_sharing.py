"""Prefix-stable attention and prefix sharing, measured on the default model (SmolLM2-135M, float32, CPU).

    python bench/prefix_sharing.py kernel      # which rows of torch's one causal call per sequence keep their bits
    python bench/prefix_sharing.py accuracy    # max |logit diff| from transformers, per attention variant
    python bench/prefix_sharing.py cost        # attention and forward time: current vs prefix-stable attention
    python bench/prefix_sharing.py sharing     # shared-prefix forwards: time with sharing off / on, ideal ratio

Every subcommand prints a markdown table (results go to docs/benchmarks.md by hand). Timings interleave the
systems compared (round i runs each once, the order reversed every other round) and report medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.layers as layers  # noqa: E402
from bench.common import machine, model_path  # noqa: E402
from model import ModelRunner, OutputSpec, ReturnLogits  # noqa: E402
from model.attention_stable import layout_of, prefix_stable_attention  # noqa: E402
from model.modules import RaggedBatch, ragged_attention  # noqa: E402

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


VARIANTS: dict[str, Callable] = {
    "current (transformers' bits)": ragged_attention,
    "prefix-stable, 64-row blocks (model/attention_stable.py)": prefix_stable_attention,
    "prefix-stable, 32-row blocks": stable_variant(32),
    "prefix-stable, 128-row blocks": stable_variant(128),
    "prefix-stable, 64-row blocks, keys padded to 512": stable_variant(64, key_multiple=512),
    "prefix-stable, 64-row blocks, plain softmax (bmm)": stable_variant(64, softmax="plain"),
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
    lengths = range(1, n_max + 1, args.step)
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


# ------------------------------------------------------------------------------------------------ accuracy


def cmd_accuracy(args) -> None:
    import numpy as np
    import transformers

    folder, name = model_path(args.model)
    runner = ModelRunner.load(folder, device="cpu", dtype="float32")
    rng = np.random.default_rng(args.seed)
    seqs = [torch.tensor(rng.integers(0, runner.config.vocab_size, n)) for n in ACCURACY_LENGTHS]
    refs = {}
    for impl in ("sdpa", "eager"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl)
        with torch.inference_mode():
            refs[impl] = [hf(input_ids=s[None]).logits[0] for s in seqs]
        del hf
    head = HeadKernel()
    print(f"model: {name}; machine: {machine()}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{len(seqs)} random-token sequences of {min(ACCURACY_LENGTHS)}-{max(ACCURACY_LENGTHS)} tokens, each alone; "
          "max |logit diff| over every row\n")
    print("| attention | lm_head | vs sdpa | vs eager | rows with sdpa's bits |\n| --- | --- | --- | --- | --- |")
    for label, fn in VARIANTS.items():
        set_attention(runner, fn)
        for mkl in (False, True):
            head.use(mkl)
            diffs = {"sdpa": 0.0, "eager": 0.0}
            exact = 0
            for i, seq in enumerate(seqs):
                (out,) = runner.run(seq, torch.tensor([0, len(seq)]), [OutputSpec(return_logits=ReturnLogits.ALL)])
                for impl in diffs:
                    diffs[impl] = max(diffs[impl], float((out.logits - refs[impl][i]).abs().max()))
                exact += int((out.logits == refs["sdpa"][i]).all(1).sum())
            print(f"| {label} | {'F.linear (MKL)' if mkl else 'oneDNN'} | {diffs['sdpa']:.2e} | {diffs['eager']:.2e} "
                  f"| {exact} of {sum(ACCURACY_LENGTHS)} |", flush=True)
    head.use(False)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["kernel", "accuracy", "cost", "sharing"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=800)
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    {"kernel": cmd_kernel, "accuracy": cmd_accuracy}[args.command](args)


if __name__ == "__main__":
    main()
