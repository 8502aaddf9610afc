"""A small client for logitserve, sync (`Client`) and async (`AsyncClient`), on httpx.

Scoring calls ask for the binary (safetensors) response by default and return one `SequenceResult` per input
sequence, with numpy arrays (`tensors="np"`) or torch tensors (`tensors="pt"`); `binary=False` asks for JSON and
returns the same structures.

    from service.client import Client

    with Client("http://127.0.0.1:8000") as c:
        out = c.logits(inputs=["The capital of France is"], return_logits="all", logits=False, target_logprobs=True)
        out[0].target_logprobs          # float32 [num_tokens], NaN for the last position
        c.embeddings(["a sentence", "another"])   # float32 [2, hidden], L2-normalized

Errors come back as `LogitserveError` (status, type, message, param).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import field, make_dataclass
from typing import Any

import httpx
import numpy as np

from model.runtime.outputs import OUTPUT_KINDS, OUTPUT_REQUEST_FIELDS, Rows

SAFETENSORS = "application/x-safetensors"

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "F64": np.float64}


class LogitserveError(Exception):
    def __init__(self, status: int, type: str, message: str, param: str | None = None):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message, self.param = status, type, message, param


# The outputs of one sequence: one field per output kind (model.runtime.outputs.OUTPUT_KINDS: positions [R] (hidden-state
# rows for /v1/hidden_states), logits [R, vocab], target_logprobs float32 [R] (NaN where there is no next token),
# top_k_ids / top_k_logprobs [R, k], hidden_states [L, Rh, hidden], hidden_positions [Rh], ...); fields the request
# did not ask for are None.
SequenceResult = make_dataclass(
    "SequenceResult",
    [("index", int), ("num_tokens", int)] + [(k.name, Any, None) for k in OUTPUT_KINDS]
    + [("layers", list, field(default_factory=list))],
    namespace={"__module__": __name__},
)


class Result(list):
    """A list of SequenceResult, plus the model name and the server's timings (milliseconds)."""

    model: str = ""
    queue_ms: float | None = None
    inference_ms: float | None = None


# ------------------------------------------------------------------------------------------------ decoding


