"""Sentence embeddings, the one computation behind `/v1/embeddings`, TEI's `/embed`, `/similarity` and vLLM's pair
scoring of an embedding model: a request's sequences run to their final normalized hidden states, are pooled,
cut to `dimensions` (Matryoshka) and L2-normalized unless the request says `normalize: false`.

Without a sentence-transformers configuration the pooling is `--pooling` (the last token or the mean of all) and
the vector is L2-normalized. With one (`modules.json`), the vector is what `SentenceTransformer.encode` computes:
the prompt (by name, else the default) prepended to the text, its Pooling module's mode (`lasttoken`, `mean`,
`cls`, `max`, `mean_sqrt_len_tokens`; `include_prompt` false leaves the prompt's tokens out of the pool), its Dense
modules, and Normalize where the modules list it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.runtime.outputs import HIDDEN_STATES, OutputSpec, ReturnHiddenStates

from .errors import InvalidInput
from .inputs import InputFields, PackedInputs, RequestInputs
from .served import ServedModel
from .tokenizing import TokenizingPool


ST_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": torch.tanh, "torch.nn.modules.linear.Identity": lambda x: x,
                "torch.nn.modules.activation.GELU": torch.nn.functional.gelu,
                "torch.nn.modules.activation.ReLU": torch.relu, "torch.nn.modules.activation.Sigmoid": torch.sigmoid}


class EmbeddingSetupError(ValueError):
    """The checkpoint's sentence-transformers configuration names something this server cannot compute."""


@dataclass(frozen=True)
class DenseLayer:
    weight: torch.Tensor  # float32 [out, in]
    bias: torch.Tensor | None  # float32 [out]
    activation: str


@dataclass(frozen=True)
class EmbeddingSetup:
    """How a sequence's final hidden states become its embedding (sentence-transformers' modules, or --pooling)."""

    pooling: tuple[str, ...] = ("lasttoken",)
    include_prompt: bool = True
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    sentence_transformers: bool = False  # read from modules.json

    @classmethod
    def load(cls, checkpoint: str, pooling_flag: str | None = None,
             default_prompt_name: str | None = None) -> EmbeddingSetup:
        """The checkpoint's configuration; `pooling_flag` (--pooling given on the command line) overrides its
        pooling; `default_prompt_name` (--default-prompt-name) its default prompt."""
        folder = Path(checkpoint)
        flag_pooling = {"last": ("lasttoken",), "mean": ("mean",)}.get(pooling_flag or "")
        modules_path = folder / "modules.json"
        if not modules_path.is_file():
            return cls(pooling=flag_pooling or ("lasttoken",))
        modules = json.loads(modules_path.read_text())
        pooling, include_prompt, dense, normalize = ("mean",), True, [], False
        for module in modules:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            path = folder / module.get("path", "")
            if kind == "Pooling":
                config = json.loads((path / "config.json").read_text())
                mode = config.get("pooling_mode")
                if mode is None:
                    mode = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
                pooling = tuple([mode] if isinstance(mode, str) else mode)
                include_prompt = bool(config.get("include_prompt", True))
            elif kind == "Dense":
                dense.append(_dense_layer(path))
            elif kind == "Normalize":
                normalize = True
            elif kind not in ("Transformer", ""):
                raise EmbeddingSetupError(f"modules.json: the module {module.get('type')} is not supported")
        unknown = [m for m in pooling if m not in ST_POOLING_MODES]
        if unknown:
            raise EmbeddingSetupError(f"1_Pooling: pooling mode {unknown[0]} is not supported "
                                      f"(supported: {', '.join(ST_POOLING_MODES)})")
        st_path = folder / "config_sentence_transformers.json"
        st = json.loads(st_path.read_text()) if st_path.is_file() else {}
        prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
        default = default_prompt_name or st.get("default_prompt_name")
        if default is not None and default not in prompts:
            raise EmbeddingSetupError(f"default prompt name {default!r} is not one of the checkpoint's prompts "
                                      f"{sorted(prompts)}")
        return cls(pooling=flag_pooling or pooling, include_prompt=include_prompt, dense=tuple(dense),
                   normalize=normalize, prompts=prompts, default_prompt_name=default, sentence_transformers=True)

    def prompt(self, prompt_name: str | None) -> str | None:
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return None
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise InvalidInput(f"prompt_name {name!r} is not one of this model's prompts ({known})",
                               param="prompt_name")
        return self.prompts[name]

    def describe(self) -> dict:
        return {"pooling": list(self.pooling), "include_prompt": self.include_prompt, "dense_layers": len(self.dense),
                "normalize": self.normalize, "prompts": sorted(self.prompts),
                "default_prompt_name": self.default_prompt_name, "sentence_transformers": self.sentence_transformers}

    @property
    def last_token_only(self) -> bool:
        return self.pooling == ("lasttoken",)

    def pool(self, states: torch.Tensor, prompt_tokens: int = 0) -> torch.Tensor:
        """[tokens, hidden] float32 -> [dims]: the Pooling module's modes concatenated, then the Dense layers."""
        pooled = states[prompt_tokens:] if prompt_tokens and not self.include_prompt else states
        if pooled.shape[0] == 0:
            pooled = states
        parts = []
        for mode in self.pooling:
            if mode == "cls":
                parts.append(pooled[0])
            elif mode == "lasttoken":
                parts.append(states[-1])
            elif mode == "max":
                parts.append(pooled.max(dim=0).values)
            else:  # mean, mean_sqrt_len_tokens
                count = torch.tensor(float(pooled.shape[0]))
                parts.append(pooled.sum(dim=0) / (count if mode == "mean" else torch.sqrt(count)))
        vector = torch.cat(parts)
        for layer in self.dense:
            vector = torch.nn.functional.linear(vector, layer.weight, layer.bias)
            vector = _ACTIVATIONS[layer.activation](vector)
        return vector


