"""Scoring rows of an Arrow table: each chunk of rows is one request to the in-process server (`/v1/logits` in
safetensors for the log-probability outputs, `/v1/embeddings`, `/v1/classify`, `/v1/hidden_states`), so every
number is what the server answers for the same sequence. The output columns are derived from those answers.

Shared by `score-dataset` (score_dataset.py) and the Ray Data actors (ray_scorer.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import orjson
import pyarrow as pa

from .inprocess import SAFETENSORS, InProcessServer

# Outputs from /v1/logits (all rows, no logits): the next-token distribution at every position.
LOGPROB_OUTPUTS = ("num_tokens", "sum_logprob", "perplexity", "token_logprobs", "top_k", "target_ranks", "entropy")
OUTPUTS = (*LOGPROB_OUTPUTS, "embedding", "scores", "hidden_states")
DEFAULT_OUTPUTS = ("num_tokens", "sum_logprob", "perplexity")
DEFAULT_TOP_K = 5
# The error column: why a row could not be scored (its outputs are null); null for the rows scored.
ERROR_COLUMN = "error"


class ScoreSetupError(ValueError):
    """Options that cannot run (an unknown output, a column that is missing or of the wrong type)."""


@dataclass(frozen=True)
class ScoreOptions:
    column: str = "text"
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    top_k: int = DEFAULT_TOP_K
    rows_per_request: int = 32  # rows sent in one request; the batcher packs requests into batches

    @classmethod
    def parse_outputs(cls, text: str) -> tuple[tuple[str, ...], int]:
        """`--outputs num_tokens,perplexity,top_k=20` -> (outputs, k)."""
        outputs, k = [], DEFAULT_TOP_K
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in OUTPUTS:
                raise ScoreSetupError(f"--outputs: unknown output {name!r}; known: {', '.join(OUTPUTS)}")
            if value:
                if name != "top_k" or not value.isdigit() or not 1 <= int(value) <= 100:
                    raise ScoreSetupError(f"--outputs: {item!r}: only top_k takes a value, an integer 1..100")
                k = int(value)
            outputs.append(name)
        if not outputs:
            raise ScoreSetupError("--outputs: name at least one output")
        return tuple(dict.fromkeys(outputs)), k


def input_kind(schema: pa.Schema, column: str) -> str:
    """Which request field a column feeds: `inputs` (text), `input_ids` (token ids) or `messages`."""
    if column not in schema.names:
        raise ScoreSetupError(f"--column {column!r}: the input has no such column (it has {', '.join(schema.names)})")
    kind = schema.field(column).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "inputs"
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type):
        return "input_ids"
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type):
        return "messages"
    raise ScoreSetupError(f"--column {column!r} is {kind}: give a text, token-id list or messages column")


def check_options(server: InProcessServer, options: ScoreOptions, kind: str) -> None:
    task = server.served.task
    if task != "causal-lm" and set(options.outputs) & set(LOGPROB_OUTPUTS):
        asked = ", ".join(sorted(set(options.outputs) & set(LOGPROB_OUTPUTS)))
        raise ScoreSetupError(f"--outputs {asked} need a causal LM; this model is a classifier (ask for scores)")
    if task == "causal-lm" and "scores" in options.outputs:
        raise ScoreSetupError("--outputs scores needs a classifier or reward model (*ForSequenceClassification)")
    if kind == "messages" and "embedding" in options.outputs:
        raise ScoreSetupError("--outputs embedding takes a text or token-id column (/v1/embeddings has no messages)")


@dataclass
class ScoredRows:
    """Output columns of a table's rows, and the tensors too large for a column (hidden states of every token)."""

    columns: dict[str, pa.Array]
    tensors: dict[int, np.ndarray] = field(default_factory=dict)  # row index in the table -> [tokens, hidden]


@dataclass
class _Chunk:
    """One request's answers, per row (None where the row failed)."""

    values: dict[str, list]
    errors: list[str | None]
    tensors: list[np.ndarray | None]


def _inputs_field(kind: str, route: str) -> str:
    if route in ("/v1/embeddings", "/v1/classify"):
        return "messages" if kind == "messages" else "input"
    return kind


def _requests(options: ScoreOptions, kind: str) -> list[tuple[str, dict, str]]:
    """(route, body fields, accept) of each request a chunk of rows needs."""
    asked = set(options.outputs)
    out = []
    if asked & set(LOGPROB_OUTPUTS):
        body = {"return_logits": "all", "logits": False}
        if asked & {"sum_logprob", "perplexity", "token_logprobs"}:
            body["target_logprobs"] = True
        if "top_k" in asked:
            body["top_k"] = options.top_k
        if "target_ranks" in asked:
            body["target_ranks"] = True
        if "entropy" in asked:
            body["entropy"] = True
        if len(body) == 2:  # num_tokens alone: the last row, nothing computed on it
            body["return_logits"] = "last_token"
        out.append(("/v1/logits", body, SAFETENSORS))
    if "embedding" in asked:
        out.append(("/v1/embeddings", {}, "application/json"))
    if "scores" in asked:
        out.append(("/v1/classify", {"use_activation": False}, "application/json"))
    if "hidden_states" in asked:
        out.append(("/v1/hidden_states", {"return_hidden_states": "all", "layers": [-1]}, SAFETENSORS))
    return out


