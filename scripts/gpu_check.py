"""CUDA checks for a session with a lent GPU (run by scripts/gpu_check.sh; well under 5 minutes on an H100/H200).

1. tp=1 on CUDA in bfloat16 against the float32 CPU reference: relative error of logits < 1e-2.
2. varlen flash attention is the kernel in use, and it agrees with the per-sequence SDPA path.
3. prefill throughput in bfloat16 on a ~1B Llama config (random weights) at 8k/16k/32k packed tokens, last-token
   and target-log-prob cases, with model-FLOPs utilisation against a bf16 matmul measured in the same run.
Prints a markdown report; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelRunner, OutputSpec, ReturnLogits  # noqa: E402
from service.packing import row_offsets  # noqa: E402
from model.layers import modules  # noqa: E402

LLAMA_1B = dict(  # Llama 3.2 1B shapes
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
)
SMALL = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
)


def make_checkpoint(folder: Path, shape: dict, dtype: torch.dtype, device: str) -> Path:
    import transformers

    config = transformers.LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return folder


def packed(total: int, vocab: int, lo: int = 256, hi: int = 2048, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(int(torch.randint(lo, hi + 1, (1,), generator=g)), total - sum(lens)))
    ids = torch.randint(0, vocab, (total,), generator=g)
    return ids, torch.from_numpy(row_offsets(lens)), lens


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_bf16_parity(tmp: Path, report: list[str]) -> bool:
    path = make_checkpoint(tmp / "small", SMALL, torch.float32, "cpu")
    ids, offsets, lens = packed(2048, SMALL["vocab_size"], 16, 700, seed=1)
    spec = [OutputSpec(return_logits=ReturnLogits.ALL)] * len(lens)
    ref = ModelRunner.load(path, device="cpu", dtype="float32").run(ids, offsets, spec)
    calls = {"n": 0}
    original = modules._flash_varlen

    def counting():
        fn = original()
        if fn is None:
            return None

        def wrapped(*a, **k):
            out = fn(*a, **k)
            calls["n"] += out is not None
            return out

        return wrapped

    modules._flash_varlen = counting
    try:
        gpu = ModelRunner.load(path, device="cuda", dtype="bfloat16")
        out = gpu.run(ids, offsets, spec)
    finally:
        modules._flash_varlen = original
    err = rel(torch.cat([o.logits for o in out]), torch.cat([r.logits for r in ref]))
    worst = max(rel(o.logits, r.logits) for o, r in zip(out, ref))
    hf_err, hf_worst = transformers_bf16_error(path, ids, offsets, ref)
    # The same bf16 model through the per-sequence SDPA path (flash varlen disabled).
    modules._flash_varlen = lambda: None
    try:
        sdpa = gpu.run(ids, offsets, spec)
    finally:
        modules._flash_varlen = original
    agree = max(rel(o.logits, s.logits) for o, s in zip(out, sdpa))
    ok = err < 1e-2 and calls["n"] > 0 and agree < 1e-2
    report += [
        "## bf16 on CUDA vs float32 CPU reference",
        f"- {len(lens)} sequences, {int(offsets[-1])} tokens, all rows: relative error of logits {err:.2e} "
        f"(bar < 1e-2; worst single sequence {worst:.2e})",
        f"- peer, same GPU and sequences: transformers in bfloat16 vs the same float32 reference: {hf_err:.2e} "
        f"(worst sequence {hf_worst:.2e}), the floor bfloat16 itself sets on this model",
        f"- varlen flash attention calls in the forward: {calls['n']} (expected {SMALL['num_hidden_layers']})",
        f"- flash varlen vs per-sequence SDPA on the same bf16 model: relative difference {agree:.2e}",
        f"- result: {'PASS' if ok else 'FAIL'}",
        "",
    ]
    return ok


def transformers_bf16_error(path: Path, ids, offsets, ref) -> tuple[float, float]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    outs = []
    with torch.no_grad():
        for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            outs.append(hf(ids[s:e][None].cuda()).logits[0].float().cpu())
    del hf
    worst = max(rel(o, r.logits) for o, r in zip(outs, ref))
    return rel(torch.cat(outs), torch.cat([r.logits for r in ref])), worst


def cuda_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: [a @ b for _ in range(10)], repeats=3)
    return 10 * 2 * 8192**3 / t


def model_flops(shape: dict, lens: list[int], lm_rows: int) -> float:
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    per_token = layers * 2 * (h * (h + 2 * kv) + h * h + 3 * h * i)
    attention = layers * sum(2 * n * n * h for n in lens)  # QK^T and PV, causal half, 2 flops per MAC
    return per_token * sum(lens) + attention + lm_rows * 2 * h * shape["vocab_size"]


def bench_1b(tmp: Path, report: list[str], sizes: list[int]) -> None:
    path = make_checkpoint(tmp / "llama1b", LLAMA_1B, torch.bfloat16, "cuda")
    runner = ModelRunner.load(path, device="cuda", dtype="bfloat16")
    peak = matmul_rate()
    report += [
        f"## Prefill, Llama-3.2-1B shapes (random weights), bfloat16, {torch.cuda.get_device_name()}",
        f"bf16 8192^3 matmul measured in the same run: {peak / 1e12:.0f} TFLOP/s",
        "",
        "| packed tokens | sequences | case | tokens/s | TFLOP/s | MFU vs measured matmul |",
        "| ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for total in sizes:
        ids, offsets, lens = packed(total, LLAMA_1B["vocab_size"], seed=total)
        for case, spec in (
            ("last-token logits", OutputSpec()),
            ("target log-probs, all rows", OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True)),
        ):
            specs = [spec] * len(lens)
            t = cuda_time(lambda: runner.run(ids, offsets, specs))
            rows = len(lens) if spec.return_logits == ReturnLogits.LAST_TOKEN else total
            flops = model_flops(LLAMA_1B, lens, rows)
            report.append(
                f"| {total} | {len(lens)} | {case} | {total / t:,.0f} | {flops / t / 1e12:.0f} | {flops / t / peak:.0%} |"
            )
    report.append("")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="8192,16384,32768")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    report = [f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        ok = check_bf16_parity(Path(tmp), report)
        bench_1b(Path(tmp), report, [int(s) for s in args.sizes.split(",")])
    text = "\n".join(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"ok": ok, "report": text}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