def _dense_layer(path: Path) -> DenseLayer:
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in _ACTIVATIONS:
        raise EmbeddingSetupError(f"{path.name}: activation {activation} is not supported")
    weights_file = path / "model.safetensors"
    if not weights_file.is_file():
        raise EmbeddingSetupError(f"{path.name}: model.safetensors not found (pickled weights are not loaded)")
    tensors = load_file(str(weights_file))
    bias = tensors.get("linear.bias")
    return DenseLayer(tensors["linear.weight"].float(), None if bias is None else bias.float(), activation)


def prompt_length(tokenizer, prompt: str) -> int:
    """The prompt's tokens as sentence-transformers counts them (Transformer._get_prompt_length): its encoding with
    the tokenizer's special tokens, less a special token the encoding ends with (an appended EOS or SEP)."""
    ids = tokenizer.encode(prompt).ids
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    return len(ids) - (1 if ids and ids[-1] in special else 0)


def apply_prompt(served: ServedModel, text: str, prompt_name: str | None) -> str:
    prompt = served.embedding.prompt(prompt_name)
    return text if prompt is None else prompt + text


@dataclass
class Embedded:
    vectors: list[np.ndarray]  # one float32 [dims] vector per sequence
    inputs: PackedInputs
    headers: dict[str, str]


def check_dimensions(served: ServedModel, dimensions: int | None) -> None:
    hidden = served.config.hidden_size
    if dimensions is not None and dimensions > hidden:
        raise InvalidInput(f"dimensions {dimensions} is larger than this model's hidden size {hidden}",
                           param="dimensions")


async def embed(served: ServedModel, engine, tokenizing: TokenizingPool, sent: RequestInputs, receive,
                fields: InputFields, *,
                prompt_name: str | None = None, normalize: bool | None = None,
                dimensions: int | None = None) -> Embedded:
    check_dimensions(served, dimensions)
    setup: EmbeddingSetup = served.embedding
    prompt = setup.prompt(prompt_name)
    prompt_tokens = 0
    if prompt is not None and sent.texts is not None:
        sent = dataclasses.replace(sent, texts=[prompt + text for text in sent.texts])
        if not setup.include_prompt:
            prompt_tokens = prompt_length(served.tokenizer, prompt)
    inputs = await tokenizing.pack(served, sent, fields)
    # every row where a pool reads more than the last one; the last row alone for last-token pooling
    last_only = setup.pooling == ("lasttoken",)
    mode = ReturnHiddenStates.LAST_NORMALIZED if last_only else ReturnHiddenStates.ALL_NORMALIZED
    spec = OutputSpec(logits=False, return_hidden_states=mode, layers=(served.config.num_layers,))
    vectors = []
    with await engine.score(inputs, spec, receive) as scored:
        hs = scored.outputs[HIDDEN_STATES][0]  # [rows, hidden] of the last layer, final norm applied
        h = 0
        for k in scored.outputs.hidden_rows:
            rows = hs[h : h + k]  # a view of the results: each vector below is a copy
            h += k
            vectors.append(_pooled(setup, rows, prompt_tokens, last_only, normalize, dimensions))
        headers = scored.timing_headers
    return Embedded(vectors, inputs, headers)


def _pooled(setup: EmbeddingSetup, rows: np.ndarray, prompt_tokens: int, last_only: bool, normalize: bool | None,
            dimensions: int | None) -> np.ndarray:
    """One sequence's float32 [dims] vector from its [rows, hidden] final hidden states."""
    if setup.sentence_transformers:
        vec = setup.pool(torch.from_numpy(np.array(rows, dtype=np.float32)), prompt_tokens).numpy()
        vec = vec[:dimensions]
        if normalize if normalize is not None else (setup.normalize or dimensions is not None):
            vec = torch.nn.functional.normalize(torch.from_numpy(vec), dim=-1).numpy()
    else:
        rows = rows.astype(np.float64)
        vec = rows[-1] if last_only else rows.mean(axis=0)
        vec = vec[:dimensions]  # Matryoshka: the first components, normalized below
        if normalize is not False:
            norm = float(np.linalg.norm(vec))
            vec = vec / norm if norm > 0 else vec
    return np.array(vec, dtype="<f4")


async def token_states(served: ServedModel, engine, tokenizing: TokenizingPool, sent: RequestInputs, receive,
                       fields: InputFields) -> Embedded:
    """Every token's final normalized hidden state (TEI's /embed_all): one float32 [tokens, hidden] per sequence."""
    inputs = await tokenizing.pack(served, sent, fields)
    spec = OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL_NORMALIZED,
                      layers=(served.config.num_layers,))
    out, h = [], 0
    with await engine.score(inputs, spec, receive) as scored:
        hs = scored.outputs[HIDDEN_STATES][0]  # [rows, hidden] of the last layer
        for k in scored.outputs.hidden_rows:
            out.append(np.array(hs[h : h + k], dtype="<f4"))  # a copy: the results are released below
            h += k
        headers = scored.timing_headers
    return Embedded(out, inputs, headers)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64 / denom) if denom > 0 else 0.0
