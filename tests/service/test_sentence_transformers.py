"""Embedding checkpoints saved by sentence-transformers, as their model cards publish them: a headless backbone
(keys without `model.`, no lm_head; `*Model` or, as Qwen3-Embedding, `*ForCausalLM` in config.json), modules.json
with a Pooling module of each mode (`include_prompt` on and off), Dense layers, Normalize, named prompts and a
default prompt. Every server's vectors equal `SentenceTransformer.encode`'s within 1e-5 in float32. Also: a
checkpoint that lacks a tensor ends the start with exit 2 and one line naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.checkpoints import make_checkpoint, make_tokenizer
from tests.service.conftest import REPO

st = pytest.importorskip("sentence_transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Logits are unnormalized log-probabilities."]
PROMPTS = {"query": "Instruct: find the passage\nQuery: ", "document": ""}
ATOL = 1e-5

# (family, pooling mode, include_prompt, Dense layers, Normalize, architectures written in config.json)
CASES = {
    "qwen3-lasttoken": ("qwen3", "lasttoken", True, 0, True, "Qwen3ForCausalLM"),  # Qwen3-Embedding as published
    "qwen2-mean-dense": ("qwen2", "mean", False, 1, True, None),  # gte-Qwen2-like, prompt left out of the mean
    "mistral-cls": ("mistral", "cls", False, 0, False, None),
    "gemma3-max-dense": ("gemma3", "max", True, 2, True, None),
}


def build(folder: Path, family: str, mode: str, include_prompt: bool, dense: int, normalize: bool,
          architecture: str | None, default_prompt: str | None = None) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import PreTrainedTokenizerFast

    base = make_checkpoint(folder / "base", f"{family}-headless")
    PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(), bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(base)
    transformer = Transformer(str(base))
    width = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(width, pooling_mode=mode, include_prompt=include_prompt)]
    torch.manual_seed(1)
    for i in range(dense):
        layer = Dense(width, 24 - 4 * i, activation_function=torch.nn.Tanh() if i == 0 else torch.nn.Identity())
        torch.nn.init.normal_(layer.linear.weight, std=0.3)
        modules.append(layer)
        width = 24 - 4 * i
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, prompts=PROMPTS, default_prompt_name=default_prompt, device="cpu")
    out = folder / "st"
    model.save(str(out))
    if architecture is not None:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, start_server):
    from sentence_transformers import SentenceTransformer

    name = request.param
    folder = build(tmp_path_factory.mktemp(name), *CASES[name])
    return name, SentenceTransformer(str(folder), device="cpu"), start_server(folder)


def served_embeddings(server, texts, **extra) -> np.ndarray:
    r = httpx.post(server.url + "/v1/embeddings", json={"input": texts, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


@pytest.mark.parametrize("prompt_name", [None, "query"])
def test_vectors_equal_sentence_transformers_encode(case, prompt_name):
    name, reference, server = case
    want = reference.encode(TEXTS, prompt_name=prompt_name, batch_size=1, convert_to_numpy=True)
    extra = {"prompt_name": prompt_name} if prompt_name else {}
    got = served_embeddings(server, TEXTS, **extra)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # TEI's /embed is the same computation; its `normalize` (default true) says whether to L2-normalize
    normalize = CASES[name][4]
    tei = httpx.post(server.url + "/embed", json={"inputs": TEXTS, "normalize": normalize, **extra}, timeout=60).json()
    assert np.array_equal(np.array(tei, dtype=np.float32), got)


def test_info_and_unknown_prompt_name(case):
    name, _, server = case
    family, mode, include_prompt, dense, normalize, _ = CASES[name]
    info = httpx.get(server.url + "/info").json()["embedding"]
    assert info == {"pooling": [mode], "include_prompt": include_prompt, "dense_layers": dense,
                    "normalize": normalize, "prompts": sorted(PROMPTS), "default_prompt_name": None,
                    "sentence_transformers": True}
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "x", "prompt_name": "nope"})
    assert r.status_code == 422 and "document, query" in r.json()["error"]["message"]


def test_default_prompt_name_of_checkpoint_and_flag(tmp_path, start_server):
    from sentence_transformers import SentenceTransformer

    folder = build(tmp_path, "qwen3", "mean", False, 0, True, None, default_prompt="query")
    reference = SentenceTransformer(str(folder), device="cpu")
    server = start_server(folder)
    want = reference.encode(TEXTS, batch_size=1)  # the checkpoint's default prompt applies
    np.testing.assert_allclose(served_embeddings(server, TEXTS), want, atol=ATOL, rtol=0)
    flagged = start_server(folder, "--default-prompt-name", "document")
    np.testing.assert_allclose(served_embeddings(flagged, TEXTS), reference.encode(TEXTS, prompt_name="document",
                                                                                   batch_size=1), atol=ATOL, rtol=0)
    assert httpx.get(flagged.url + "/info").json()["embedding"]["default_prompt_name"] == "document"


def test_a_missing_tensor_ends_the_start_with_exit_2(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_checkpoint(tmp_path / "broken", "llama", with_tokenizer=False)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_projection.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--model", str(folder), "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("logitserve:")]
    assert len(lines) == 1 and "'model.layers.1.mlp.up_proj.weight'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
