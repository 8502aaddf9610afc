"""Probes, scrapes and descriptions: `/health`, `/ready`, `/metrics`, `/info`, `/v1/models`. None needs a worker;
`/info` and `/v1/models` need the API key."""

from __future__ import annotations

import dataclasses

import torch
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import PlainTextResponse, Response

from model.runtime import invariance

from .. import __version__
from ..deps import Authorized, EngineDep, MetricsDep, ServedDep, SettingsDep
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
async def info(served: ServedDep, engine: EngineDep, settings: SettingsDep) -> Response:
    s, loaded = settings, engine.loaded
    asked = RunnerOptions.from_settings(s)
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
        # as the workers loaded the model; until they have, what was asked (batch invariance: the device's default)
        "dtype": loaded.dtype if loaded else s.dtype,
        "batch_invariant": loaded.batch_invariant if loaded else invariance.resolve(asked.batch_invariant,
                                                                                      torch.device(s.device)),
        "limits": {
            "max_batch_tokens": s.max_batch_tokens,
            "max_seq_len": served.max_seq_len,
            "max_queue_tokens": s.effective_max_queue_tokens,
            "request_timeout": s.request_timeout,
            "max_request_bytes": s.max_request_bytes,
        },
        "pooling": s.pooling,
        # as the workers run it (a model that cannot share runs unshared); until they have, what was asked (CPU only)
        "prefix_sharing": loaded.prefix_sharing if loaded else s.prefix_sharing == "on" and s.device == "cpu",
        # the limit per replica, as the workers keep it (0: off, or the model cannot share); until then, as asked
        "prefix_cache_bytes": loaded.prefix_cache_bytes if loaded else s.effective_prefix_cache_bytes,
        "workers": engine.describe_workers(),
    })


@router.get("/v1/models", dependencies=[Authorized], responses=responses(ModelsResponse, 401))
async def models(served: ServedDep) -> Response:
    return json_response({"object": "list", "data": [{
        "id": served.name, "object": "model", "created": served.created, "owned_by": "logitserve",
        "max_model_len": served.max_seq_len}]})
