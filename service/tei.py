"""Hugging Face text-embeddings-inference (TEI) as its clients see it: the request bodies of its routes (field for
field as its router's types declare them) and its error body `{"error": ..., "error_type": ...}` with its status
codes (router/src/http/server.rs: validation and tokenizer 422, empty 400, backend 424, overloaded 429,
unhealthy 503). The routes are in routes/tei.py."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.responses import Response

from .errors import (
    DEFAULT_RETRY_AFTER,
    InvalidInput,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnsupportedOption,
    WorkerFailed,
    status_of,
)
from .deps import parse_body
from .schemas import TruncationFields


class TeiError(ServiceError):
    """An error TEI names itself: its status and error_type."""

    def __init__(self, message: str, status: int, error_type: str):
        super().__init__(message)
        self.status, self.error_type = status, error_type


def empty(field: str) -> TeiError:
    return TeiError(f"`{field}` cannot be empty", 400, "empty")


def wrong_model(message: str) -> TeiError:
    """TEI answers a route the model does not serve (embed on a classifier, rerank on an embedding model) with
    424 and error_type backend."""
    return TeiError(message, 424, "backend")


def tokenizer_error(message: str) -> TeiError:
    return TeiError(message, 422, "tokenizer")


# Our errors in TEI's terms: (status, error_type). TEI has no type of its own for a missing key or a too-large
# body: those keep our status with the nearest type.
_TEI_TYPES: list[tuple[type[ServiceError], int | None, str]] = [
    (UnsupportedOption, 422, "validation"),
    (InvalidInput, 422, "validation"),
    (QueueFull, 429, "overloaded"),
    (NotReady, 503, "unhealthy"),
    (WorkerFailed, 503, "unhealthy"),
    (RequestTimeout, None, "backend"),
    (PayloadTooLarge, 413, "validation"),
    (Unauthorized, 401, "validation"),
]


def tei_error_response(exc: ServiceError) -> Response:
    if isinstance(exc, TeiError):
        status, error_type = exc.status, exc.error_type
    else:
        status, error_type = status_of(exc)[0], "backend"
        for cls, tei_status, tei_type in _TEI_TYPES:
            if isinstance(exc, cls):
                status, error_type = tei_status or status, tei_type
                break
    headers = {}
    retry = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER.get(status)
    if retry is not None:
        headers["Retry-After"] = str(max(1, int(round(retry))))
    body = orjson.dumps({"error": exc.message, "error_type": error_type})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


# ------------------------------------------------------------------------------------------------ requests
# TEI's inputs: a string, token ids, or a list of either (`Input`); extra fields are ignored, as serde does.

TeiInput = str | list[StrictInt] | list[str | list[StrictInt]]


class TeiRequest(TruncationFields):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    # huggingface_hub's InferenceClient sends its options under `parameters`; they are read as top-level fields
    parameters: dict[str, Any] | None = None


class EmbedRequest(TeiRequest):
    inputs: TeiInput
    prompt_name: str | None = None
    normalize: StrictBool = True
    dimensions: StrictInt | None = Field(None, ge=1)


class EmbedAllRequest(TeiRequest):
    inputs: TeiInput
    prompt_name: str | None = None


class PredictRequest(TeiRequest):
    # a text, a pair [text, text], or a batch of [text] and [text, text]
    inputs: str | list[str] | list[list[str]]
    raw_scores: StrictBool = False


class RerankRequest(TeiRequest):
    query: str
    texts: list[str]
    raw_scores: StrictBool = False
    return_text: StrictBool = False


class SimilarityInput(BaseModel):
    source_sentence: str
    sentences: list[str]


class SimilarityRequest(TeiRequest):
    inputs: SimilarityInput
    prompt_name: str | None = None  # TEI's parameters.prompt_name


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    inputs: str | list[str]
    add_special_tokens: StrictBool = True
    prompt_name: str | None = None


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    ids: list[StrictInt] | list[list[StrictInt]]
    skip_special_tokens: StrictBool = True


def merged_parameters(obj: dict) -> dict:
    """A TEI body with InferenceClient's `parameters` lifted to the top level (top-level fields win)."""
    params = obj.get("parameters")
    if isinstance(params, dict):
        return {**{k: v for k, v in params.items() if v is not None}, **{k: v for k, v in obj.items()
                                                                         if k != "parameters"}}
    return obj


def parse_tei(cls: type[BaseModel], body: bytes) -> BaseModel:
    return parse_body(cls, body, merged_parameters)


def tei_tokens(served: ServedModel, texts: list[str], add_special_tokens: bool) -> list[list[dict]]:
    """TEI's tokens of each text: id, text, special, and for a text token its byte span in the input."""
    out = []
    for text, encoding in zip(texts, served.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)):
        tokens = []
        for tid, (start, stop), special, piece in zip(encoding.ids, encoding.offsets, encoding.special_tokens_mask,
                                                      encoding.tokens):
            if special:
                tokens.append({"id": tid, "text": piece, "special": True, "start": None, "stop": None})
            else:
                # TEI reports byte offsets (Rust strings); the tokenizers binding gives character offsets
                b0, b1 = len(text[:start].encode()), len(text[:stop].encode())
                tokens.append({"id": tid, "text": text[start:stop], "special": False, "start": b0, "stop": b1})
        out.append(tokens)
    return out
