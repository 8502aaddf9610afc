"""Which of torch's CPU kernels give a row other bits depending on the rest of the call: the measurements behind
model/runtime/invariance.py and docs/batch_invariance.md, to re-run on another machine or torch.

    python bench/invariance_probe.py [--threads 1,2,3,4,8,16]
        [--parts matmul,elementwise,reduction,attention,topk,allreduce]

Each part prints what it found; nothing is assumed from torch's sources.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_name  # noqa: E402
from model.layers.base import head_linear  # noqa: E402
from model.layers.modules import _causal_sdpa  # noqa: E402

G = torch.Generator().manual_seed(0)


def differing_rows(linear, k: int, n: int, sizes: list[int]) -> dict[int, list[int]]:
    """For each call size M: the rows whose bits differ from the same rows computed in calls of 16 rows."""
    w = torch.randn(n, k, generator=G)
    pool = torch.randn(2048, k, generator=G)
    want = torch.cat([linear(pool[i : i + 16], w) for i in range(0, len(pool), 16)])
    found = {}
    for m in sizes:
        start = int(torch.randint(0, len(pool) - m + 1, (1,), generator=G))
        bad = (linear(pool[start : start + m], w) != want[start : start + m]).any(1).nonzero().flatten().tolist()
        if bad:
            found[m] = bad
    return found


def matmul(threads: list[int]) -> None:
    sizes = list(range(1, 64)) + torch.randint(64, 2048, (30,), generator=G).tolist()
    shapes = [(576, 960), (576, 3072), (1536, 576), (64, 202), (101, 64)]
    for t in threads:
        torch.set_num_threads(t)
        for name, linear in (("MKL F.linear", F.linear), ("oneDNN head_linear", head_linear)):
            per_shape = [differing_rows(linear, k, n, sizes) for k, n in shapes]
            union = sorted({m for found in per_shape for m in found})
            rows = {m: per_shape[0].get(m) for m in union}
            whole = [m for m in union if m % 4 == 0]
            print(f"matmul {name:18s} {t:2d} threads: calls with rows of other bits M = {union} "
                  f"(rows, first shape: {rows}); multiples of 4 among them: {whole}", flush=True)
    torch.set_num_threads(2)
    w, x = torch.randn(3072, 576, generator=G), torch.randn(40, 576, generator=G)
    one = F.linear(x[:1], w)
    kept = 0
    for s in range(1, 17):
        moved = torch.empty(w.numel() + s)[s:].view_as(w).copy_(w)
        kept += torch.equal(F.linear(x[:1], moved), one)
    torch.set_num_threads(1)
    single = F.linear(x, w)
    torch.set_num_threads(2)
    print(f"matmul MKL 1 row: bits kept for {kept} of 16 weight offsets (1-16 floats); 40 rows at 1 vs 2 threads "
          f"equal: {torch.equal(single, F.linear(x, w))}", flush=True)


def elementwise() -> None:
    torch.set_num_threads(1)
    n = 1 << 16
    ops = {
        "exp": (torch.exp, -30, 10), "log": (torch.log, 1e-3, 5e4), "tanh": (torch.tanh, -5, 5),
        "rsqrt": (torch.rsqrt, 1e-3, 10), "cos": (torch.cos, 0, 4000), "sin": (torch.sin, 0, 4000),
        "sqrt": (torch.sqrt, 0, 10), "silu": (F.silu, -10, 10), "sigmoid": (torch.sigmoid, -10, 10),
        "gelu(tanh)": (lambda v: F.gelu(v, approximate="tanh"), -5, 5),
    }
    for name, (op, lo, hi) in ops.items():
        x = torch.rand(n, generator=G) * (hi - lo) + lo
        vector = op(x)  # 2^16 elements: whole vector blocks
        scalar = torch.cat([op(x[i : i + 7]) for i in range(0, n, 7)])  # 7-element calls: scalar code
        print(f"elementwise {name:10s}: vector != scalar code on {(vector != scalar).sum().item():5d} of {n} inputs",
              flush=True)
    a = torch.view_as_complex(torch.randn(n, 2, generator=G))
    b = torch.view_as_complex(torch.randn(n, 2, generator=G))
    vector, scalar = a * b, torch.cat([a[i : i + 7] * b[i : i + 7] for i in range(0, n, 7)])
    differ = (torch.view_as_real(vector) != torch.view_as_real(scalar)).any(-1).sum().item()
    print(f"elementwise complex mul: vector != scalar code on {differ} of {n} inputs", flush=True)
    for t in (2, 3):
        torch.set_num_threads(t)
        for width in (101, 112, 256, 1536):
            base = torch.randn(1500, 2 * width, generator=G) * 4
            gate = base[:, :width]
            alone = torch.cat([F.silu(gate[i : i + 1]) for i in range(len(gate))])
            counts = [int((F.silu(gate[:m]) != alone[:m]).any(1).sum()) for m in range(1000, 1500, 20)]
            print(f"elementwise F.silu on [T, {width}] gate views, {t} threads, T = 1000..1480 step 20: rows with "
                  f"other bits than alone: {sum(counts)}", flush=True)


def reduction() -> None:
    x = torch.randn(64, 49152, generator=G) * 3
    torch.set_num_threads(1)
    serial = x.sum(-1), torch.logsumexp(x, -1)
    for t in (2, 3, 4):
        torch.set_num_threads(t)
        one = [sum(not torch.equal(f(x[i : i + 1]), s[i : i + 1]) for i in range(64)) for f, s in
               ((lambda v: v.sum(-1), serial[0]), (lambda v: torch.logsumexp(v, -1), serial[1]))]
        many = [not torch.equal(x[:m].sum(-1), serial[0][:m]) for m in (2, 3, 4, 17, 64)]
        print(f"reduction over 49152, {t} threads: 1-row calls with other bits than 1 thread: sum {one[0]}/64, "
              f"logsumexp {one[1]}/64; calls of 2-64 rows differing: {sum(many)}", flush=True)


def attention(threads: list[int]) -> None:
    for t in threads[:3]:
        torch.set_num_threads(t)
        bad = []
        for n in (1, 5, 37, 191, 192, 300, 384, 700, 768, 1000):
            for hq, hkv, d, window in ((9, 3, 64, None), (4, 2, 24, None), (4, 2, 16, 16)):
                q, k, v = (torch.randn(4, h, n, d, generator=G) for h in (hq, hkv, hkv))
                alone = torch.cat([_causal_sdpa(q[i : i + 1], k[i : i + 1], v[i : i + 1], d**-0.5, window, hq != hkv)
                                   for i in range(4)])
                if not torch.equal(_causal_sdpa(q, k, v, d**-0.5, window, hq != hkv), alone):
                    bad.append((n, hq, hkv, d, window))
        print(f"attention {t} threads: [4, H, n, D] calls with other bits than 4 lone calls: {bad or 'none'}",
              flush=True)


def topk() -> None:
    row = torch.zeros(1, 1000)
    row[0, ::7] = 1.0
    print("topk with 143 equal maxima: first 5 ids, k=5:", row.topk(5).indices[0].tolist(), " k=100:",
          row.topk(100).indices[0, :5].tolist(), flush=True)


def _gloo(ctx) -> dict[int, bool]:
    torch.set_num_threads(1)
    data = torch.randn(3000, 576, generator=torch.Generator().manual_seed(100 + ctx.rank))
    whole = data.clone()
    ctx.all_reduce(whole)
    kept = {}
    for m in (2, 5, 100, 1000, 2999):
        part = data[3000 - m :].clone()  # the same rows at other offsets of the buffer
        ctx.all_reduce(part)
        kept[m] = torch.equal(part, whole[3000 - m :])
    return kept


def allreduce() -> None:
    from model.distributed import launch_local

    for world in (2, 3, 4):
        kept = launch_local(_gloo, world)[0]
        print(f"gloo all_reduce, {world} ranks: rows keep their sums at another buffer offset: {kept}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2,3,4,8,16")
    parser.add_argument("--parts", default="matmul,elementwise,reduction,attention,topk,allreduce")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    parts = args.parts.split(",")
    print(f"{cpu_name()}; torch {torch.__version__}; {torch.backends.cpu.get_cpu_capability()}", flush=True)
    if "matmul" in parts:
        matmul(threads)
    if "elementwise" in parts:
        elementwise()
    if "reduction" in parts:
        reduction()
    if "attention" in parts:
        attention(threads)
    if "topk" in parts:
        topk()
    if "allreduce" in parts:
        allreduce()


if __name__ == "__main__":
    main()