def read_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """numpy arrays (bfloat16 widened to float32) and metadata of a safetensors body.

    Arrays other than bfloat16 are read-only views of `data` itself: slicing `bytes` would copy, and a second
    copy of a large body (full-vocabulary logits are ~200 KB per row) costs as much as receiving it."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n :]
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        buf = body[a:b]  # a view, no copy
        if h["dtype"] == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=np.dtype(_NP_DTYPES[h["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(h["shape"])
    return out, meta


def _bf16_to_torch(data: bytes):
    """torch tensors straight from the body, bfloat16 kept."""
    from safetensors.torch import load

    return load(data)


def _split(arr, offsets, dim: int = 0) -> list:
    offs = [int(x) for x in offsets]
    if dim == 0:
        return [arr[offs[i] : offs[i + 1]] for i in range(len(offs) - 1)]
    return [arr[:, offs[i] : offs[i + 1]] for i in range(len(offs) - 1)]


def _to(x, tensors: str):
    if x is None:
        return None
    if tensors == "pt":
        import torch

        if isinstance(x, torch.Tensor):
            return x
        return torch.from_numpy(np.array(x))  # a copy: writable, owned
    return np.asarray(x)


def parse_binary(data: bytes, tensors: str = "np") -> Result:
    if tensors == "pt":
        t = dict(_bf16_to_torch(data))
        n = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
    else:
        t, meta = read_safetensors(data)
    offsets = [int(x) for x in t["input_row_offsets"]]
    b = len(offsets) - 1
    res = Result(SequenceResult(index=i, num_tokens=offsets[i + 1] - offsets[i]) for i in range(b))
    res.model = meta.get("model", "")
    layers = json.loads(meta.get("layers", "[]"))
    for kind in OUTPUT_KINDS:
        if kind.name in t:
            for seq, part in zip(res, _split(t[kind.name], t[kind.rows.offsets], kind.row_dim)):
                setattr(seq, kind.name, _to(part, tensors))
    if Rows.HIDDEN.offsets in t:
        for seq in res:
            seq.layers = layers
            if Rows.LOGIT.offsets not in t:  # /v1/hidden_states: its positions are the hidden rows'
                seq.positions = seq.hidden_positions
    return res


def parse_json(obj: dict, tensors: str = "np", body: dict | None = None) -> Result:
    body = body or {}
    res = Result()
    res.model = obj.get("model", "")
    hidden_endpoint = obj.get("object") == "hidden_states"
    for item in obj["data"]:
        n = item["num_tokens"]
        seq = SequenceResult(index=item["index"], num_tokens=n)
        for kind in OUTPUT_KINDS:
            value = _at(item, kind.json) if kind.json is not None else None
            if value is None:
                continue
            if kind.json_null is not None:  # numpy reads a null as NaN for floats only
                value = _fill_nulls(value, kind.json_null)
            setattr(seq, kind.name, _to(np.array(value, dtype=kind.dtype), tensors))
        if "hidden_states" in item:
            if hidden_endpoint:
                seq.hidden_positions, seq.layers = seq.positions, list(item["layers"])
            else:
                mode = body.get("return_hidden_states", "none")
                rows = range(n) if mode in ("all", "all_normalized") else range(n - 1, n)
                seq.hidden_positions = _to(np.array(list(rows), dtype=np.int64), tensors)
                seq.layers = []  # the JSON of /v1/logits does not name them (the binary metadata does)
        res.append(seq)
    return res


def _at(item: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(item, dict) or key not in item:
            return None
        item = item[key]
    return item


def _fill_nulls(value, null):
    """JSON nulls (no next token) of an integer output as its missing value."""
    if isinstance(value, list):
        return [_fill_nulls(v, null) for v in value]
    return null if value is None else value


def decode_embeddings(obj: dict, tensors: str = "np"):
    rows = sorted(obj["data"], key=lambda d: d["index"])
    vecs = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") if isinstance(d["embedding"], str)
            else np.array(d["embedding"], dtype=np.float32) for d in rows]
    arr = np.stack(vecs) if vecs else np.zeros((0, 0), np.float32)
    return _to(arr, tensors)


# ------------------------------------------------------------------------------------------------ requests


def _inputs(inputs, input_ids, messages=None, add_generation_prompt=False) -> dict:
    if sum(x is not None for x in (inputs, input_ids, messages)) != 1:
        raise ValueError("pass exactly one of inputs, input_ids and messages")
    if messages is not None:
        if messages and isinstance(messages[0], dict):  # one conversation
            messages = [messages]
        return {"messages": messages, "add_generation_prompt": add_generation_prompt}
    if input_ids is not None:
        if hasattr(input_ids, "tolist"):
            input_ids = input_ids.tolist()
        if input_ids and isinstance(input_ids[0], int):
            input_ids = [input_ids]
        return {"input_ids": [list(map(int, s)) for s in input_ids]}
    return {"inputs": inputs}


def _plain(value):
    """A request field's value as JSON takes it (numpy and torch integers, arrays of ids as lists of ints)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return value


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _Base:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0,
                 tensors: str = "np"):
        if tensors not in ("np", "pt"):
            raise ValueError("tensors is 'np' (numpy) or 'pt' (torch)")
        self.base_url = base_url.rstrip("/")
        self.tensors = tensors
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout

    # Each call is (method, path, json body, parse(response) -> value).
    @staticmethod
    def _check(r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise LogitserveError(r.status_code, err.get("type", ""), err.get("message", ""), err.get("param"))
            except (ValueError, KeyError, TypeError):
                raise LogitserveError(r.status_code, "http_error", r.text) from None
        return r

    def _score(self, path: str, body: dict, binary: bool):
        headers = {"accept": SAFETENSORS} if binary else {"accept": "application/json"}

        def parse(r: httpx.Response) -> Result:
            self._check(r)
            if r.headers.get("content-type", "").startswith(SAFETENSORS):
                res = parse_binary(r.content, self.tensors)
            else:
                res = parse_json(r.json(), self.tensors, body)
            for attr, h in (("queue_ms", "x-queue-time"), ("inference_ms", "x-inference-time")):
                if h in r.headers:
                    setattr(res, attr, float(r.headers[h]))
            return res

        return "POST", path, body, headers, parse

    def _logits_call(self, inputs=None, input_ids=None, *, return_logits="last_token", return_n_logits=1,
                     dtype="float32", add_special_tokens=True, messages=None, add_generation_prompt=False, binary=True,
                     **outputs):
        """`outputs`: the request fields that ask for outputs (OUTPUT_REQUEST_FIELDS: logits, target_logprobs, top_k,
        vocab_ids, ...), sent as given; the server's defaults apply to the others."""
        unknown = sorted(set(outputs) - set(OUTPUT_REQUEST_FIELDS))
        if unknown:
            raise TypeError(f"logits() got unexpected arguments {unknown}; outputs: {', '.join(OUTPUT_REQUEST_FIELDS)}")
        body = {**_inputs(inputs, input_ids, messages, add_generation_prompt), "return_logits": return_logits,
                "return_n_logits": return_n_logits, "dtype": dtype,
                **{name: _plain(value) for name, value in outputs.items() if value is not None}}
        if inputs is not None:
            body["add_special_tokens"] = add_special_tokens
        return self._score("/v1/logits", body, binary)

    def _hidden_call(self, inputs=None, input_ids=None, *, return_hidden_states="last", layers=(-1,), dtype="float32",
                     add_special_tokens=True, messages=None, add_generation_prompt=False, binary=True):
        body = {**_inputs(inputs, input_ids, messages, add_generation_prompt),
                "return_hidden_states": return_hidden_states, "layers": list(layers), "dtype": dtype}
        if inputs is not None:
            body["add_special_tokens"] = add_special_tokens
        return self._score("/v1/hidden_states", body, binary)

    def _embeddings_call(self, input, *, binary=True, model=None, dimensions=None):
        body = _drop_none({"input": input, "model": model, "encoding_format": "base64" if binary else "float",
                           "dimensions": dimensions})

        def parse(r):
            return decode_embeddings(self._check(r).json(), self.tensors)

        return "POST", "/v1/embeddings", body, {}, parse

    def _score_call(self, query, items, label_token_ids, *, apply_softmax=False, item_first=False):
        body = {"query": query if isinstance(query, str) else [int(t) for t in query], "items": items,
                "label_token_ids": [int(t) for t in label_token_ids], "apply_softmax": apply_softmax,
                "item_first": item_first}
        return "POST", "/v1/score", body, {}, lambda r: np.array(self._check(r).json()["scores"], dtype=np.float64)

    def _rerank_call(self, query, documents, *, top_n=None, return_documents=True, instruction=None,
                     use_activation=True):
        body = _drop_none({"query": query, "documents": list(documents), "top_n": top_n,
                           "return_documents": return_documents, "instruction": instruction,
                           "use_activation": use_activation})
        return "POST", "/v1/rerank", body, {}, lambda r: self._check(r).json()["results"]

    def _classify_call(self, input=None, *, messages=None, add_generation_prompt=False, use_activation=True):
        if (input is None) == (messages is None):
            raise ValueError("pass exactly one of input and messages")
        body = _drop_none({"input": input, "messages": messages, "use_activation": use_activation})
        if messages is not None:
            body["add_generation_prompt"] = add_generation_prompt
        return "POST", "/v1/classify", body, {}, lambda r: self._check(r).json()["data"]

    def _completions_call(self, prompt, **kwargs):
        return "POST", "/v1/completions", {"prompt": prompt, **kwargs}, {}, lambda r: self._check(r).json()

    def _json_call(self, method, path, body=None, key=None):
        def parse(r):
            obj = self._check(r).json()
            return obj[key] if key else obj

        return method, path, body, {}, parse


_DOC_METHODS = """
    logits(inputs=None, input_ids=None, *, messages, add_generation_prompt, return_logits, return_n_logits, dtype,
           add_special_tokens, binary=True, **outputs) -> Result; outputs are the output kinds' request fields:
           """ + ", ".join(OUTPUT_REQUEST_FIELDS) + """
    hidden_states(inputs=None, input_ids=None, *, messages, add_generation_prompt, return_hidden_states, layers, dtype,
                  binary=True) -> Result
    embeddings(input, *, binary=True, dimensions=None) -> array [B, dimensions or hidden]
    score(query, items, label_token_ids, *, apply_softmax, item_first) -> array [items, labels] (/v1/score)
    rerank(query, documents, *, top_n, return_documents, instruction, use_activation) -> list of results, best first
    classify(input=None, *, messages, add_generation_prompt, use_activation) -> list of {label, probs, logits, ...}
    completions(prompt, **openai_fields) -> dict (the OpenAI response)
    tokenize(text, add_special_tokens=True) -> list[int]; detokenize(ids) -> str; tokenizer_info() -> dict
    health(), ready(), info(), models() -> dict; metrics() -> str
"""


class Client(_Base):
    __doc__ = "Synchronous client." + _DOC_METHODS

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0,
                 tensors: str = "np", http: httpx.Client | None = None):
        super().__init__(base_url, api_key, timeout, tensors)
        self.http = http or httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout)

    def _send(self, call):
        method, path, body, headers, parse = call
        return parse(self.http.request(method, path, json=body, headers=headers))

    def logits(self, inputs=None, input_ids=None, **kw) -> Result:
        return self._send(self._logits_call(inputs, input_ids, **kw))

    def hidden_states(self, inputs=None, input_ids=None, **kw) -> Result:
        return self._send(self._hidden_call(inputs, input_ids, **kw))

    def embeddings(self, input, **kw):
        return self._send(self._embeddings_call(input, **kw))

    def completions(self, prompt, **kw) -> dict:
        return self._send(self._completions_call(prompt, **kw))

    def score(self, query, items, label_token_ids, **kw) -> np.ndarray:
        return self._send(self._score_call(query, items, label_token_ids, **kw))

    def rerank(self, query: str, documents, **kw) -> list[dict]:
        return self._send(self._rerank_call(query, documents, **kw))

    def classify(self, input=None, **kw) -> list[dict]:
        return self._send(self._classify_call(input, **kw))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._send(self._json_call("POST", "/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens},
                                          "tokens"))

    def detokenize(self, ids) -> str:
        return self._send(self._json_call("POST", "/detokenize", {"tokens": [int(t) for t in ids]}, "prompt"))

    def tokenizer_info(self) -> dict:
        return self._send(self._json_call("GET", "/tokenizer_info"))

    def health(self) -> dict:
        return self._send(self._json_call("GET", "/health"))

    def ready(self) -> dict:
        return self._send(self._json_call("GET", "/ready"))

    def info(self) -> dict:
        return self._send(self._json_call("GET", "/info"))

    def models(self) -> dict:
        return self._send(self._json_call("GET", "/v1/models"))

    def metrics(self) -> str:
        return self._check(self.http.get("/metrics")).text

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    __doc__ = "Asynchronous client: the same methods as Client, awaitable." + _DOC_METHODS

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0,
                 tensors: str = "np", http: httpx.AsyncClient | None = None):
        super().__init__(base_url, api_key, timeout, tensors)
        self.http = http or httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=timeout)

    async def _send(self, call):
        method, path, body, headers, parse = call
        return parse(await self.http.request(method, path, json=body, headers=headers))

    async def logits(self, inputs=None, input_ids=None, **kw) -> Result:
        return await self._send(self._logits_call(inputs, input_ids, **kw))

    async def hidden_states(self, inputs=None, input_ids=None, **kw) -> Result:
        return await self._send(self._hidden_call(inputs, input_ids, **kw))

    async def embeddings(self, input, **kw):
        return await self._send(self._embeddings_call(input, **kw))

    async def completions(self, prompt, **kw) -> dict:
        return await self._send(self._completions_call(prompt, **kw))

    async def score(self, query, items, label_token_ids, **kw) -> np.ndarray:
        return await self._send(self._score_call(query, items, label_token_ids, **kw))

    async def rerank(self, query: str, documents, **kw) -> list[dict]:
        return await self._send(self._rerank_call(query, documents, **kw))

    async def classify(self, input=None, **kw) -> list[dict]:
        return await self._send(self._classify_call(input, **kw))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._send(self._json_call("POST", "/tokenize",
                                                {"prompt": text, "add_special_tokens": add_special_tokens}, "tokens"))

    async def detokenize(self, ids) -> str:
        return await self._send(self._json_call("POST", "/detokenize", {"tokens": [int(t) for t in ids]}, "prompt"))

    async def tokenizer_info(self) -> dict:
        return await self._send(self._json_call("GET", "/tokenizer_info"))

    async def health(self) -> dict:
        return await self._send(self._json_call("GET", "/health"))

    async def ready(self) -> dict:
        return await self._send(self._json_call("GET", "/ready"))

    async def info(self) -> dict:
        return await self._send(self._json_call("GET", "/info"))

    async def models(self) -> dict:
        return await self._send(self._json_call("GET", "/v1/models"))

    async def metrics(self) -> str:
        return self._check(await self.http.get("/metrics")).text

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


__all__ = ["Client", "AsyncClient", "SequenceResult", "Result", "LogitserveError", "read_safetensors"]
