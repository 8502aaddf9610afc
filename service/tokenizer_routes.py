"""`POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`: the shapes of vLLM's endpoints, which is what
lm-evaluation-harness's remote tokenizer (`tokenizer_backend=remote`) calls. They need no worker."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt
from starlette.responses import Response

from .errors import InvalidInput, UnsupportedOption
from .openai_compat import _json
from .schemas import TOKENIZER_ERRORS, DetokenizeResponse, TokenizeResponse, TokenizerInfoResponse, responses


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    tokens: list[StrictInt]


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_info(service) -> dict:
    tok = service.tokenizer
    cfg: dict = {}
    path = Path(service.checkpoint) / "tokenizer_config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            cfg = {}

    def special(name: str, token_id) -> tuple[str | None, int | None]:
        text = _token_text(cfg.get(f"{name}_token"))
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if text is None and token_id is not None:
            text = tok.id_to_token(int(token_id))
        if text is not None:
            found = tok.token_to_id(text)
            token_id = found if found is not None else token_id
        return text, token_id

    c = service.config
    info: dict = {"tokenizer_class": cfg.get("tokenizer_class", "PreTrainedTokenizerFast"),
                  "model_max_length": service.max_seq_len, "vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    for name, token_id in (("bos", c.bos_token_id), ("eos", c.eos_token_id), ("pad", c.pad_token_id)):
        text, tid = special(name, token_id)
        info[f"{name}_token"] = text
        info[f"{name}_token_id"] = tid
    if isinstance(cfg.get("chat_template"), str):
        info["chat_template"] = cfg["chat_template"]
    return info


def _require_tokenizer(service):
    if service.tokenizer is None:
        raise UnsupportedOption("this model has no tokenizer.json", param=None)
    return service.tokenizer


def register(app: FastAPI, service) -> None:
    async def tokenize(body: bytes) -> Response:
        tok = _require_tokenizer(service)
        req = service.parse(TokenizeRequest, body)
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        return _json({"tokens": ids, "count": len(ids), "max_model_len": service.max_seq_len})

    async def detokenize(body: bytes) -> Response:
        tok = _require_tokenizer(service)
        req = service.parse(DetokenizeRequest, body)
        size = tok.get_vocab_size(with_added_tokens=True)
        for pos, t in enumerate(req.tokens):
            if not 0 <= t < size:
                raise InvalidInput(f"token id {t} at position {pos} is outside [0, {size})", param="tokens")
        return _json({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})

    async def info(body: bytes) -> Response:
        _require_tokenizer(service)
        return _json(tokenizer_info(service))

    @app.post("/tokenize", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": TokenizeRequest.model_json_schema()}}}},
              responses=responses(TokenizeResponse, *TOKENIZER_ERRORS))
    async def _tokenize(request: Request):
        return await service.handle(request, "/tokenize", tokenize, needs_workers=False)

    @app.post("/detokenize", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": DetokenizeRequest.model_json_schema()}}}},
              responses=responses(DetokenizeResponse, *TOKENIZER_ERRORS))
    async def _detokenize(request: Request):
        return await service.handle(request, "/detokenize", detokenize, needs_workers=False)

    @app.get("/tokenizer_info", responses=responses(TokenizerInfoResponse, 400, 401))
    async def _tokenizer_info(request: Request):
        return await service.handle(request, "/tokenizer_info", info, needs_workers=False)
