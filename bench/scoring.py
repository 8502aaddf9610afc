"""Scoring throughput on one machine: logitserve (in-process and over HTTP) against transformers and llama.cpp.

Workload (seeded): N sequences (128; 32 with --quick) of random token ids, lengths uniform in 16..512, cut into
slices of --clients (16) sequences. Three cases:

* last: last-token logits (HTTP: JSON);
* ppl: target-token log-probs over all positions, i.e. perplexity scoring (HTTP: JSON, no logits);
* all: full logits of every row (HTTP: binary, ``Accept: application/x-safetensors``).

Systems, each in its own process (so each has its own peak RSS), all float32, 2 intra-op threads:

* transformers: the slice sorted by length, batches of 8, padded with an attention mask (left padding and
  ``logits_to_keep=1`` for last; log_softmax + gather on the padded logits for ppl);
* llama.cpp: ``llama-cpp-python`` on the same weights written as an F32 GGUF (F32 KV cache: llama.cpp's default
  F16 cache and its flash attention move logits by ~0.1), one sequence at a time, ``logits_all`` for ppl/all;
* ours in-process: ``ModelRunner.run`` on the slice packed in arrival order up to --max-batch-tokens (batch
  invariance on, the CPU default); "ours in-process (invariance off)" the same with ``batch_invariant=False``:
  the switch's cost;
* ours over HTTP: ``logitserve serve`` in a subprocess, --clients concurrent httpx async clients, one sequence per
  request, responses decoded by the client (JSON parsed, safetensors loaded);
* roofline: ``F.linear`` with the model's weights on the real tokens' matmul shapes (bench/common.Roofline), and
  a second one that counts, per shape, the faster of MKL and oneDNN (our lm_head runs on oneDNN).

The machine's speed drifts, so every slice runs on every system in turn (order rotated per slice) and the summed
times are compared. Latency of a sequence: from the moment the whole slice is submitted until its result is in
hand (for HTTP: measured by the client). Peak memory: ru_maxrss of each system's process; for HTTP the sum of
VmHWM over the server's processes and, in parentheses, the peak of their summed PSS (class TreePss: the HWM sum
counts shared pages once per process). Useful tokens/s counts real tokens. Roofline share = FLOPs of the real
tokens (bench/common.real_flops) / (time x the roofline's FLOP/s over the same slices).

    python bench/scoring.py [--quick] [--sequences N] [--cases last,ppl,all] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_name, f32_gguf, model_path, real_flops, start_server  # noqa: E402
from service.packing import pack_ids, plan_batches  # noqa: E402  (the server's packing rule)

HF_BATCH = 8
CASES = ("last", "ppl", "all")
SYSTEMS = ("transformers", "llama.cpp", "ours in-process", "ours in-process (invariance off)", "ours HTTP")
# The machine's float32 matmul rate, two ways (bench/common.Roofline): F.linear (MKL), and per shape the faster
# of MKL and oneDNN (our lm_head uses oneDNN, so only this one shows overhead without a kernel choice's credit).
ROOFLINES = {"roofline": "mkl", "roofline best": "best"}
LABEL = {"last": "last-token logits", "ppl": "perplexity (target log-probs, all positions)", "all": "all-rows logits (binary)"}


# ------------------------------------------------------------------------------------------ system workers


def _worker(system: str, path: str, gguf: str, budget: int, conn) -> None:
    import torch

    torch.set_num_threads(2)
    run = _make_system(system, path, gguf, budget)
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            return
        _, case, seqs = msg
        gc.collect()
        conn.send(run(case, seqs))


def _make_system(system: str, path: str, gguf: str, budget: int):
    import torch

    if system.startswith("ours in-process"):
        from model import ModelRunner, OutputSpec, ReturnLogits

        runner = ModelRunner.load(path, device="cpu", dtype="float32", batch_invariant=not system.endswith("(invariance off)"))
        specs = {"last": OutputSpec(return_logits=ReturnLogits.LAST_TOKEN),
                 "ppl": OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True),
                 "all": OutputSpec(return_logits=ReturnLogits.ALL)}

        def run(case, seqs):
            done, check = [0.0] * len(seqs), [None] * len(seqs)
            t0 = time.perf_counter()
            for batch in plan_batches(seqs, budget):  # in the server's order (a shared prefix groups sequences)
                ids, offsets = pack_ids([seqs[i] for i in batch])
                outs = runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), [specs[case]] * len(batch))
                now = time.perf_counter() - t0
                for i, o in zip(batch, outs):
                    done[i] = now
                    check[i] = _check(case, o.logits, o.target_logprobs)
            return done, check

        return run

    if system == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        @torch.inference_mode()
        def run(case, seqs):
            done, check = [0.0] * len(seqs), [None] * len(seqs)
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            t0 = time.perf_counter()
            for j in range(0, len(order), HF_BATCH):
                batch = order[j : j + HF_BATCH]
                longest = max(len(seqs[i]) for i in batch)
                ids = torch.zeros(len(batch), longest, dtype=torch.int64)
                mask = torch.zeros(len(batch), longest, dtype=torch.int64)
                for b, i in enumerate(batch):
                    s, n = torch.tensor(seqs[i]), len(seqs[i])
                    if case == "last":  # left padding: the last column is every sequence's last token
                        ids[b, longest - n :], mask[b, longest - n :] = s, 1
                    else:
                        ids[b, :n], mask[b, :n] = s, 1
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               logits_to_keep=1 if case == "last" else 0).logits
                if case == "ppl":
                    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
                now = time.perf_counter() - t0
                for b, i in enumerate(batch):
                    n = len(seqs[i])
                    if case == "last":
                        check[i] = _check(case, logits[b, -1:], None)
                    elif case == "ppl":
                        check[i] = _check(case, None, logp[b, : n - 1])
                    else:
                        check[i] = _check(case, logits[b, :n], None)
                    done[i] = now
                del logits
            return done, check

        return run

    if system == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(gguf, logits_all=True, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2,
                    type_k=0, type_v=0, verbose=False)  # GGML_TYPE_F32 KV cache
        vocab = llm.n_vocab()

        def run(case, seqs):
            done, check = [0.0] * len(seqs), []
            llm._logits_all = case != "last"
            t0 = time.perf_counter()
            for i, s in enumerate(seqs):
                llm.reset()
                llm.eval(s)
                n = len(s)
                if case == "last":
                    logits = torch.from_numpy(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(1, vocab)).copy())
                    check.append(_check(case, logits, None))
                elif case == "ppl":
                    logits = torch.from_numpy(llm.scores[: n - 1])
                    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(s[1:])[:, None]).squeeze(1)
                    check.append(_check(case, None, logp))
                else:
                    logits = torch.from_numpy(llm.scores[:n].copy())  # the next reset overwrites scores
                    check.append(_check(case, logits, None))
                done[i] = time.perf_counter() - t0
            return done, check

        return run

    if system in ROOFLINES:
        from bench.common import Roofline
        from model import ModelRunner

        roof = Roofline(ModelRunner.load(path, device="cpu", dtype="float32"), kernel=ROOFLINES[system])

        def run(case, seqs):
            seconds = flops = 0.0
            for batch in plan_batches(seqs, budget):
                tokens = sum(len(seqs[i]) for i in batch)
                s, f = roof(tokens, len(batch) if case == "last" else tokens)
                seconds, flops = seconds + s, flops + f
            return seconds, flops

        return run
    raise ValueError(system)


def _check(case, logits, logp) -> float:
    """A number per sequence that every system must agree on (compared across systems on the first slice)."""
    if case == "ppl":
        return float(logp[: len(logp) - (1 if np.isnan(float(logp[-1])) else 0)].double().mean())
    return float(logits[-1].double().mean())


# ------------------------------------------------------------------------------------------------- HTTP

HTTP_REQUEST = {
    "last": ({"return_logits": "last_token"}, {}),
    "ppl": ({"return_logits": "all", "logits": False, "target_logprobs": True}, {}),
    "all": ({"return_logits": "all"}, {"Accept": "application/x-safetensors"}),
}


def _decode(case: str, r):
    import torch

    if case == "all":
        # service.client's decoder: numpy views of the body, no second copy (safetensors.numpy.load copies
        # every tensor out of the body, on the cores the server needs; docs/benchmarks.md has its cost).
        from service.client import read_safetensors

        t, _ = read_safetensors(r.content)
        return _check(case, torch.from_numpy(t["logits"][-1:].copy()), None)  # read-only view: copy the row checked
    d = r.json()["data"][0]
    if case == "last":
        return _check(case, torch.tensor(d["logits"]), None)
    return _check(case, None, torch.tensor([float("nan") if x is None else x for x in d["target_logprobs"]]))


async def http_slice(client, case: str, seqs: list[list[int]], clients: int):
    options, headers = HTTP_REQUEST[case]
    done, check = [0.0] * len(seqs), [None] * len(seqs)
    todo = list(range(len(seqs)))[::-1]
    t0 = time.perf_counter()

    async def one_client():
        while todo:
            i = todo.pop()
            t = time.perf_counter()
            r = await client.post("/v1/logits", json={"input_ids": [seqs[i]], **options}, headers=headers)
            r.raise_for_status()
            check[i] = _decode(case, r)
            done[i] = time.perf_counter() - t  # each request is sent when the slice starts (clients >= slice)

    await asyncio.gather(*(one_client() for _ in range(clients)))
    total = time.perf_counter() - t0
    return total, done, check


def tree_hwm(pid: int) -> int:
    """Sum of VmHWM (peak RSS) over a process and its descendants, in bytes."""
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    total = 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class TreePss:
    """Samples the summed PSS of a process tree (every 0.25 s, in a thread) and keeps the maximum.

    The server's VmHWM sum counts a shared-memory result batch twice (the worker writes it, the front end maps it
    to stream it) and the model's file pages in each process; PSS splits shared pages between their users, so
    this is the tree's real footprint (up to the sampling interval)."""

    def __init__(self, pid: int, interval: float = 0.25):
        import threading

        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            try:
                root = psutil.Process(self.pid)
                total = 0
                for p in [root] + root.children(recursive=True):
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.Error, OSError):
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the default model)")
    p.add_argument("--quick", action="store_true", help="32 sequences instead of 128")
    p.add_argument("--sequences", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--cases", default="last,ppl,all")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of: " + ", ".join(SYSTEMS))
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="server flag; also the in-process packing budget")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--replot", metavar="JSON", help="only redraw --plot from a --json file of an earlier run")
    args = p.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        rows = saved["rows"]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        systems = list(dict.fromkeys(r["system"] for r in rows))
        plot(saved["meta"], rows, cases, systems, args.plot or str(Path(args.replot).with_suffix(".png")))
        return

    import httpx
    import torch

    from model.families.config import ModelConfig

    path, label = model_path(args.model)
    cfg = ModelConfig.from_pretrained(path)
    gguf = str(f32_gguf(path)) if "llama.cpp" in args.systems.split(",") else ""
    n = args.sequences or (32 if args.quick else 128)
    rng = np.random.default_rng(args.seed)
    lens = rng.integers(16, 513, n).tolist()
    seqs = [rng.integers(0, cfg.vocab_size, k).tolist() for k in lens]
    slices = [list(range(i, min(i + args.clients, n))) for i in range(0, n, args.clients)]
    cases = args.cases.split(",")
    systems = [s for s in args.systems.split(",") if s]
    meta = dict(model=label, path=str(path), machine=cpu_name(), cores=os.cpu_count(), date=str(datetime.date.today()),
                torch=torch.__version__, transformers=__import__("transformers").__version__,
                llama_cpp=__import__("llama_cpp").__version__ if gguf else "-", sequences=n, tokens=sum(lens),
                seed=args.seed, clients=args.clients, max_batch_tokens=args.max_batch_tokens)
    print(json.dumps(meta), file=sys.stderr)

    ctx = mp.get_context("spawn")
    workers = {}
    for s in [x for x in systems if x != "ours HTTP"] + list(ROOFLINES):
        a, b = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(s, str(path), gguf, args.max_batch_tokens, b), daemon=True)
        proc.start()
        workers[s] = (proc, a)

    server = None
    if "ours HTTP" in systems:
        server, url = start_server(path, "--max-batch-tokens", str(args.max_batch_tokens),
                                   "--max-queue-tokens", "100000000", "--dtype", "float32")

    loop = asyncio.new_event_loop()
    client = pss = None
    if server:
        pss = TreePss(server.pid)
        client = httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=args.clients))

    def call(system: str, case: str, ss: list[list[int]]):
        if system == "ours HTTP":
            return loop.run_until_complete(http_slice(client, case, ss, args.clients))
        conn = workers[system][1]
        t0 = time.perf_counter()
        conn.send(("run", case, ss))
        out = conn.recv()
        if system in ROOFLINES:
            return out
        done, check = out
        return time.perf_counter() - t0, done, check  # wall time includes the pipe; done times do not

    results = {}
    try:
        # Untimed, the slice with the most tokens once per system and case: a process's first batch of a new size
        # grows its allocator's retained memory (page faults on fresh pages, seconds on a loaded machine), a
        # one-time cost that would land on whichever system meets that size first.
        warm = [seqs[i] for i in max(slices, key=lambda sl: sum(lens[i] for i in sl))]
        for case in cases:
            for s in systems + list(ROOFLINES):
                call(s, case, warm)
        for case in cases:
            print(f"case {case}:", file=sys.stderr, flush=True)
            r = {s: dict(seconds=0.0, latency=[], check=[]) for s in systems}
            roof_s = roof_f = best_s = 0.0
            order = systems + list(ROOFLINES)
            for k, sl in enumerate(slices):
                ss = [seqs[i] for i in sl]
                rot = order[k % len(order):] + order[: k % len(order)]
                for s in rot:
                    if s == "roofline":
                        sec, fl = call(s, case, ss)
                        roof_s, roof_f = roof_s + sec, roof_f + fl
                        continue
                    if s == "roofline best":
                        best_s += call(s, case, ss)[0]
                        continue
                    wall, done, check = call(s, case, ss)
                    r[s]["seconds"] += max(done) if s != "ours HTTP" else wall
                    r[s]["latency"] += done
                    r[s]["check"] += check
                print(f"  slice {k + 1}/{len(slices)}: " + ", ".join(f"{s} {v['seconds']:.1f}s" for s, v in r.items())
                      + f", roofline {roof_s:.1f}s, best-kernel roofline {best_s:.1f}s", file=sys.stderr, flush=True)
            results[case] = dict(systems=r, roofline_seconds=roof_s, roofline_flops=roof_f, roofline_best_seconds=best_s,
                                 flops=real_flops(cfg, lens, case == "last"))
    finally:
        peaks = {}
        if server:
            peaks["ours HTTP"] = tree_hwm(server.pid)
            peaks["ours HTTP pss"] = pss.stop()
            loop.run_until_complete(client.aclose())
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        for s, (proc, conn) in workers.items():
            try:
                conn.send(("stop",))
                peaks[s] = conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(timeout=30)

    report(meta, results, peaks, systems, cases, args)


