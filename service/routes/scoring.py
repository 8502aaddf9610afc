"""`POST /v1/logits` and `POST /v1/hidden_states`: the model's outputs for packed sequences, as JSON or safetensors."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from starlette.responses import Response

from model.runtime.outputs import OutputSpec, Rows

from ..deps import (
    Authorized,
    EngineDep,
    MetricsDep,
    ServedDep,
    TokenizingDep,
    WorkersAccepting,
    json_body,
    request_body,
)
from ..errors import InvalidInput, UnsupportedOption
from ..responses import hidden_states_json, logits_json, scored_response, scoring_safetensors
from ..schemas import (
    SCORING_ERRORS,
    HiddenStatesRequest,
    HiddenStatesResponse,
    LogitsRequest,
    LogitsResponse,
    responses,
)
from .metered import WorkRoute

router = APIRouter(route_class=WorkRoute, dependencies=[Authorized, WorkersAccepting])

LogitsBody = json_body(LogitsRequest)
HiddenStatesBody = json_body(HiddenStatesRequest)

# Request fields that are OutputSpec fields of the same name are passed on as they are.
_SPEC_FIELDS = {f.name for f in dataclasses.fields(OutputSpec)}


def logits_spec(req: LogitsRequest, served) -> OutputSpec:
    vocab = served.config.vocab_size
    if req.top_k > vocab:
        raise UnsupportedOption(f"top_k {req.top_k} is larger than the vocabulary ({vocab})", param="top_k")
    if req.vocab_ids is not None:
        outside = [i for i in req.vocab_ids if not 0 <= i < vocab]
        if outside:
            raise InvalidInput(f"vocab_ids: token id {outside[0]} is outside [0, {vocab})", param="vocab_ids")
    asked = {name: getattr(req, name) for name in _SPEC_FIELDS & set(LogitsRequest.model_fields)}
    return OutputSpec(**asked, layers=(served.config.num_layers,))


def hidden_states_spec(req: HiddenStatesRequest, served) -> OutputSpec:
    try:
        layers = served.config.resolve_layers(req.layers)
    except IndexError as exc:
        raise InvalidInput(str(exc), param="layers") from None
    return OutputSpec(logits=False, return_hidden_states=req.return_hidden_states, layers=layers)


async def _scored(req, spec: OutputSpec, request: Request, served, engine, metrics, tokenizing, *,
                  rows: tuple[Rows, ...], to_json, return_logits: str) -> Response:
    """Score the request's inputs under `spec`; answer with these row sets' outputs, as JSON or safetensors."""
    metadata = {"model": served.name, "return_logits": return_logits, "return_hidden_states": req.return_hidden_states}
    with await engine.score(await tokenizing.pack(served, req.sent()), spec, request.receive) as scored:
        return scored_response(scored, request.headers.get("accept", ""), metrics,
                               json_body=lambda: to_json(scored, served.name),
                               binary_parts=lambda: scoring_safetensors(scored, rows, req.dtype, metadata))


@router.post("/v1/logits", openapi_extra=request_body(LogitsRequest),
             responses=responses(LogitsResponse, *SCORING_ERRORS, binary=True))
async def logits(req: LogitsBody, request: Request, served: ServedDep, engine: EngineDep,
                 metrics: MetricsDep, tokenizing: TokenizingDep) -> Response:
    return await _scored(req, logits_spec(req, served), request, served, engine, metrics, tokenizing,
                         rows=(Rows.LOGIT, Rows.HIDDEN), to_json=logits_json, return_logits=req.return_logits)


@router.post("/v1/hidden_states", openapi_extra=request_body(HiddenStatesRequest),
             responses=responses(HiddenStatesResponse, *SCORING_ERRORS, binary=True))
async def hidden_states(req: HiddenStatesBody, request: Request, served: ServedDep, engine: EngineDep,
                        metrics: MetricsDep, tokenizing: TokenizingDep) -> Response:
    return await _scored(req, hidden_states_spec(req, served), request, served, engine, metrics, tokenizing,
                         rows=(Rows.HIDDEN,), to_json=hidden_states_json, return_logits="none")
