"""Pieces shared by the benchmarks: model choice, machine description, FLOP counts, the in-run matmul roofline,
and an F32 GGUF of a checkpoint for llama.cpp."""

from __future__ import annotations

import json
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


def real_flops(cfg, lens: list[int], last_only: bool) -> float:
    """Matmuls of every real token, causal attention per sequence, lm_head on the rows computed."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer_params = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * inter
    tokens = sum(lens)
    matmul = 2 * per_layer_params * layers * tokens
    attention = layers * sum(2 * 2 * n * n / 2 * cfg.q_size for n in lens)
    rows = len(lens) if last_only else tokens
    return matmul + attention + 2 * h * cfg.vocab_size * rows


class Roofline:
    """The model's matmuls (its own weights) on the real tokens of a batch; returns (seconds, FLOPs).

    kernel "mkl": ``F.linear`` (MKL's sgemm, what transformers and our decoder layers run); "best": each matmul
    shape timed with both MKL and oneDNN and the faster one counted (our lm_head runs on oneDNN, model/layers.py),
    so a share against it cannot gain from a kernel choice."""

    def __init__(self, runner, kernel: str = "mkl") -> None:
        assert kernel in ("mkl", "best"), kernel
        self.kernel = kernel
        m = runner.model
        self.mats = []
        for layer in m.layers:
            a, p = layer.self_attn, layer.mlp
            self.mats.append((a.qkv_proj.weight, a.o_proj.weight, p.gate_up_proj.weight, p.down_proj.weight))
        self.head = m.lm_head.weight

    def _time(self, fn, tokens: int, rows: int) -> list[float]:
        """Seconds of each shape group: qkv, o, gate_up, down (over all layers), head."""
        h = self.head.shape[1]
        x = torch.randn(tokens, h)
        inner = torch.randn(tokens, self.mats[0][3].shape[1])
        heads = torch.randn(tokens, self.mats[0][1].shape[1])
        inputs = (x, heads, x, inner)
        seconds = []
        with torch.inference_mode():
            for k in range(4):
                t0 = time.perf_counter()
                for mats in self.mats:
                    fn(inputs[k], mats[k])
                seconds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fn(x[:rows], self.head)
            seconds.append(time.perf_counter() - t0)
        return seconds

    def __call__(self, tokens: int, rows: int) -> tuple[float, float]:
        seconds = self._time(F.linear, tokens, rows)
        if self.kernel == "best":
            from model.layers import head_linear  # oneDNN for float32 on CPU (F.linear where it is unavailable)

            seconds = [min(a, b) for a, b in zip(seconds, self._time(head_linear, tokens, rows))]
        flops = sum(2 * tokens * w.numel() * len(self.mats) for w in self.mats[0])
        flops += 2 * rows * self.head.numel()
        return sum(seconds), flops


def _permute(w, n_head: int):
    """llama.cpp's q/k permutation (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_f32_gguf(hf_dir: Path, out: Path) -> Path:
    """The HF Llama checkpoint in ``hf_dir`` (with its tokenizer.json) as an all-F32 GGUF, the way llama.cpp's
    converter writes a Llama: llama tensor names, q/k rows permuted for its rotary layout, gpt2-style BPE vocab."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope_theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    tmp = out.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(hf_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(rope_theta))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(cfg["vocab_size"] - len(tokens))]
    special = {a["content"] for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)

    def add(name: str, data) -> None:
        w.add_tensor(name, np.ascontiguousarray(data.astype(np.float32)))

    add("token_embd.weight", tensors["model.embed_tokens.weight"])
    add("output_norm.weight", tensors["model.norm.weight"])
    if "lm_head.weight" in tensors and not cfg.get("tie_word_embeddings"):
        add("output.weight", tensors["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", tensors[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", tensors[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute(tensors[p + "self_attn.q_proj.weight"], n_head))
        add(f"blk.{i}.attn_k.weight", _permute(tensors[p + "self_attn.k_proj.weight"], n_kv))
        add(f"blk.{i}.attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", tensors[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", tensors[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", tensors[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", tensors[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def f32_gguf(hf_dir: Path) -> Path:
    """An F32 GGUF of ``hf_dir``, cached next to the temporary folder (rewritten when the checkpoint is newer)."""
    hf_dir = Path(hf_dir)
    out = Path(tempfile.gettempdir()) / f"logitserve-bench-{hf_dir.name}-f32.gguf"
    src = hf_dir / "model.safetensors"
    if not out.is_file() or out.stat().st_mtime < src.stat().st_mtime:
        write_f32_gguf(hf_dir, out)
    return out


def start_server(model: str | Path, *flags: str, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`logitserve serve --model MODEL FLAGS` on a free loopback port, waited until /ready; (process, base URL)."""
    import httpx

    from model.distributed import find_free_port

    port = find_free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITSERVE_")}
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
