"""Probes, scrapes and descriptions: `/health`, `/ready`, `/metrics`, `/info`, `/v1/models`. None needs a worker;
`/info` and `/v1/models` need the API key."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import PlainTextResponse, Response

from model.task import Task

from .. import __version__
from ..deps import Authorized, EngineDep, MetricsDep, ServedDep, SettingsDep, TokenizingDep
from ..errors import NotReady, error_response
from ..responses import json_response
from ..schemas import InfoResponse, ModelsResponse, StatusResponse, responses
from ..workers.protocol import RunnerOptions
from .metered import MeteredRoute

router = APIRouter(route_class=MeteredRoute)


@router.get("/health", responses=responses(StatusResponse))
async def health() -> Response:
    return json_response({"status": "ok"})


@router.get("/ready", responses=responses(StatusResponse, 503))
async def ready(engine: EngineDep) -> Response:
    reason = engine.not_ready_reason()
    return json_response({"status": "ready"}) if reason is None else error_response(NotReady(reason))


@router.get("/metrics", response_class=PlainTextResponse, responses=responses(None, text=True))
async def metrics_text(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/info", dependencies=[Authorized], responses=responses(InfoResponse, 401))
async def info(served: ServedDep, engine: EngineDep, settings: SettingsDep,
               tokenizing: TokenizingDep) -> Response:
    s = settings
    # As the workers loaded the model; until one has, what they will load: the same resolution from the same inputs.
    numerics = engine.loaded or RunnerOptions.from_settings(s).numerics(served.config, s.device)
    return json_response({
        "model": served.name,
        "model_path": served.checkpoint,
        "version": __version__,
        "config": dataclasses.asdict(served.config),
        "tokenizer": served.tokenizer is not None,
        "task": served.task,
        "num_labels": served.num_labels,
        "tp": s.tp,
        "replicas": s.replicas,
        "device": s.device,
        "dtype": numerics.dtype,
        "batch_invariant": numerics.batch_invariant,
        "limits": {
            "max_batch_tokens": s.max_batch_tokens,
            "max_seq_len": served.max_seq_len,
            "max_queue_tokens": s.effective_max_queue_tokens,
            "request_timeout": s.request_timeout,
            "max_request_bytes": s.max_request_bytes,
        },
        "pooling": s.pooling,
        # the embedding endpoints' pooling, Dense layers, normalization and prompts as in force
        "embedding": served.embedding.describe(),
        "prefix_sharing": numerics.prefix_sharing,
        "prefix_cache_bytes": numerics.prefix_cache_bytes,
        "attention": numerics.attention.value,
        "numerics_reason": numerics.reason,
        "workers": engine.describe_workers(),
        "auto_truncate": served.auto_truncate,
        **tei_info(served, s, numerics.dtype, tokenizing.threads),
    })


def tei_info(served, s, dtype: str, tokenizing_threads: int) -> dict:
    """Text Embeddings Inference's `Info` fields (its clients read them from the same GET /info)."""
    if served.task == Task.CLASSIFICATION:
        labels = {str(i): label for i, label in served.id2label.items()}
        kind = "reranker" if served.reranker is not None else "classifier"
        model_type = {kind: {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}}
    else:
        model_type = {"embedding": {"pooling": "+".join(served.embedding.pooling)}}
    return {"model_id": served.name, "model_sha": None, "model_dtype": dtype, "served_model_name": served.name,
            "model_type": model_type, "max_concurrent_requests": s.effective_max_queue_tokens,
            "max_input_length": served.max_seq_len, "max_batch_tokens": s.max_batch_tokens, "max_batch_requests": None,
            # every sequence has a token: no batch of more sequences than the queue's tokens is ever accepted
            "max_client_batch_size": s.effective_max_queue_tokens, "tokenization_workers": tokenizing_threads,
            "sha": None, "docker_label": None}


@router.get("/v1/models", dependencies=[Authorized], responses=responses(ModelsResponse, 401))
async def models(served: ServedDep) -> Response:
    return json_response({"object": "list", "data": [{
        "id": served.name, "object": "model", "created": served.created, "owned_by": "logitserve",
        "max_model_len": served.max_seq_len}]})
