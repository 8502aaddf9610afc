"""Text Embeddings Inference's routes, for the clients written against TEI (LlamaIndex's and Haystack's TEI classes,
huggingface_hub's InferenceClient): `POST /embed`, `/embed_all`, `/embed_sparse` (refused: no SPLADE here),
`/predict`, `/rerank`, `/similarity`, `/decode`, and `POST /` dispatching as TEI does. `POST /tokenize`'s TEI form
lives beside vLLM's in routes/tokenizer.py. Every error on these routes is TEI's body (service/tei.py).

Each route is the same computation as its native peer: /embed is /v1/embeddings' (service/embeddings.py), /rerank
is /v1/rerank's (labels.rerank_scores), /predict reads the classifier head as /v1/classify does."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from starlette.responses import Response

from model.runtime.outputs import LOGITS, OutputSpec
from model.task import Task

from ..deps import Authorized, Body, EngineDep, ServedDep, TokenizingDep, WorkersAccepting, request_body
from ..embeddings import check_dimensions, cosine, embed, token_states
from ..errors import InvalidInput
from ..inputs import InputFields, RequestInputs, Truncation, truncating_tokenizer
from ..responses import json_response
from ..served import ServedModel
from ..tokenizing import TokenizingPool, text_chars
from ..tei import (
    DecodeRequest,
    EmbedAllRequest,
    EmbedRequest,
    PredictRequest,
    RerankRequest,
    SimilarityRequest,
    TeiInput,
    empty,
    parse_tei,
    tei_error_response,
    tokenizer_error,
    wrong_model,
)
from .labels import rerank_scores
from .metered import WorkRoute


class TeiRoute(WorkRoute):
    render_error = staticmethod(tei_error_response)


# Not in /openapi.json: these routes answer TEI's bodies and TEI's error body, which TEI's own OpenAPI document
# describes; this server's document keeps its one error schema for every route it lists.
router = APIRouter(route_class=TeiRoute, dependencies=[Authorized, WorkersAccepting], include_in_schema=False)
# tokenizing and decoding need no worker
tokenizer_router = APIRouter(route_class=TeiRoute, dependencies=[Authorized], include_in_schema=False)

INPUTS = InputFields("inputs", "inputs")


def tei_body(cls: type[BaseModel]):
    async def parsed(body: Body) -> BaseModel:
        return parse_tei(cls, body)

    return Annotated[cls, Depends(parsed)]


# ------------------------------------------------------------------------------------------------ embeddings


async def sent_inputs(served: ServedModel, tokenizing: TokenizingPool, inputs: TeiInput,
                      truncation: Truncation) -> RequestInputs:
    """TEI's `Input`: a string, token ids, or a batch of either (texts and ids may be mixed)."""
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise empty("inputs")
    if all(isinstance(x, str) for x in inputs):
        return RequestInputs(texts=list(inputs), truncation=truncation)
    if any(isinstance(x, str) for x in inputs):
        if served.tokenizer is None:
            raise InvalidInput("this model has no tokenizer.json: send inputs as token ids", param="inputs")
        tokenizing.check_chars(served.tokenizer, text_chars(inputs), "inputs")
        inputs = await tokenizing.run(_ids_of, served.tokenizer, inputs)
    return RequestInputs(token_ids=[list(x) for x in inputs], truncation=truncation)


def _ids_of(tokenizer, inputs: list) -> list:
    """Each text of a mixed batch as its token ids (with the special tokens); ids as they are."""
    return [tokenizer.encode(x).ids if isinstance(x, str) else x for x in inputs]


def require_embedding_model(served: ServedModel) -> None:
    if served.task == Task.CLASSIFICATION:
        raise wrong_model("Model is not an embedding model")


@router.post("/embed", openapi_extra=request_body(EmbedRequest))
async def tei_embed(req: tei_body(EmbedRequest), request: Request, served: ServedDep, engine: EngineDep,
                    tokenizing: TokenizingDep) -> Response:
    require_embedding_model(served)
    check_dimensions(served, req.dimensions)
    sent = await sent_inputs(served, tokenizing, req.inputs, req.truncation())
    embedded = await embed(served, engine, tokenizing, sent, request.receive, INPUTS, prompt_name=req.prompt_name,
                           normalize=req.normalize, dimensions=req.dimensions)
    return json_response(embedded.vectors, headers=embedded.headers)


@router.post("/embed_all", openapi_extra=request_body(EmbedAllRequest))
async def tei_embed_all(req: tei_body(EmbedAllRequest), request: Request, served: ServedDep,
                        engine: EngineDep, tokenizing: TokenizingDep) -> Response:
    require_embedding_model(served)
    sent = await sent_inputs(served, tokenizing, req.inputs, req.truncation())
    states = await token_states(served, engine, tokenizing, sent, request.receive, INPUTS)
    return json_response(states.vectors, headers=states.headers)


@router.post("/embed_sparse")
async def tei_embed_sparse() -> Response:
    # TEI's own answer to a model without SPLADE pooling
    raise wrong_model("Model is not an embedding model with SPLADE pooling: this server serves dense embeddings "
                      "(/embed) and has no sparse (SPLADE) pooling")


@router.post("/similarity", openapi_extra=request_body(SimilarityRequest))
async def tei_similarity(req: tei_body(SimilarityRequest), request: Request, served: ServedDep, engine: EngineDep,
                         tokenizing: TokenizingDep) -> Response:
    require_embedding_model(served)
    if not req.inputs.sentences:
        raise empty("inputs.sentences")
    texts = [req.inputs.source_sentence, *req.inputs.sentences]
    embedded = await embed(served, engine, tokenizing, RequestInputs(texts=texts, truncation=req.truncation()),
                           request.receive, InputFields("inputs", "inputs"), prompt_name=req.prompt_name,
                           normalize=False)
    source, *others = embedded.vectors
    return json_response([cosine(source, other) for other in others], headers=embedded.headers)


