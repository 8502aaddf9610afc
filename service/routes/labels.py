"""Label scoring, reranking and classification: `POST /v1/score` (SGLang), `POST /v1/rerank` and `/v2/rerank`
(Cohere / Jina / vLLM), `POST /v1/classify` (vLLM).

Each is one request to the engine (every prompt of the request a sequence of it, so one forward per batch) with an
`OutputSpec` of last-token rows:

- score: the labels' log-softmax over the whole vocabulary (`vocab_ids`); exp gives their probabilities, and
  `apply_softmax`'s softmax over the labels' logits is the softmax of those log-probabilities (the log-sum-exp
  cancels);
- rerank: the reranker's label logits (a prompt reranker's yes/no columns of the last row, a classifier's head
  output), turned into a raw score by the reranker (service/rerankers.py), then the sigmoid;
- classify: the classifier head's outputs at the pooled token.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass

import numpy as np
import orjson
import torch
from fastapi import APIRouter, Request
from starlette.responses import Response

from model.runtime.outputs import LOGITS, VOCAB_LOGPROBS, OutputSpec
from model.task import Task

from ..deps import (
    Authorized,
    Body,
    EngineDep,
    ServedDep,
    TokenizingDep,
    WorkersAccepting,
    json_body,
    parse_body,
    request_body,
)
from ..embeddings import cosine, embed
from ..errors import InvalidInput, UnsupportedOption
from ..inputs import InputFields, RequestInputs, Truncation, prompt_inputs
from ..tokenizing import TokenizingPool, text_chars
from ..responses import json_response
from ..schemas import (
    SCORING_ERRORS,
    ClassifyRequest,
    ClassifyResponse,
    PAIR_FIELDS,
    PairScoreRequest,
    PairScoreResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    responses,
)
from ..rerankers import relevance_scores
from ..served import ServedModel
from .metered import WorkRoute

router = APIRouter(route_class=WorkRoute, dependencies=[Authorized, WorkersAccepting])

RerankBody = json_body(RerankRequest)
ClassifyBody = json_body(ClassifyRequest)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


# ------------------------------------------------------------------------------------------------- /v1/score


def score_prompts(served: ServedModel, req: ScoreRequest) -> list[list[int]]:
    """Token ids of each prompt: query + item (item + query with item_first), the first part encoded with the
    tokenizer's special tokens, the second without."""
    items = [req.items] if isinstance(req.items, str) else req.items
    text_query = isinstance(req.query, str)
    if any(isinstance(item, str) != text_query for item in items):
        kind = "a string" if text_query else "token ids"
        raise InvalidInput(f"items must be of the query's type ({kind}): mixed text and token ids", param="items")
    if not text_query:
        return [list(item) + list(req.query) if req.item_first else list(req.query) + list(item) for item in items]
    if served.tokenizer is None:
        raise UnsupportedOption("this model has no tokenizer.json: send query and items as token ids", param="query")
    tok = served.tokenizer
    if req.item_first:
        firsts = [e.ids for e in tok.encode_batch(items, add_special_tokens=True)]
        second = tok.encode(req.query, add_special_tokens=False).ids
        return [first + second for first in firsts]
    first = tok.encode(req.query, add_special_tokens=True).ids
    return [first + e.ids for e in tok.encode_batch(items, add_special_tokens=False)]


