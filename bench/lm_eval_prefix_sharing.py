"""lm-evaluation-harness through `local-completions` against the server with --prefix-sharing off and on: the same
scores (every log-likelihood), and the wall time of each run. Results: docs/prefix_sharing.md.

    python bench/lm_eval_prefix_sharing.py [--model PATH] [--docs 32]

The task is local: a multiple-choice data file generated here (contexts of 150-500 tokens of English words, 4
choices of 1-6 words), described by a task YAML in the same folder (lm-eval's `json` dataset path, no network).
lm-eval sends the 4 (context, choice) pairs of each document as loglikelihood requests, 8 prompts per request from
4 concurrent clients, with the server's tokenizer (`tokenizer_backend=remote`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, model_path, start_server  # noqa: E402

TASK = "prefix_sharing_mc"
WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by word but what some we "
    "can out other were all there when up use your how said an each she which do their time if will way about many "
    "then them write would like so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find any new work part take "
    "get place made live where after back little only round man year came show every good me give our under name "
    "very through just form sentence great think say help low line differ turn cause much mean before move right "
    "boy old too same tell does set three want air well also play small end put home read hand port large spell add "
    "even land here must big high such follow act why ask men change went light kind off need house picture try us "
    "again animal point mother world near build self earth father head stand own page should country found answer"
).split()


def write_task(folder: Path, docs: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(folder / "data.jsonl", "w") as f:
        for _ in range(docs):
            context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(130, 430))).capitalize() + "."
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(4)]
            f.write(json.dumps({"context": context, "choices": choices, "label": rng.randrange(4)}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {folder / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n"
    )


def evaluate(url: str, model_name: str, folder: Path, batch_size: int = 8,
             num_concurrent: int = 4) -> tuple[dict, list, float]:
    """(acc / acc_norm, every request's (log-likelihood, is_greedy) in document order, wall seconds)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("OPENAI_API_KEY", "unused")  # the server runs without --api-key
    t0 = time.perf_counter()
    results = simple_evaluate(
        model="local-completions",
        model_args={"base_url": url + "/v1/completions", "model": model_name, "tokenizer_backend": "remote",
                    "num_concurrent": num_concurrent, "max_retries": 1, "max_length": 2048},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=batch_size,
        log_samples=True,
    )
    wall = time.perf_counter() - t0
    scores = {k: v for k, v in results["results"][TASK].items() if k.startswith("acc")}
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return scores, [s["resps"] for s in samples], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    folder, name = model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="lm-eval-prefix-sharing-"))
    write_task(work, args.docs, args.seed)
    rows = {}
    for mode in ("off", "on"):
        server, url = start_server(folder, "--prefix-sharing", mode)
        try:
            import httpx

            served = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            assert httpx.get(url + "/info").json()["prefix_sharing"] == (mode == "on")
            rows[mode] = evaluate(url, served, work)
            shared = next((float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
                           if line.startswith("logitserve_prefix_shared_tokens_total ")), 0.0)
            rows[mode] = (*rows[mode], shared)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print(f"model: {name}; machine: {machine()}; date: {datetime.date.today().isoformat()}; lm-eval local-completions,"
          f" {args.docs} documents x 4 choices, batch_size 8, num_concurrent 4\n")
    print("| --prefix-sharing | acc | acc_norm | wall s | tokens not recomputed |")
    print("| --- | --- | --- | --- | --- |")
    for mode, (scores, _, wall, shared) in rows.items():
        print(f"| {mode} | {scores['acc,none']:.4f} | {scores['acc_norm,none']:.4f} | {wall:.1f} | {shared:.0f} |")
    same = rows["off"][1] == rows["on"][1]
    print(f"\nevery log-likelihood and is_greedy equal off / on: {same}; wall off / on: "
          f"{rows['off'][2] / rows['on'][2]:.2f}")


if __name__ == "__main__":
    main()
