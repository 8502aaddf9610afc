"""Request bodies, and the response bodies' documentation. `/v1/logits` and `/v1/hidden_states` refuse unknown
fields; `model` is accepted and ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from .inputs import RequestInputs

DType = Literal["float32", "float16", "bfloat16"]
# A conversation: messages as chat templates read them ({"role": ..., "content": ...} and whatever else a template
# reads: tool calls, reasoning); the template is the judge of what it accepts.
Conversation = list[dict[str, Any]]
MAX_VOCAB_IDS = 1024  # vocab_ids per request (label sets, classification by LM)


class ScoringInputs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    input_ids: list[list[StrictInt]] | None = None
    inputs: str | list[str] | None = None
    add_special_tokens: StrictBool = True
    messages: list[Conversation] | None = None
    add_generation_prompt: StrictBool = False
    dtype: DType = "float32"

    def sent(self) -> RequestInputs:
        texts = [self.inputs] if isinstance(self.inputs, str) else self.inputs
        return RequestInputs(token_ids=self.input_ids, texts=texts, add_special_tokens=self.add_special_tokens,
                             conversations=self.messages, add_generation_prompt=self.add_generation_prompt)


class LogitsRequest(ScoringInputs):
    return_logits: Literal["last_token", "all", "variable"] = "last_token"
    return_n_logits: StrictInt = Field(1, ge=1)
    logits: StrictBool = True
    target_logprobs: StrictBool = False
    top_k: StrictInt = Field(0, ge=0, le=100)
    vocab_ids: list[StrictInt] | None = Field(None, min_length=1, max_length=MAX_VOCAB_IDS)
    target_ranks: StrictBool = False
    entropy: StrictBool = False
    return_hidden_states: Literal["none", "last", "all", "last_normalized", "all_normalized"] = "none"


class HiddenStatesRequest(ScoringInputs):
    return_hidden_states: Literal["last", "all", "last_normalized", "all_normalized"] = "last"
    layers: list[StrictInt] = Field(default_factory=lambda: [-1], min_length=1)


Prompt = str | list[str] | list[list[StrictInt]] | list[StrictInt]


class CompletionRequest(BaseModel):
    """OpenAI legacy completions; fields it does not use (seed, stop, user, ...) are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    prompt: Prompt
    max_tokens: StrictInt | None = Field(0, ge=0)
    echo: StrictBool | None = False
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    temperature: float | None = None
    n: StrictInt | None = Field(1, ge=1)
    best_of: StrictInt | None = Field(None, ge=1)
    stream: StrictBool | None = False
    suffix: str | None = None
    add_special_tokens: StrictBool = True  # an extension (vLLM's name): BOS for string prompts


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    add_special_tokens: StrictBool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: StrictBool = True
    # vLLM's chat form: one conversation rendered with the checkpoint's chat template, instead of `prompt`
    messages: list[dict] | None = None
    add_generation_prompt: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    tokens: list[StrictInt]


# ------------------------------------------------------------------------------------------------ responses
# Documentation only (the routes build their bodies directly): these models put every response body, error
# status and content type into /openapi.json, so that schema conformance can be checked against it.


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class TopK(BaseModel):
    ids: list[list[int]]
    logprobs: list[list[float]]


class LogitsItem(BaseModel):
    index: int
    num_tokens: int
    positions: list[int]
    logits: list[list[float]] = None  # type: ignore[assignment]  (left out when not asked for)
    target_logprobs: list[float | None] = None  # type: ignore[assignment]
    top_k: TopK = None  # type: ignore[assignment]
    vocab_logprobs: list[list[float]] = None  # type: ignore[assignment]
    target_ranks: list[int | None] = None  # type: ignore[assignment]
    entropy: list[float] = None  # type: ignore[assignment]
    hidden_states: list[list[list[float]]] = None  # type: ignore[assignment]


class LogitsResponse(BaseModel):
    object: Literal["logits"]
    model: str
    data: list[LogitsItem]
    usage: Usage


class HiddenStatesItem(BaseModel):
    index: int
    num_tokens: int
    positions: list[int]
    layers: list[int]
    hidden_states: list[list[list[float]]]


class HiddenStatesResponse(BaseModel):
    object: Literal["hidden_states"]
    model: str
    data: list[HiddenStatesItem]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str


class CompletionUsage(Usage):
    completion_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    model_max_length: int
    vocab_size: int
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    pad_token: str | None
    pad_token_id: int | None


class StatusResponse(BaseModel):
    status: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelsResponse(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class InfoResponse(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    model_path: str
    version: str
    config: dict
    tokenizer: bool
    tp: int
    replicas: int
    device: str
    dtype: str
    batch_invariant: bool
    limits: dict
    pooling: str
    prefix_sharing: bool
    prefix_cache_bytes: int
    workers: list[dict]


_ERROR_DESCRIPTIONS = {
    400: "unsupported option, or a Host header outside --allowed-hosts", 401: "missing or wrong API key",
    408: "the request's body did not arrive within the body timeout",
    413: "body larger than --max-request-bytes, or a request larger than the whole queue (--max-queue-tokens)",
    415: "a body not sent as Content-Type: application/json", 422: "invalid input", 429: "queue full (Retry-After)", 503: "not ready, draining or a worker failed (Retry-After)",
    504: "no result within --request-timeout",
}
SCORING_ERRORS = (400, 401, 408, 413, 415, 422, 429, 503, 504)
TOKENIZER_ERRORS = (400, 401, 408, 413, 415, 422)


def responses(ok: type[BaseModel] | None, *errors: int, binary: bool = False, text: bool = False) -> dict:
    """`responses=` for a route: its 200 body (JSON, optionally safetensors or plain text) and its error statuses."""
    out: dict = {}
    if text:
        out[200] = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    elif ok is not None:
        out[200] = {"model": ok, "description": "OK"}
        if binary:
            out[200]["content"] = {SAFETENSORS_MEDIA: {"schema": {"type": "string", "format": "binary"}}}
    for code in errors:
        out[code] = {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]}
    return out


SAFETENSORS_MEDIA = "application/x-safetensors"


# ------------------------------------------------------------------------------------------ labels and ranking


class ScoreRequest(BaseModel):
    """SGLang's /v1/score: label probabilities at the last position of each query + item prompt."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    query: str | list[StrictInt]
    items: str | list[str] | list[list[StrictInt]]
    label_token_ids: list[StrictInt] = Field(min_length=1, max_length=MAX_VOCAB_IDS)
    apply_softmax: StrictBool = False
    item_first: StrictBool = False


class RerankRequest(BaseModel):
    """Cohere / Jina / vLLM rerank; fields it does not use (max_tokens_per_doc, ...) are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    query: str
    documents: list[str]
    top_n: StrictInt | None = Field(None, ge=0)
    return_documents: StrictBool = True
    instruction: str | None = None
    use_activation: StrictBool = True


class ClassifyRequest(BaseModel):
    """vLLM's /classify: `input` (as OpenAI's prompt) or chat `messages`."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    input: Prompt | None = None
    messages: list[Conversation] | None = None
    add_generation_prompt: StrictBool = False
    add_special_tokens: StrictBool = True
    use_activation: StrictBool = True


class ScoreUsage(Usage):
    completion_tokens: int


class ScoreResponse(BaseModel):
    object: Literal["scoring"]
    model: str
    scores: list[list[float]]
    usage: ScoreUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument = None  # type: ignore[assignment]  (left out with return_documents false)


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: Usage
    results: list[RerankResult]


class ClassifyItem(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int
    logits: list[float]


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[ClassifyItem]
    usage: Usage