async def _label_scores(req: ScoreRequest, request: Request, served: ServedModel, engine,
                        tokenizing: TokenizingPool) -> Response:
    vocab = served.config.vocab_size
    outside = [i for i in req.label_token_ids if not 0 <= i < vocab]
    if outside:
        raise InvalidInput(f"label_token_ids: token id {outside[0]} is outside [0, {vocab})", param="label_token_ids")
    items = [req.items] if isinstance(req.items, str) else req.items
    tokenizing.check_chars(served.tokenizer, text_chars(req.query) * len(items) + text_chars(items), "items")
    prompts = await tokenizing.run(score_prompts, served, req)
    scores: list = []
    headers = None
    n = 0
    if prompts:
        inputs = await tokenizing.pack(served, RequestInputs(token_ids=prompts), InputFields("items", "items"))
        spec = OutputSpec(logits=False, vocab_ids=tuple(req.label_token_ids))
        with await engine.score(inputs, spec, request.receive) as scored:
            logprobs = scored.outputs[VOCAB_LOGPROBS]  # [items, labels]: one last-token row per prompt
            scores = _softmax(logprobs) if req.apply_softmax else np.exp(logprobs.astype(np.float64))
            headers, n = scored.timing_headers, inputs.num_tokens
    return json_response({"object": "scoring", "model": served.name, "scores": scores,
                          "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}}, headers=headers)


def pairs_of(req: PairScoreRequest) -> tuple[list[str], list[str]]:
    """vLLM's pairing: one first text against every second text, or the two lists pair by pair."""
    firsts, seconds = req.texts()
    firsts = [firsts] if isinstance(firsts, str) else list(firsts)
    seconds = [seconds] if isinstance(seconds, str) else list(seconds)
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise InvalidInput(f"the two sides have {len(firsts)} and {len(seconds)} texts: send one first text, or "
                           "as many as second texts", param=req.first_field())
    return firsts, seconds


async def _pair_scores(req: PairScoreRequest, request: Request, served: ServedModel, engine,
                       tokenizing: TokenizingPool) -> Response:
    """vLLM's /score: each pair's reranker score (what /v1/rerank gives it), or for a model served for embeddings
    the cosine of the two texts' embeddings."""
    firsts, seconds = pairs_of(req)
    truncation = req.truncation()
    scores: list[float] = []
    n, headers = 0, None
    if served.reranker is not None:
        # pairs that share their first text are one rerank call, so that the scores are /v1/rerank's own
        by_query: dict[str, list[int]] = {}
        for i, query in enumerate(firsts):
            by_query.setdefault(query, []).append(i)
        scores = [0.0] * len(firsts)
        for query, indices in by_query.items():
            reranked = await rerank_scores(served, engine, tokenizing, query, [seconds[i] for i in indices],
                                           request.receive, use_activation=req.activation_on(), truncation=truncation)
            for i, score in zip(indices, reranked.scores):
                scores[i] = score
            n += reranked.num_tokens
            headers = reranked.headers
    elif served.task == Task.CLASSIFICATION:
        raise UnsupportedOption("pair scoring needs a one-label classifier (a reranker), a causal LM under "
                                "--reranker, or a causal LM served for embeddings", param="model")
    elif firsts:
        texts = list(dict.fromkeys(firsts + seconds))  # each distinct text embedded once
        embedded = await embed(served, engine, tokenizing, RequestInputs(texts=texts, truncation=truncation),
                               request.receive, InputFields(req.first_field(), req.first_field()))
        vectors = dict(zip(texts, embedded.vectors))
        scores = [cosine(vectors[a], vectors[b]) for a, b in zip(firsts, seconds)]
        n, headers = embedded.inputs.num_tokens, embedded.headers
    data = [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)]
    return json_response({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                          "model": served.name, "data": data,
                          "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}}, headers=headers)


async def _score(body: bytes, request: Request, served: ServedModel, engine, tokenizing: TokenizingPool) -> Response:
    """The body decides: SGLang's label scoring (`label_token_ids`) or vLLM's pair scoring."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
    sglang = isinstance(raw, dict) and ("label_token_ids" in raw or "items" in raw)
    if isinstance(raw, dict) and not sglang and any(a in raw for a, _ in PAIR_FIELDS):
        return await _pair_scores(parse_body(PairScoreRequest, body), request, served, engine, tokenizing)
    return await _label_scores(parse_body(ScoreRequest, body), request, served, engine, tokenizing)


@router.post("/v1/score", openapi_extra=request_body(ScoreRequest),
             responses=responses(ScoreResponse, *SCORING_ERRORS))
async def score(body: Body, request: Request, served: ServedDep, engine: EngineDep,
                tokenizing: TokenizingDep) -> Response:
    return await _score(body, request, served, engine, tokenizing)


@router.post("/score", openapi_extra=request_body(PairScoreRequest),
             responses=responses(PairScoreResponse, *SCORING_ERRORS))
async def score_vllm(body: Body, request: Request, served: ServedDep, engine: EngineDep,
                     tokenizing: TokenizingDep) -> Response:
    return await _score(body, request, served, engine, tokenizing)


# ------------------------------------------------------------------------------------------------ /v1/rerank


@dataclass
class Reranked:
    scores: list[float]  # one relevance score per document, in the documents' order
    num_tokens: int
    headers: dict[str, str] | None


def require_reranker(served: ServedModel):
    if served.reranker is None:
        raise UnsupportedOption(
            "this server does not rerank: serve a one-label *ForSequenceClassification checkpoint, or a causal LM "
            "with --reranker qwen3|bge-gemma", param="--reranker")
    return served.reranker


async def rerank_scores(served: ServedModel, engine, tokenizing: TokenizingPool, query: str, documents: list[str],
                        receive, *, instruction: str | None = None, use_activation: bool = True,
                        truncation: Truncation = Truncation()) -> Reranked:
    """The relevance score of each (query, document) pair: the one computation of /v1/rerank, TEI's /rerank and
    vLLM's pair scoring. A truncated pair keeps its query and loses document tokens."""
    reranker = require_reranker(served)
    keep = truncation.limit(served)
    chars = (text_chars(query) + text_chars(instruction)) * len(documents) + text_chars(documents)
    tokenizing.check_chars(served.tokenizer, chars, "documents")
    prompts = await tokenizing.run(functools.partial(reranker.prompt_ids, query, documents, instruction, keep=keep,
                                                     direction=truncation.direction))
    if not prompts:
        return Reranked([], 0, None)
    # already cut to fit: what is still too long is refused
    inputs = await tokenizing.pack(served, RequestInputs(token_ids=prompts, truncation=Truncation(False)),
                                   InputFields("documents", "documents"))
    # The last row's logits: a classifier's head outputs, or a causal LM's vocabulary row whose label columns are
    # read (raw logits: bge-gemma's score is the `Yes` logit itself, not a log-probability).
    with await engine.score(inputs, OutputSpec(), receive) as scored:
        logits = scored.outputs[LOGITS]  # [documents, columns]
        if reranker.label_token_ids:
            logits = logits[:, list(reranker.label_token_ids)]
        logits = np.array(logits, dtype=np.float32)  # a copy: the results are released here
        headers = scored.timing_headers
    scores = relevance_scores(reranker.raw_scores(torch.from_numpy(logits)), use_activation).tolist()
    return Reranked(scores, inputs.num_tokens, headers)


async def _rerank(req: RerankRequest, request: Request, served: ServedModel, engine,
                  tokenizing: TokenizingPool) -> Response:
    reranked = await rerank_scores(served, engine, tokenizing, req.query, req.documents, request.receive,
                                   instruction=req.instruction, use_activation=req.use_activation,
                                   truncation=req.truncation())
    relevance = reranked.scores
    order = sorted(range(len(relevance)), key=lambda i: -relevance[i])
    if req.top_n:
        order = order[: req.top_n]
    results = []
    for i in order:
        result = {"index": i, "relevance_score": relevance[i]}
        if req.return_documents:
            result["document"] = {"text": req.documents[i]}
        results.append(result)
    n = reranked.num_tokens
    return json_response({"id": f"rerank-{uuid.uuid4().hex}", "model": served.name,
                          "usage": {"prompt_tokens": n, "total_tokens": n}, "results": results},
                         headers=reranked.headers)


@router.post("/v1/rerank", openapi_extra=request_body(RerankRequest),
             responses=responses(RerankResponse, *SCORING_ERRORS))
async def rerank(req: RerankBody, request: Request, served: ServedDep, engine: EngineDep,
                 tokenizing: TokenizingDep) -> Response:
    return await _rerank(req, request, served, engine, tokenizing)


@router.post("/v2/rerank", openapi_extra=request_body(RerankRequest),
             responses=responses(RerankResponse, *SCORING_ERRORS))
async def rerank_v2(req: RerankBody, request: Request, served: ServedDep, engine: EngineDep,
                    tokenizing: TokenizingDep) -> Response:
    return await _rerank(req, request, served, engine, tokenizing)


# ---------------------------------------------------------------------------------------------- /v1/classify


@router.post("/v1/classify", openapi_extra=request_body(ClassifyRequest),
             responses=responses(ClassifyResponse, *SCORING_ERRORS))
async def classify(req: ClassifyBody, request: Request, served: ServedDep, engine: EngineDep,
                   tokenizing: TokenizingDep) -> Response:
    if served.task != Task.CLASSIFICATION:
        raise UnsupportedOption("this model is a causal LM, not a *ForSequenceClassification checkpoint: "
                                "/v1/classify needs a classifier", param="model")
    if (req.input is None) == (req.messages is None):
        raise InvalidInput("send exactly one of input and messages", param="input")
    sent = (prompt_inputs(req.input, req.add_special_tokens, req.truncation()) if req.input is not None
            else RequestInputs(conversations=req.messages, add_generation_prompt=req.add_generation_prompt,
                               truncation=req.truncation()))
    inputs = await tokenizing.pack(served, sent, InputFields("input", "input", "messages"))
    with await engine.score(inputs, OutputSpec(), request.receive) as scored:
        logits = scored.outputs[LOGITS].astype(np.float64)  # [B, num_labels]: the pooled rows (a copy)
        headers = scored.timing_headers
    if not req.use_activation:
        probs = logits
    else:
        probs = _sigmoid(logits) if logits.shape[1] == 1 else _softmax(logits)
    data = [{"index": i, "label": served.id2label.get(int(row.argmax()), str(int(row.argmax()))),
             "probs": p, "num_classes": int(logits.shape[1]), "logits": row}
            for i, (row, p) in enumerate(zip(logits, probs))]
    n = inputs.num_tokens
    return json_response({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                          "model": served.name, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}},
                         headers=headers)
