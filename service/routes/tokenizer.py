"""`POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`: the shapes of vLLM's endpoints, which is what
lm-evaluation-harness's remote tokenizer (`tokenizer_backend=remote`) calls. They need no worker."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from starlette.responses import Response

from ..deps import Authorized, ServedDep, TokenizerDep, TokenizingDep, json_body, request_body
from ..errors import InvalidInput
from ..inputs import InputFields, RequestInputs
from ..responses import json_response, to_json
from ..schemas import (
    TOKENIZER_ERRORS,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    responses,
)
from ..served import ServedModel
from .metered import WorkRoute

router = APIRouter(route_class=WorkRoute, dependencies=[Authorized])

TokenizeBody = json_body(TokenizeRequest)
TOKENIZE_FIELDS = InputFields("prompt", "prompt", "messages")
DetokenizeBody = json_body(DetokenizeRequest)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def describe_tokenizer(served: ServedModel, tok) -> dict:
    cfg: dict = {}
    path = Path(served.checkpoint) / "tokenizer_config.json"
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

    c = served.config
    info: dict = {"tokenizer_class": cfg.get("tokenizer_class", "PreTrainedTokenizerFast"),
                  "model_max_length": served.max_seq_len, "vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    for name, token_id in (("bos", c.bos_token_id), ("eos", c.eos_token_id), ("pad", c.pad_token_id)):
        text, tid = special(name, token_id)
        info[f"{name}_token"] = text
        info[f"{name}_token_id"] = tid
    if isinstance(cfg.get("chat_template"), str):
        info["chat_template"] = cfg["chat_template"]
    return info


@router.post("/tokenize", openapi_extra=request_body(TokenizeRequest),
             responses=responses(TokenizeResponse, *TOKENIZER_ERRORS))
async def tokenize(tok: TokenizerDep, req: TokenizeBody, served: ServedDep, tokenizing: TokenizingDep) -> Response:
    if (req.prompt is None) == (req.messages is None):
        raise InvalidInput("send exactly one of prompt and messages", param="prompt")
    if req.messages is not None:
        sent = RequestInputs(conversations=[req.messages], add_generation_prompt=req.add_generation_prompt)
        ids = (await tokenizing.pack(served, sent, TOKENIZE_FIELDS)).token_lists[0]
        return Response(await tokenizing.run(_tokens_json, ids, served.max_seq_len), media_type="application/json")
    tokenizing.check_chars(tok, len(req.prompt), "prompt")
    return Response(await tokenizing.run(_encode_json, tok, req.prompt, req.add_special_tokens, served.max_seq_len,
                                         tokenizing), media_type="application/json")


def _encode_json(tok, prompt: str, add_special_tokens: bool, max_model_len: int, tokenizing) -> bytes:
    """/tokenize's body for a prompt, made on a tokenizing thread (encode_batch releases the GIL; encode does not).
    The count is checked before the ids become a list."""
    encoding = tok.encode_batch([prompt], add_special_tokens=add_special_tokens)[0]
    tokenizing.check_tokens(len(encoding), "prompt")
    return _tokens_json(encoding.ids, max_model_len)


def _tokens_json(ids: list[int], max_model_len: int) -> bytes:
    return to_json({"tokens": ids, "count": len(ids), "max_model_len": max_model_len})


@router.post("/detokenize", openapi_extra=request_body(DetokenizeRequest),
             responses=responses(DetokenizeResponse, *TOKENIZER_ERRORS))
async def detokenize(tok: TokenizerDep, req: DetokenizeBody) -> Response:
    size = tok.get_vocab_size(with_added_tokens=True)
    for pos, t in enumerate(req.tokens):
        if not 0 <= t < size:
            raise InvalidInput(f"token id {t} at position {pos} is outside [0, {size})", param="tokens")
    return json_response({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})


@router.get("/tokenizer_info", responses=responses(TokenizerInfoResponse, 400, 401))
async def tokenizer_info(tok: TokenizerDep, served: ServedDep) -> Response:
    return json_response(describe_tokenizer(served, tok))