def summarize(meta, results, peaks, systems, cases):
    rows = []
    for case in cases:
        res = results[case]
        rate = res["roofline_flops"] / res["roofline_seconds"]
        best_rate = res["roofline_flops"] / res["roofline_best_seconds"]
        sys_ = res["systems"]
        ref = sys_[systems[0]]["check"]
        for s in systems:
            v = sys_[s]
            lat = np.array(v["latency"])
            agree = float(np.max(np.abs(np.array(v["check"]) - np.array(ref))))
            rows.append(dict(case=case, system=s, tps=meta["tokens"] / v["seconds"], seconds=v["seconds"],
                             p50=float(np.percentile(lat, 50)), p99=float(np.percentile(lat, 99)),
                             peak=peaks.get(s, 0) / 2**30, peak_pss=peaks.get(s + " pss", 0) / 2**30, share=res["flops"] / (v["seconds"] * rate),
                             share_best=res["flops"] / (v["seconds"] * best_rate), rate=rate / 1e9,
                             best_rate=best_rate / 1e9, agree=agree))
    return rows


def peak(row: dict) -> str:
    text = f"{row['peak']:.2f}"
    return text + f" ({row['peak_pss']:.2f} PSS)" if row.get("peak_pss") else text


def report(meta, results, peaks, systems, cases, args) -> None:
    rows = summarize(meta, results, peaks, systems, cases)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=results, peaks=peaks, rows=rows), indent=1))
    print(f"Model: {meta['model']}; machine: {meta['machine']}, {meta['cores']} cores; date {meta['date']}; "
          f"torch {meta['torch']}, transformers {meta['transformers']}, llama-cpp-python {meta['llama_cpp']}")
    print(f"Workload: {meta['sequences']} sequences, lengths uniform 16..512 (seed {meta['seed']}), {meta['tokens']} "
          f"tokens; slices of {meta['clients']}; {meta['clients']} HTTP clients; --max-batch-tokens "
          f"{meta['max_batch_tokens']}\n")
    print("| case | system | useful tok/s | vs transformers | vs llama.cpp | p50 / p99 latency (s) | peak RSS (GiB) "
          "| roofline share: MKL / best kernel | matmul rate, GFLOP/s: MKL / best |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = {x["system"]: x for x in rows if x["case"] == r["case"]}
        vs = lambda s: f"{base[s]['seconds'] / r['seconds']:.2f}x" if s in base else "-"  # noqa: E731
        print(f"| {r['case']} | {r['system']} | {r['tps']:.0f} | {vs('transformers')} | {vs('llama.cpp')} "
              f"| {r['p50']:.1f} / {r['p99']:.1f} | {peak(r)} | {r['share']:.0%} / {r['share_best']:.0%} "
              f"| {r['rate']:.0f} / {r['best_rate']:.0f} |")
    if any(r.get("peak_pss") for r in rows):
        print("\nours HTTP peak memory: sum of VmHWM over the server's processes (shared pages counted in each) "
              "(peak summed PSS, sampled every 0.25 s)")
    print("\nagreement (max |difference| of the per-sequence check value vs the first system): " +
          "; ".join(f"{r['case']}/{r['system']} {r['agree']:.1e}" for r in rows))
    if args.plot:
        plot(meta, rows, cases, systems, args.plot)


def plot(meta, rows, cases, systems, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(systems)
    for k, s in enumerate(systems):
        xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(cases))]
        tps = [next(r["tps"] for r in rows if r["case"] == c and r["system"] == s) for c in cases]
        share = [100 * next(r["share"] for r in rows if r["case"] == c and r["system"] == s) for c in cases]
        axes[0].bar(xs, tps, width, label=s)
        axes[1].bar(xs, share, width, label=s)
        best = [100 * next(r["share_best"] for r in rows if r["case"] == c and r["system"] == s) for c in cases]
        axes[1].scatter(xs, best, color="black", marker="_", s=120, zorder=3,
                        label="against the best-kernel roofline" if k == 0 else None)
    for ax, title in zip(axes, ("useful tokens/s", "share of the in-run float32 matmul roofline (%)")):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([{"last": "last-token logits", "ppl": "perplexity", "all": "all-rows logits"}[c] for c in cases])
        ax.set_title(title)
    axes[1].axhline(90, color="gray", linestyle="--", linewidth=1)  # the in-process target
    axes[1].plot([], [], color="gray", linestyle="--", linewidth=1, label="90% (the in-process target)")
    # One legend under both panels: inside an axis it covers the bars.
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{meta['model']}, {meta['sequences']} seqs (16..512 tokens), {meta['machine']} x{meta['cores']}, "
                 f"{meta['date']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