def _split(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _logprob_values(tensors: dict[str, np.ndarray], options: ScoreOptions) -> dict[str, list]:
    asked = set(options.outputs)
    lengths = np.diff(tensors["input_row_offsets"]).tolist()
    values: dict[str, list] = {}
    if "num_tokens" in asked:
        values["num_tokens"] = lengths
    offsets = tensors["logit_offsets"]
    if "target_logprobs" in tensors:
        # Row p holds log p(token p+1); the last row has no next token.
        per_row = [v[:-1] for v in _split(tensors["target_logprobs"], offsets)]
        sums = [float(np.sum(v, dtype=np.float64)) for v in per_row]
        if "sum_logprob" in asked:
            values["sum_logprob"] = sums
        if "perplexity" in asked:
            values["perplexity"] = [float(np.exp(-s / len(v))) if len(v) else None for s, v in zip(sums, per_row)]
        if "token_logprobs" in asked:
            values["token_logprobs"] = per_row
    if "top_k" in asked:
        values["top_k_ids"] = _split(tensors["top_k_ids"], offsets)
        values["top_k_logprobs"] = _split(tensors["top_k_logprobs"], offsets)
    if "target_ranks" in asked:
        values["target_ranks"] = [v[:-1] for v in _split(tensors["target_ranks"], offsets)]
    if "entropy" in asked:
        values["entropy"] = _split(tensors["entropy"], offsets)
    return values


def _decode(route: str, answer, options: ScoreOptions) -> tuple[dict[str, list], list[np.ndarray] | None]:
    if route == "/v1/logits":
        from safetensors.numpy import load

        return _logprob_values(load(answer.content), options), None
    if route == "/v1/hidden_states":
        from safetensors.numpy import load

        tensors = load(answer.content)
        return {}, _split(tensors["hidden_states"][0], tensors["hidden_offsets"])  # [L=1, Rh, hidden] -> per row
    data = orjson.loads(answer.content)["data"]
    if route == "/v1/embeddings":
        return {"embedding": [np.asarray(d["embedding"], dtype=np.float32) for d in data]}, None
    return {"scores": [np.asarray(d["logits"], dtype=np.float32) for d in data]}, None


def _error_message(answer) -> str:
    try:
        return f"{answer.status_code}: {orjson.loads(answer.content)['error']['message']}"
    except Exception:  # noqa: BLE001 - any body: its text
        return f"{answer.status_code}: {answer.content[:500].decode(errors='replace')}"


async def _score_chunk(server: InProcessServer, rows: list, kind: str, options: ScoreOptions) -> _Chunk:
    """All requests of one chunk of rows. A refused chunk is retried row by row, so that one bad row (empty, too
    long) marks only itself."""
    values: dict[str, list] = {}
    tensors = None
    for route, fields, accept in _requests(options, kind):
        body = orjson.dumps({_inputs_field(kind, route): rows, **fields})
        answer = await server.post(route, body, accept)
        if answer.status_code != 200:
            if len(rows) == 1:
                return _Chunk({}, [_error_message(answer)], [None])
            parts = await asyncio.gather(*(_score_chunk(server, [row], kind, options) for row in rows))
            return _Chunk({name: [p.values.get(name, [None])[0] for p in parts] for name in _columns(options)},
                          [p.errors[0] for p in parts], [p.tensors[0] for p in parts])
        got, hidden = _decode(route, answer, options)
        values.update(got)
        tensors = hidden if hidden is not None else tensors
    return _Chunk(values, [None] * len(rows), tensors or [None] * len(rows))


def _columns(options: ScoreOptions) -> list[str]:
    names = []
    for name in options.outputs:
        names += {"top_k": ["top_k_ids", "top_k_logprobs"], "hidden_states": []}.get(name, [name])
    return names


_TYPES = {
    "num_tokens": pa.int64(), "sum_logprob": pa.float64(), "perplexity": pa.float64(),
    "token_logprobs": pa.list_(pa.float32()), "top_k_ids": pa.list_(pa.list_(pa.int64())),
    "top_k_logprobs": pa.list_(pa.list_(pa.float32())), "target_ranks": pa.list_(pa.int64()),
    "entropy": pa.list_(pa.float32()), "embedding": pa.list_(pa.float32()), "scores": pa.list_(pa.float32()),
}


def _arrow(name: str, values: list) -> pa.Array:
    kind = _TYPES[name]
    if pa.types.is_list(kind) and pa.types.is_list(kind.value_type):
        values = [None if v is None else list(v) for v in values]  # 2-D arrays: one list per row
    return pa.array(values, type=kind)


async def score_table(server: InProcessServer, table: pa.Table, options: ScoreOptions,
                      limit: asyncio.Semaphore | None = None) -> ScoredRows:
    """Output columns for every row of `table`, in its order; chunks of rows go to the server concurrently (at
    most `limit`'s count at once)."""
    kind = input_kind(table.schema, options.column)
    rows = table.column(options.column).to_pylist()
    limit = limit or asyncio.Semaphore(8)
    step = options.rows_per_request

    async def chunk(start: int) -> _Chunk:
        async with limit:
            return await _score_chunk(server, rows[start : start + step], kind, options)

    chunks = await asyncio.gather(*(chunk(s) for s in range(0, len(rows), step)))
    names = _columns(options)
    columns = {name: _arrow(name, [v for c in chunks for v in c.values.get(name, [None] * len(c.errors))])
               for name in names}
    columns[ERROR_COLUMN] = pa.array([e for c in chunks for e in c.errors], type=pa.string())
    tensors = {}
    if "hidden_states" in options.outputs:
        tensors = {i: t for i, t in enumerate(t for c in chunks for t in c.tensors) if t is not None}
    return ScoredRows(columns, tensors)
