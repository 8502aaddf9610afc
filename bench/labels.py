"""Cost of the label-scoring outputs, in one run on one model (the default model unless --model).

    python bench/labels.py [--model DIR] [--repeats 7]

1. Through a server: last-token `/v1/score` with 4 labels over 16 items after a 300-token query, against
   last-token `/v1/logits` of the same 16 prompts (JSON, and binary), requests interleaved, median wall time.
2. In process (`ModelRunner.run`, the workers' call): every row's `target_logprobs` of 8 sequences of 512 tokens,
   alone and with `target_ranks` + `entropy` beside it, runs interleaved, median wall time.
Prints a markdown table and writes bench/results/labels_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, model_path, start_server  # noqa: E402


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn `repeats` times after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_server(model: Path, repeats: int) -> dict[str, float]:
    import httpx
    import numpy as np

    rng = np.random.default_rng(0)
    from model.families.config import ModelConfig

    vocab = ModelConfig.from_pretrained(model).vocab_size
    query = rng.integers(0, vocab, 300).tolist()
    items = [rng.integers(0, vocab, 12).tolist() for _ in range(16)]
    labels = rng.integers(0, vocab, 4).tolist()
    prompts = [query + item for item in items]
    server, url = start_server(model)
    try:
        with httpx.Client(base_url=url, timeout=300) as c:
            def post(path, body, headers=None):
                def call():
                    r = c.post(path, json=body, headers=headers or {})
                    assert r.status_code == 200, r.text
                    return r.content
                return call

            return interleaved({
                "/v1/score, 4 labels": post("/v1/score", {"query": query, "items": items, "label_token_ids": labels}),
                "/v1/logits last_token, JSON": post("/v1/logits", {"input_ids": prompts}),
                "/v1/logits last_token, binary": post("/v1/logits", {"input_ids": prompts},
                                                      {"accept": "application/x-safetensors"}),
            }, repeats)
    finally:
        server.terminate()
        server.wait()


def bench_runner(model: Path, repeats: int) -> dict[str, float]:
    import torch

    from model.runtime.outputs import OutputSpec, ReturnLogits
    from model.runtime.runner import ModelRunner
    from service.packing import pack_ids

    runner = ModelRunner.load(model, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, runner.config.vocab_size, (512,), generator=g) for _ in range(8)]
    ids, offsets = (torch.from_numpy(a) for a in pack_ids([s.numpy() for s in seqs]))
    base = dict(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True)
    specs = {"target_logprobs": OutputSpec(**base),
             "target_logprobs + target_ranks + entropy": OutputSpec(**base, target_ranks=True, entropy=True)}
    return interleaved({name: (lambda s=spec: runner.run(ids, offsets, [s] * len(seqs))) for name, spec in
                        specs.items()}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model, name = model_path(args.model)
    print(f"model: {name}; {machine()}; {datetime.date.today()}\n", flush=True)
    served = bench_server(model, args.repeats)
    print(json.dumps(served), flush=True)
    scored = bench_runner(model, args.repeats)
    print(json.dumps(scored), flush=True)
    print("| workload | median s | vs baseline |\n| --- | --- | --- |")
    score_base = served["/v1/logits last_token, JSON"]
    for label, t in served.items():
        print(f"| {label} (16 prompts of 312 tokens) | {t:.3f} | {t / score_base:.2f}x |")
    lp_base = scored["target_logprobs"]
    for label, t in scored.items():
        print(f"| all rows, {label} (8 x 512 tokens) | {t:.3f} | {t / lp_base:.3f}x |")
    out = REPO / "bench" / "results" / f"labels_{datetime.date.today()}.json"
    out.write_text(json.dumps({"model": name, "machine": machine(), "server": served, "runner": scored}, indent=1))


if __name__ == "__main__":
    main()
