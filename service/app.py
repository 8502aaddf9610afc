"""`create_app(settings)`: the FastAPI application. Nothing is created at import time.

The checkpoint's configuration and tokenizer are read in `create_app` (cheap, and every request is validated
against them before anything reaches a worker); the worker pool and the batcher live in the lifespan.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from . import __version__
from .batcher import Batcher, Work, WorkResult
from .errors import (
    ClientDisconnected,
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnsupportedOption,
    error_response,
    format_validation_errors,
)
from .metrics import Metrics
from .schemas import (
    SCORING_ERRORS,
    HiddenStatesRequest,
    HiddenStatesResponse,
    InfoResponse,
    LogitsRequest,
    LogitsResponse,
    ModelsResponse,
    StatusResponse,
    responses,
)
from .serialize import cast, safetensors_parts, to_json
from .settings import Settings

logger = logging.getLogger("logitserve.app")

SAFETENSORS = "application/x-safetensors"
STREAM_BYTES = 1 << 20  # binary bodies above this are streamed in slices of this size


async def _slices(parts: list, step: int):
    for part in parts:
        for i in range(0, len(part), step):
            yield part[i : i + step]


def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(to_json(obj), status_code=status, media_type="application/json", headers=headers)


class Service:
    """Everything one app owns: settings, model description, tokenizer, metrics, batcher and worker pool."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        from model.config import ModelConfig
        from model.tokenizer import load_tokenizer

        if not settings.model:
            raise ValueError("settings.model must name a checkpoint folder")
        self.settings = settings
        self.checkpoint = str(Path(settings.model).resolve())
        self.config = ModelConfig.from_pretrained(self.checkpoint)
        self.tokenizer = load_tokenizer(self.checkpoint)
        self.model_name = settings.served_model_name or Path(self.checkpoint).name
        self.max_seq_len = settings.max_seq_len or self.config.max_position_embeddings
        self.metrics = metrics or Metrics()
        self.created = int(time.time())
        self.draining = False
        self.pool = None
        self.batcher: Batcher | None = None

    # ------------------------------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        from .workers import WorkerPool

        loop = asyncio.get_running_loop()
        s = self.settings
        self.batcher = Batcher(None, s.max_batch_tokens, s.effective_max_queue_tokens, self.metrics)
        self.pool = WorkerPool(s, self.checkpoint, self.metrics, loop, on_change=self.batcher.wake)
        self.batcher.pool = self.pool
        self.batcher.start()
        self.pool.start()

    async def shutdown(self) -> None:
        self.draining = True
        if self.batcher is not None:
            await self.batcher.drain(timeout=self.settings.request_timeout)
            await self.batcher.stop()
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.stop)

    # -------------------------------------------------------------------------------------------- checks
    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise Unauthorized("missing or wrong API key: send Authorization: Bearer <key>")

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if self.pool is None:
            return "loading"
        if self.pool.all_ready:
            return None
        reasons = self.pool.reasons()
        return "; ".join(reasons) if reasons else "loading"

    def check_accepting(self) -> None:
        if self.draining:
            raise NotReady("the server is draining", retry_after=5)
        if self.pool is None or not self.pool.accepting:
            raise NotReady(f"not ready: {self.not_ready_reason()}", retry_after=2)

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"request body of {length} bytes is larger than the limit of {limit} bytes")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, cls, body: bytes):
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"the body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidInput("the body must be a JSON object")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            message, param = format_validation_errors(exc.errors(include_url=False))
            raise InvalidInput(message, param=param) from None

    def sequences(self, req) -> tuple[np.ndarray, list[int]]:
        """Validated token ids of every sequence, packed, and their lengths."""
        if (req.input_ids is None) == (req.inputs is None):
            raise InvalidInput("send exactly one of input_ids and inputs", param="input_ids")
        if req.inputs is not None:
            param = "inputs"
            if self.tokenizer is None:
                raise UnsupportedOption("this model has no tokenizer.json: send input_ids", param="inputs")
            texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
            encs = self.tokenizer.encode_batch(texts, add_special_tokens=req.add_special_tokens) if texts else []
            lists = [e.ids for e in encs]
        else:
            param = "input_ids"
            lists = req.input_ids
        if not lists:
            raise InvalidInput("no sequence: send at least one", param=param)
        vocab = self.config.vocab_size
        arrays = []
        for i, ids in enumerate(lists):
            if not ids:
                raise InvalidInput(f"sequence {i} is empty", param=param)
            if len(ids) > self.max_seq_len:
                raise InvalidInput(
                    f"sequence {i} has {len(ids)} tokens, more than max-seq-len {self.max_seq_len}", param=param)
            try:
                arr = np.array(ids, dtype=np.int64)
            except OverflowError:
                arr = None
            if arr is None or int(arr.min()) < 0 or int(arr.max()) >= vocab:
                pos = next(p for p, t in enumerate(ids) if not 0 <= t < vocab)
                raise InvalidInput(
                    f"sequence {i}: token id {ids[pos]} at position {pos} is outside [0, {vocab})", param=param)
            arrays.append(arr)
        packed = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return packed, [len(a) for a in arrays]

    # ------------------------------------------------------------------------------------------ scoring
    def logits_spec(self, req: LogitsRequest):
        from model.outputs import OutputSpec, ReturnHiddenStates, ReturnLogits

        if req.top_k > self.config.vocab_size:
            raise UnsupportedOption(f"top_k {req.top_k} is larger than the vocabulary ({self.config.vocab_size})",
                                    param="top_k")
        return OutputSpec(
            return_logits=ReturnLogits(req.return_logits),
            return_n_logits=req.return_n_logits,
            logits=req.logits,
            target_logprobs=req.target_logprobs,
            top_k=req.top_k,
            return_hidden_states=ReturnHiddenStates(req.return_hidden_states),
            layers=(self.config.num_layers,),
        )

    def hidden_spec(self, req: HiddenStatesRequest):
        from model.outputs import OutputSpec, ReturnHiddenStates

        try:
            layers = self.config.resolve_layers(req.layers)
        except IndexError as exc:
            raise InvalidInput(str(exc), param="layers") from None
        return OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates(req.return_hidden_states),
                          layers=layers)

    async def await_result(self, request: Request, work: Work) -> WorkResult:
        fut = work.future
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({fut, disconnect}, timeout=self.settings.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        finally:
            disconnect.cancel()
        if fut.done():
            return fut.result()
        fut.cancel()  # dropped from the queue if it is still there
        if disconnect in done:
            raise ClientDisconnected()
        raise RequestTimeout(f"no result within the request timeout of {self.settings.request_timeout:g}s")

    async def handle(self, request: Request, endpoint: str, fn, *, needs_workers: bool = True) -> Response:
        """Auth, readiness, body limits, errors and metrics around `await fn(body) -> Response`: every endpoint
        that takes a body goes through here."""
        t0 = time.perf_counter()
        m = self.metrics
        m.requests_in_flight.inc()
        status = 500
        try:
            try:
                self.check_auth(request)
                if needs_workers:
                    self.check_accepting()
                body = await self.read_body(request)
                response = await fn(body)
            except ServiceError as exc:
                response = error_response(exc)
            except ClientDisconnected:
                response = Response(status_code=499)
            except Exception as exc:  # a bug: say so, keep serving
                logger.exception("request failed")
                response = error_response(InternalError(f"{type(exc).__name__}: {exc}"))
            status = response.status_code
            return response
        finally:
            m.requests_in_flight.dec()
            m.requests.labels(endpoint, str(status)).inc()
            m.request_duration.labels(endpoint, str(status)).observe(time.perf_counter() - t0)

    async def score(self, request: Request, endpoint: str) -> Response:
        async def run(body: bytes) -> Response:
            if endpoint == "/v1/logits":
                req = self.parse(LogitsRequest, body)
                spec = self.logits_spec(req)
            else:
                req = self.parse(HiddenStatesRequest, body)
                spec = self.hidden_spec(req)
            ids, lengths = self.sequences(req)
            work = Work(ids, lengths, spec, asyncio.get_running_loop().create_future())
            self.batcher.submit(work)
            self.metrics.prompt_tokens.inc(work.num_tokens)
            result = await self.await_result(request, work)
            return self.respond(request, endpoint, req, spec, work, result)

        return await self.handle(request, endpoint, run)

    def respond(self, request: Request, endpoint: str, req, spec, work: Work, result: WorkResult) -> Response:
        t0 = time.perf_counter()
        binary = SAFETENSORS in request.headers.get("accept", "")
        tensors = result.batch.tensors(result.group)
        group = result.batch.groups[result.group]
        headers = {"x-queue-time": f"{result.queue_s * 1000:.3f}", "x-inference-time": f"{result.inference_s * 1000:.3f}"}
        if binary:
            parts = self._safetensors(endpoint, req, spec, work, tensors, group)
            del tensors
            self.metrics.serialization_duration.labels("safetensors").observe(time.perf_counter() - t0)
            size = sum(len(p) for p in parts)
            if size > STREAM_BYTES:
                # Streamed from views of the batch's shared memory, with the socket's backpressure: no copy of the
                # whole body in this process (full-vocabulary logits are ~200 KB per row).
                headers["content-length"] = str(size)
                return StreamingResponse(_slices(parts, STREAM_BYTES), media_type=SAFETENSORS, headers=headers)
            return Response(b"".join(parts), media_type=SAFETENSORS, headers=headers)
        body = self._json_body(endpoint, spec, work, tensors, group)
        del tensors
        self.metrics.serialization_duration.labels("json").observe(time.perf_counter() - t0)
        return Response(body, media_type="application/json", headers=headers)

    def _json_body(self, endpoint, spec, work, t, group) -> bytes:
        rows, hrows = group["rows"], group["hidden_rows"]
        hidden = "hidden_states" in t
        data = []
        r = h = 0
        for i, n in enumerate(work.lengths):
            item: dict = {"index": i, "num_tokens": n}
            kh = hrows[i]
            if endpoint == "/v1/hidden_states":
                item["positions"] = t["hidden_positions"][h : h + kh]
                item["layers"] = group["layers"]
            else:
                k = rows[i]
                item["positions"] = t["positions"][r : r + k]
                if spec.logits:
                    item["logits"] = t["logits"][r : r + k]
                if spec.target_logprobs:
                    item["target_logprobs"] = t["target_logprobs"][r : r + k]
                if spec.top_k:
                    item["top_k"] = {"ids": t["top_k_ids"][r : r + k], "logprobs": t["top_k_logprobs"][r : r + k]}
                r += k
            if hidden:
                item["hidden_states"] = np.ascontiguousarray(t["hidden_states"][:, h : h + kh])
            h += kh
            data.append(item)
        n = work.num_tokens
        obj = {"object": "logits" if endpoint == "/v1/logits" else "hidden_states", "model": self.model_name,
               "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}
        return to_json(obj)

    def _safetensors(self, endpoint, req, spec, work, t, group) -> list:
        dtype = req.dtype
        offsets = np.zeros(len(work.lengths) + 1, dtype=np.int64)
        np.cumsum(work.lengths, out=offsets[1:])
        out: list = [("input_row_offsets", offsets, None)]
        if endpoint == "/v1/logits":
            lo = np.zeros(len(work.lengths) + 1, dtype=np.int64)
            np.cumsum(group["rows"], out=lo[1:])
            out += [("positions", t["positions"], None), ("logit_offsets", lo, None)]
            if spec.logits:
                out.append(("logits", *cast(t["logits"], dtype)))
            if spec.target_logprobs:
                out.append(("target_logprobs", t["target_logprobs"], None))
            if spec.top_k:
                out += [("top_k_ids", t["top_k_ids"], None), ("top_k_logprobs", t["top_k_logprobs"], None)]
        if "hidden_states" in t:
            ho = np.zeros(len(work.lengths) + 1, dtype=np.int64)
            np.cumsum(group["hidden_rows"], out=ho[1:])
            out += [("hidden_states", *cast(t["hidden_states"], dtype)), ("hidden_offsets", ho, None),
                    ("hidden_positions", t["hidden_positions"], None)]
        metadata = {
            "model": self.model_name,
            "return_logits": getattr(req, "return_logits", "none"),
            "return_hidden_states": req.return_hidden_states,
            "layers": json.dumps(group["layers"]),
            "dtype": dtype,
        }
        return safetensors_parts(out, metadata)

    # ------------------------------------------------------------------------------------------ operations
    def info(self) -> dict:
        import torch

        from model.runner import resolve_dtype

        s = self.settings
        return {
            "model": self.model_name,
            "model_path": self.checkpoint,
            "version": __version__,
            "config": dataclasses.asdict(self.config),
            "tokenizer": self.tokenizer is not None,
            "tp": s.tp,
            "replicas": s.replicas,
            "device": s.device,
            "dtype": str(resolve_dtype(s.dtype, self.config, torch.device(s.device.split(":")[0]))).replace("torch.", ""),
            "limits": {
                "max_batch_tokens": s.max_batch_tokens,
                "max_seq_len": self.max_seq_len,
                "max_queue_tokens": s.effective_max_queue_tokens,
                "request_timeout": s.request_timeout,
                "max_request_bytes": s.max_request_bytes,
            },
            "pooling": s.pooling,
            "workers": self.pool.describe() if self.pool is not None else [],
        }


async def _wait_disconnect(request: Request) -> bool:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return True
        await asyncio.sleep(0.01)


def create_app(settings: Settings | None = None, metrics: Metrics | None = None) -> FastAPI:
    settings = settings or Settings()
    service = Service(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.shutdown()

    app = FastAPI(title="logitserve", version=__version__, lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = format_validation_errors(list(exc.errors()))
        return error_response(InvalidInput(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.url.path}"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"))
        body = orjson.dumps({"error": {"type": "http_error", "message": str(exc.detail), "param": None}})
        return Response(body, status_code=exc.status_code, media_type="application/json")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return error_response(InternalError(f"{type(exc).__name__}: {exc}"))

    def _body_doc(model) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/v1/logits", openapi_extra=_body_doc(LogitsRequest),
              responses=responses(LogitsResponse, *SCORING_ERRORS, binary=True))
    async def logits(request: Request):
        return await service.score(request, "/v1/logits")

    @app.post("/v1/hidden_states", openapi_extra=_body_doc(HiddenStatesRequest),
              responses=responses(HiddenStatesResponse, *SCORING_ERRORS, binary=True))
    async def hidden_states(request: Request):
        return await service.score(request, "/v1/hidden_states")

    def _simple(endpoint: str, fn, auth: bool = True):
        async def handler(request: Request):
            t0 = time.perf_counter()
            try:
                if auth:
                    service.check_auth(request)
                response = fn()
            except ServiceError as exc:
                response = error_response(exc)
            service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            service.metrics.request_duration.labels(endpoint, str(response.status_code)).observe(time.perf_counter() - t0)
            return response

        return handler

    def health():
        return _json({"status": "ok"})

    def ready():
        reason = service.not_ready_reason()
        if reason is None:
            return _json({"status": "ready"})
        return error_response(NotReady(reason))

    def info():
        return _json(service.info())

    def models():
        return _json({"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": service.created, "owned_by": "logitserve",
            "max_model_len": service.max_seq_len}]})

    def metrics_text():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/health", _simple("/health", health, auth=False), methods=["GET"],
                      responses=responses(StatusResponse))
    app.add_api_route("/ready", _simple("/ready", ready, auth=False), methods=["GET"],
                      responses=responses(StatusResponse, 503))
    app.add_api_route("/metrics", _simple("/metrics", metrics_text, auth=False), methods=["GET"],
                      response_class=PlainTextResponse, responses=responses(None, text=True))
    app.add_api_route("/info", _simple("/info", info), methods=["GET"], responses=responses(InfoResponse, 401))
    app.add_api_route("/v1/models", _simple("/v1/models", models), methods=["GET"],
                      responses=responses(ModelsResponse, 401))

    from . import openai_compat, tokenizer_routes
    from .playground import router as playground

    openai_compat.register(app, service)  # /v1/completions, /v1/embeddings
    tokenizer_routes.register(app, service)  # /tokenize, /detokenize, /tokenizer_info
    app.include_router(playground)  # GET /: the playground page and its static files
    return app
