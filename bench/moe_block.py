"""Cost of the mixture-of-experts block (model/layers/moe.py) against transformers' Qwen3-MoE block, in one run.

A tiny but wide random configuration (hidden 32, expert intermediate 1024, 4096 tokens): the cost should follow
the experts chosen per token (top-k), not the number of experts. Systems, for 8 and 64 experts at top-2 and 64
at top-8:

* ours: ``SparseMoeBlock`` (batch-invariant: groups padded to multiples of 4 rows);
* hf grouped_mm: transformers' default experts path (torch's grouped matmul, on CPU one MKL call per expert);
* hf eager: transformers' per-expert loop.

One thread, CPU time of this process (robust to a busy machine), freed memory retained as the server does
(model/runtime/memory.py), systems interleaved, fastest of the repeats.

    python bench/moe_block.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from model.distributed import ParallelContext  # noqa: E402
from model.runtime.memory import retain_freed_memory  # noqa: E402
from model.layers.moe import QWEN3_MOE_WEIGHTS, MoeConfig, SparseMoeBlock  # noqa: E402

HIDDEN, INTERMEDIATE, TOKENS = 32, 1024, 4096
CASES = ((8, 2), (64, 2), (64, 8))


def ours(num_experts: int, top_k: int) -> SparseMoeBlock:
    config = MoeConfig(num_experts=num_experts, experts_per_token=top_k, expert_intermediate_size=INTERMEDIATE,
                       normalize_top_k=True, float32_routing_weights=False, sparse_layers=(True,),
                       weight_names=QWEN3_MOE_WEIGHTS)
    return SparseMoeBlock(config, HIDDEN, ParallelContext.single())


def transformers_block(num_experts: int, top_k: int, implementation: str):
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE,
                                         num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         vocab_size=16)
    config._experts_implementation = implementation
    return Qwen3MoeSparseMoeBlock(config).requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    torch.manual_seed(0)
    systems = {}
    for e, k in CASES:
        systems[("ours", e, k)] = ours(e, k)
        systems[("hf grouped_mm", e, k)] = transformers_block(e, k, "grouped_mm")
        systems[("hf eager", e, k)] = transformers_block(e, k, "eager")
    for block in systems.values():
        for p in block.parameters():
            p.data.normal_(0.0, 0.05)
    x = torch.randn(TOKENS, HIDDEN)
    best = dict.fromkeys(systems, float("inf"))
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first round warms up
            for key, block in systems.items():
                start = time.process_time()
                block(x) if key[0] == "ours" else block(x[None])
                if repeat:
                    best[key] = min(best[key], time.process_time() - start)
    print(f"{datetime.date.today()}, {machine()}, torch {torch.__version__}; hidden {HIDDEN}, expert intermediate "
          f"{INTERMEDIATE}, {TOKENS} tokens; CPU ms, fastest of {args.repeats}\n")
    names = list(dict.fromkeys(name for name, _, _ in systems))
    columns = [f"{e} experts top-{k}" for e, k in CASES] + ["64/8 at top-2", "top-8/top-2 at 64"]
    print("| system | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * (len(CASES) + 2))
    for name in names:
        ms = [best[(name, e, k)] * 1e3 for e, k in CASES]
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in ms) + f" | {ms[1] / ms[0]:.2f} | {ms[2] / ms[1]:.2f} |")


if __name__ == "__main__":
    main()
