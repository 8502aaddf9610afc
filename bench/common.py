"""Pieces shared by the benchmarks: model choice, machine description, FLOP counts, the in-run matmul roofline,
an F32 GGUF of a checkpoint for llama.cpp (written by service.default_model.write_gguf) and a server to measure."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    tie_word_embeddings=True,
)


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


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown CPU"


def machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def mlp_params_per_token(cfg, layer: int) -> int:
    """Weights one token multiplies in layer `layer`'s MLP: the dense gated MLP, or (a sparse MoE layer) the router
    and its top-k experts."""
    h, moe = cfg.hidden_size, getattr(cfg, "moe", None)
    if moe is not None and moe.sparse_layers[layer]:
        return h * moe.num_experts + moe.experts_per_token * 3 * h * moe.expert_intermediate_size
    return 3 * h * cfg.intermediate_size


def real_flops(cfg, lens: list[int], last_only: bool) -> float:
    """Matmuls of every real token (an MoE layer: the router and the chosen experts only), causal attention per
    sequence, lm_head on the rows computed."""
    h, layers = cfg.hidden_size, cfg.num_layers
    attention_params = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h
    tokens = sum(lens)
    matmul = 2 * tokens * sum(attention_params + mlp_params_per_token(cfg, i) for i in range(layers))
    attention = layers * sum(2 * 2 * n * n / 2 * cfg.q_size for n in lens)
    rows = len(lens) if last_only else tokens
    return matmul + attention + 2 * h * cfg.vocab_size * rows


class Roofline:
    """The model's matmuls (its own weights) on the real tokens of a batch; returns (seconds, FLOPs).

    An MoE layer counts its router on every token and each expert's gate_up / down as one matmul over top-k rows
    per token (the experts' work with no split into groups: what a perfectly balanced grouped matmul would cost).

    kernel "mkl": ``F.linear`` (MKL's sgemm, what transformers and our decoder layers run); "best": each matmul
    shape timed with both MKL and oneDNN and the faster one counted (our lm_head runs on oneDNN, model/layers/base.py),
    so a share against it cannot gain from a kernel choice."""

    def __init__(self, runner, kernel: str = "mkl") -> None:
        assert kernel in ("mkl", "best"), kernel
        from model.layers.moe import SparseMoeBlock

        self.kernel = kernel
        m = runner.model
        self.mats: list[tuple[torch.Tensor, int]] = []  # (weight [out, in], rows per token), every layer's
        for layer in m.layers:
            a, p = layer.self_attn, layer.mlp
            self.mats += [(a.qkv_proj.weight, 1), (a.o_proj.weight, 1)]
            if isinstance(p, SparseMoeBlock):
                k = p.gate.top_k
                self.mats += [(p.gate.weight, 1), (p.experts.gate_up_proj[0], k), (p.experts.down_proj[0], k)]
            else:
                self.mats += [(p.gate_up_proj.weight, 1), (p.down_proj.weight, 1)]
        self.head = m.lm_head.weight

    def _time(self, fn, tokens: int, rows: int) -> float:
        """Seconds of every layer's matmuls and the head."""
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        for w, per_token in self.mats:
            inputs.setdefault((tokens * per_token, w.shape[1]), torch.randn(tokens * per_token, w.shape[1]))
        x = torch.randn(rows, self.head.shape[1])
        with torch.inference_mode():
            t0 = time.perf_counter()
            for w, per_token in self.mats:
                fn(inputs[tokens * per_token, w.shape[1]], w)
            fn(x, self.head)
            return time.perf_counter() - t0

    def __call__(self, tokens: int, rows: int) -> tuple[float, float]:
        seconds = self._time(F.linear, tokens, rows)
        if self.kernel == "best":
            from model.layers.base import head_linear  # oneDNN for float32 on CPU (F.linear where it is unavailable)

            seconds = min(seconds, self._time(head_linear, tokens, rows))
        flops = sum(2 * tokens * per_token * w.numel() for w, per_token in self.mats)
        flops += 2 * rows * self.head.numel()
        return seconds, flops


def f32_gguf(hf_dir: Path) -> Path:
    """An F32 GGUF of ``hf_dir``, cached next to the temporary folder (rewritten when the checkpoint is newer)."""
    hf_dir = Path(hf_dir)
    out = Path(tempfile.gettempdir()) / f"logitserve-bench-{hf_dir.name}-f32.gguf"
    src = hf_dir / "model.safetensors"
    if not out.is_file() or out.stat().st_mtime < src.stat().st_mtime:
        from service.default_model import write_gguf

        write_gguf(hf_dir, out)
    return out


def start_server(model: str | Path, *flags: str, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`logitserve serve --model MODEL FLAGS` on a free loopback port, waited until /ready; (process, base URL).
    `env`: LOGITSERVE_* settings that are no flag."""
    import httpx

    from model.distributed import find_free_port

    port = find_free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOGITSERVE_")}, **(env or {})}
    server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--model", str(model), "--port", str(port),
                               *flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit("server did not become ready")
        time.sleep(0.2)