# -------------------------------------------------------------------------------------- classifier, reranker


def predict_sequences(inputs) -> tuple[list[str | tuple[str, str]], bool]:
    """TEI's PredictInput: a text, a pair [a, b], or a batch of [a] and [a, b]; and whether it was a batch."""
    if isinstance(inputs, str):
        return [inputs], False
    if not inputs:
        raise empty("inputs")
    if all(isinstance(x, str) for x in inputs):
        if len(inputs) > 2:
            raise InvalidInput("inputs: a string, a pair of strings [string, string] or a batch of mixed strings "
                               "and pairs [[string], [string, string], ...]", param="inputs")
        return [inputs[0] if len(inputs) == 1 else (inputs[0], inputs[1])], False
    sequences = []
    for i, x in enumerate(inputs):
        if not isinstance(x, list) or len(x) not in (1, 2):
            raise InvalidInput(f"inputs[{i}]: a batch holds [string] or [string, string]", param="inputs")
        sequences.append(x[0] if len(x) == 1 else (x[0], x[1]))
    return sequences, True


def _encoded_ids(tok, sequences: list) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(sequences, add_special_tokens=True)]


@router.post("/predict", openapi_extra=request_body(PredictRequest))
async def tei_predict(req: tei_body(PredictRequest), request: Request, served: ServedDep,
                      engine: EngineDep, tokenizing: TokenizingDep) -> Response:
    if served.task != Task.CLASSIFICATION:
        raise wrong_model("Model is not a classifier model")
    if served.tokenizer is None:
        raise InvalidInput("this model has no tokenizer.json", param="inputs")
    sequences, batch = predict_sequences(req.inputs)
    truncation = req.truncation()
    keep = truncation.limit(served)
    # a pair is encoded as the checkpoint's tokenizer encodes one (and truncated longest first, as TEI does)
    tok = served.tokenizer if keep is None else truncating_tokenizer(served.tokenizer, keep, truncation.direction)
    tokenizing.check_chars(tok, text_chars(sequences), "inputs")
    ids = await tokenizing.run(_encoded_ids, tok, sequences)
    inputs = await tokenizing.pack(served, RequestInputs(token_ids=ids, truncation=Truncation(False)), INPUTS)
    with await engine.score(inputs, OutputSpec(), request.receive) as scored:
        logits = scored.outputs[LOGITS].astype(np.float64)  # [sequences, num_labels]: the pooled rows (a copy)
        headers = scored.timing_headers
    if req.raw_scores:
        scores = logits
    elif logits.shape[1] == 1:
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
    predictions = []
    for row in scores:
        order = sorted(range(len(row)), key=lambda j: -row[j])
        predictions.append([{"score": float(np.float32(row[j])), "label": served.id2label.get(j, f"LABEL_{j}")}
                            for j in order])
    return json_response(predictions if batch else predictions[0], headers=headers)


@router.post("/rerank", openapi_extra=request_body(RerankRequest))
async def tei_rerank(req: tei_body(RerankRequest), request: Request, served: ServedDep,
                     engine: EngineDep, tokenizing: TokenizingDep) -> Response:
    if not req.texts:
        raise empty("texts")
    if served.reranker is None:
        raise wrong_model("model is not a re-ranker model")
    reranked = await rerank_scores(served, engine, tokenizing, req.query, req.texts, request.receive,
                                   use_activation=not req.raw_scores, truncation=req.truncation())
    ranks = []
    for i in sorted(range(len(req.texts)), key=lambda i: -reranked.scores[i]):
        rank = {"index": i, "score": reranked.scores[i]}
        if req.return_text:
            rank["text"] = req.texts[i]
        ranks.append(rank)
    return json_response(ranks, headers=reranked.headers)


# --------------------------------------------------------------------------------------------------- POST /


@router.post("/")
async def tei_root(body: Body, request: Request, served: ServedDep, engine: EngineDep,
                   tokenizing: TokenizingDep) -> Response:
    """TEI's default route: /predict for a classifier, /rerank for a reranker's body, else /embed; a body of
    `{"inputs": {"source_sentence", "sentences"}}` (InferenceClient.sentence_similarity) is /similarity."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and "query" in obj and "texts" in obj:
        return await tei_rerank(parse_tei(RerankRequest, body), request, served, engine, tokenizing)
    if isinstance(obj, dict) and isinstance(obj.get("inputs"), dict):
        return await tei_similarity(parse_tei(SimilarityRequest, body), request, served, engine, tokenizing)
    if served.task == Task.CLASSIFICATION:
        return await tei_predict(parse_tei(PredictRequest, body), request, served, engine, tokenizing)
    return await tei_embed(parse_tei(EmbedRequest, body), request, served, engine, tokenizing)


# ----------------------------------------------------------------------------------------------- tokenizer


@tokenizer_router.post("/decode", openapi_extra=request_body(DecodeRequest))
async def tei_decode(req: tei_body(DecodeRequest), served: ServedDep) -> Response:
    tok = served.tokenizer
    if tok is None:
        raise InvalidInput("this model has no tokenizer.json", param="ids")
    # `[]` is one empty sequence (serde's first untagged variant), so a batch is never empty
    lists = req.ids if req.ids and isinstance(req.ids[0], list) else [req.ids]
    size = tok.get_vocab_size(with_added_tokens=True)
    for i, ids in enumerate(lists):
        outside = [t for t in ids if not 0 <= t < size]
        if outside:
            raise tokenizer_error(f"ids[{i}]: token id {outside[0]} is outside [0, {size})")
    return json_response(tok.decode_batch(lists, skip_special_tokens=req.skip_special_tokens))
