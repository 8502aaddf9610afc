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

import time
import uuid

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from model.runtime.outputs import LOGITS, VOCAB_LOGPROBS, OutputSpec
from model.task import Task

from ..deps import Authorized, EngineDep, ServedDep, TokenizingDep, WorkersAccepting, json_body, request_body
from ..errors import InvalidInput, UnsupportedOption
from ..inputs import InputFields, RequestInputs, prompt_inputs
from ..tokenizing import text_chars
from ..responses import json_response
from ..schemas import (
    SCORING_ERRORS,
    ClassifyRequest,
    ClassifyResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    responses,
)
from ..served import ServedModel
from .metered import WorkRoute

router = APIRouter(route_class=WorkRoute, dependencies=[Authorized, WorkersAccepting])

ScoreBody = json_body(ScoreRequest)
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


@router.post("/v1/score", openapi_extra=request_body(ScoreRequest), responses=responses(ScoreResponse, *SCORING_ERRORS))
async def score(req: ScoreBody, request: Request, served: ServedDep, engine: EngineDep,
                tokenizing: TokenizingDep) -> Response:
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


# ------------------------------------------------------------------------------------------------ /v1/rerank


async def _rerank(req: RerankRequest, request: Request, served: ServedModel, engine, tokenizing) -> Response:
    reranker = served.reranker
    if reranker is None:
        raise UnsupportedOption(
            "this server does not rerank: serve a one-label *ForSequenceClassification checkpoint, or a causal LM "
            "with --reranker qwen3|bge-gemma", param="--reranker")
    chars = (text_chars(req.query) + text_chars(req.instruction)) * len(req.documents) + text_chars(req.documents)
    tokenizing.check_chars(served.tokenizer, chars, "documents")
    prompts = await tokenizing.run(reranker.prompt_ids, req.query, req.documents, req.instruction)
    results: list = []
    headers = None
    n = 0
    if prompts:
        inputs = await tokenizing.pack(served, RequestInputs(token_ids=prompts), InputFields("documents", "documents"))
        # The last row's logits: a classifier's head outputs, or a causal LM's vocabulary row whose label columns
        # are read (raw logits: bge-gemma's score is the `Yes` logit itself, not a log-probability).
        with await engine.score(inputs, OutputSpec(), request.receive) as scored:
            logits = scored.outputs[LOGITS]  # [documents, columns]
            if reranker.label_token_ids:
                logits = logits[:, list(reranker.label_token_ids)]
            logits = np.array(logits, dtype=np.float32)  # a copy: the results are released here
            headers = scored.timing_headers
        import torch

        raw = reranker.raw_scores(torch.from_numpy(logits))
        relevance = (torch.sigmoid(raw) if req.use_activation else raw).tolist()
        order = sorted(range(len(prompts)), key=lambda i: -relevance[i])
        if req.top_n:
            order = order[: req.top_n]
        for i in order:
            result = {"index": i, "relevance_score": relevance[i]}
            if req.return_documents:
                result["document"] = {"text": req.documents[i]}
            results.append(result)
        n = inputs.num_tokens
    return json_response({"id": f"rerank-{uuid.uuid4().hex}", "model": served.name,
                          "usage": {"prompt_tokens": n, "total_tokens": n}, "results": results}, headers=headers)


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
    sent = (prompt_inputs(req.input, req.add_special_tokens) if req.input is not None
            else RequestInputs(conversations=req.messages, add_generation_prompt=req.add_generation_prompt))
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
