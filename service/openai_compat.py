"""OpenAI-compatible endpoints: `POST /v1/completions` (a scoring subset) and `POST /v1/embeddings`.

Both go through the same batcher and worker pool as `/v1/logits`: a request becomes one `Work` with one
`OutputSpec`, and the response is built from the worker's tensors.

Completions score, they do not generate: `max_tokens` is 0 (default) or 1, and the one token of `max_tokens: 1` is
the greedy next token (the argmax of the last row). With `echo` and `logprobs` every prompt token gets its
log-probability (`token_logprobs`, null for the first), the `logprobs` most likely tokens of its position
(`top_logprobs`, keyed by decoded text, plus the actual token, as OpenAI does) and its character offset in the
echoed text (`text_offset`). The actual token's entry in `top_logprobs` carries the very float of
`token_logprobs`, so that lm-evaluation-harness's `is_greedy` (`token_logprob == max(top_logprobs.values())`) is
exact. Token texts are decoded in context (a few preceding tokens), so that tokenizers whose decoder strips a
leading space (SentencePiece) still give " word"; a checkpoint without tokenizer.json gives the ids as strings.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from types import SimpleNamespace
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.responses import Response

from .batcher import Work
from .errors import InvalidInput, ServiceError, UnsupportedOption
from .schemas import SCORING_ERRORS, CompletionResponse, EmbeddingResponse, responses
from .serialize import to_json

logger = logging.getLogger("logitserve.openai")

Prompt = str | list[str] | list[list[StrictInt]] | list[StrictInt]

# Tokens of context used to decode a token's text (enough for SentencePiece's leading space and most multi-byte
# characters split over byte tokens).
CONTEXT_WINDOW = 4


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


# --------------------------------------------------------------------------------------------------- plumbing


def prompt_ids(service, prompt, param: str, add_special_tokens: bool):
    """(packed ids, lengths, per-sequence id lists, per-sequence string or None, per-sequence offsets or None)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    texts: list[str | None]
    offsets: list | None
    if prompt and isinstance(prompt[0], str):
        if service.tokenizer is None:
            raise UnsupportedOption(f"this model has no tokenizer.json: send {param} as token ids", param=param)
        encs = service.tokenizer.encode_batch(list(prompt), add_special_tokens=add_special_tokens)
        lists = [e.ids for e in encs]
        texts = list(prompt)
        offsets = [e.offsets for e in encs]
    else:
        lists = list(prompt)
        texts = [None] * len(lists)
        offsets = None
    try:
        ids, lengths = service.sequences(SimpleNamespace(input_ids=lists, inputs=None, add_special_tokens=True))
    except ServiceError as exc:
        exc.param = param
        exc.message = exc.message.replace("input_ids", param)
        raise
    return ids, lengths, lists, texts, offsets


async def run_work(service, request: Request, ids: np.ndarray, lengths: list[int], spec):
    work = Work(ids, lengths, spec, asyncio.get_running_loop().create_future())
    service.batcher.submit(work)
    service.metrics.prompt_tokens.inc(work.num_tokens)
    result = await service.await_result(request, work)
    t = result.batch.tensors(result.group)
    group = result.batch.groups[result.group]
    headers = {"x-queue-time": f"{result.queue_s * 1000:.3f}", "x-inference-time": f"{result.inference_s * 1000:.3f}"}
    return t, group, headers


def _json(obj, headers: dict | None = None) -> Response:
    return Response(to_json(obj), media_type="application/json", headers=headers)


# ------------------------------------------------------------------------------------------------ token texts


class TokenTexts:
    """Decoded text of a token at a position of a sequence, in the context of the tokens before it (cached)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._single: dict[int, str] = {}

    def single(self, token: int) -> str:
        if self.tok is None:
            return str(token)
        text = self._single.get(token)
        if text is None:
            text = self._single[token] = self.tok.decode([token], skip_special_tokens=False)
        return text

    def in_context(self, ids: list[int], queries: list[tuple[int, int]]) -> list[str]:
        """Text of token `cand` placed at position `pos` after ids[:pos], for each (pos, cand)."""
        if self.tok is None:
            return [str(c) for _, c in queries]
        contexts = {pos: ids[max(0, pos - CONTEXT_WINDOW) : pos] for pos, _ in queries}
        ctx_list = [p for p, c in contexts.items() if c]
        prefix = dict(zip(ctx_list, self.tok.decode_batch([contexts[p] for p in ctx_list], skip_special_tokens=False)))
        need = [(p, c) for p, c in queries if contexts[p]]
        fulls = dict(zip(need, self.tok.decode_batch([contexts[p] + [c] for p, c in need], skip_special_tokens=False)))
        out = []
        for p, c in queries:
            if not contexts[p]:
                out.append(self.single(c))
                continue
            full, pre = fulls[(p, c)], prefix[p]
            out.append(full[len(pre):] if full.startswith(pre) and len(full) > len(pre) else self.single(c))
        return out


# ------------------------------------------------------------------------------------------------ completions


def completion_spec(req: CompletionRequest, vocab_size: int):
    from model.outputs import OutputSpec, ReturnLogits

    k = req.logprobs if req.logprobs is not None else 0
    greedy = req.max_tokens == 1
    top_k = min(max(k, 1 if greedy else 0), vocab_size)
    all_rows = bool(req.echo) and req.logprobs is not None
    if not all_rows and not greedy:
        return None  # nothing to compute: the answer is the (echoed) prompt
    return OutputSpec(return_logits=ReturnLogits.ALL if all_rows else ReturnLogits.LAST_TOKEN, logits=False,
                      target_logprobs=all_rows, top_k=top_k)


def _top_dict(cands: list[tuple[str, int, float]], actual_text: str, actual: int, actual_value: float) -> dict[str, float]:
    """The k most likely tokens (text, id, value; descending, the first of equal texts wins) plus the actual token,
    whose value is exactly `actual_value`, the float of `token_logprobs`."""
    top: dict[str, float] = {}
    for text, cid, value in cands:
        if text not in top:
            top[text] = actual_value if cid == actual else value
    if actual_text not in top:
        top[actual_text] = actual_value
    return top


def build_choices(service, req: CompletionRequest, lists, texts, offsets, t, group) -> list[dict]:
    k = req.logprobs if req.logprobs is not None else 0
    greedy = req.max_tokens == 1
    echo = bool(req.echo)
    want_lp = req.logprobs is not None
    tt = TokenTexts(service.tokenizer)
    rows = group["rows"] if group else [0] * len(lists)
    r = 0
    choices = []
    for i, ids in enumerate(lists):
        n = len(ids)
        nrows = rows[i]
        # Texts of the prompt tokens (needed for the echo of id prompts and for logprobs).
        need_prompt_texts = (echo and want_lp) or texts[i] is None
        queries: list[tuple[int, int]] = []
        if need_prompt_texts:
            queries += [(p, ids[p]) for p in range(n)]
        top_ids = top_vals = None
        if group and "top_k_ids" in t:
            top_ids = t["top_k_ids"][r : r + nrows]
            top_vals = t["top_k_logprobs"][r : r + nrows]
        gen_id = gen_lp = None
        if greedy:
            gen_id, gen_lp = int(top_ids[-1][0]), float(top_vals[-1][0])
            queries.append((n, gen_id))
        if want_lp and k:
            first_row = 0 if nrows == n else n - 1  # position of the first returned row
            for j in range(nrows):
                pos = first_row + j + 1  # the token this row predicts
                if pos < n and not echo:
                    continue
                if pos >= n and not greedy:
                    continue
                queries += [(pos, int(c)) for c in top_ids[j][:k]]
        decoded = tt.in_context(ids + ([gen_id] if greedy else []), queries) if queries else []
        qtext = dict(zip(queries, decoded))

        # The prompt's text and each token's character offset in it.
        if texts[i] is not None:
            prompt_text = texts[i]
            prompt_offsets = [int(o[0]) for o in offsets[i]]
        else:
            pieces = [qtext[(p, ids[p])] for p in range(n)]
            prompt_text = "".join(pieces)
            prompt_offsets = np.cumsum([0] + [len(s) for s in pieces[:-1]]).tolist()
        gen_text = qtext[(n, gen_id)] if greedy else ""
        text = (prompt_text if echo else "") + gen_text

        def cands(pos: int, row: int) -> list[tuple[str, int, float]]:
            if not k:
                return []
            return [(qtext[(pos, int(c))], int(c), float(v)) for c, v in zip(top_ids[row][:k], top_vals[row][:k])]

        logprobs = None
        if want_lp:
            tokens: list[str] = []
            token_lps: list = []
            tops: list = []
            text_offset: list[int] = []
            if echo:
                tl = t["target_logprobs"][r : r + nrows]
                tokens += [qtext[(p, ids[p])] for p in range(n)]
                token_lps.append(None)
                tops.append(None)
                for p in range(1, n):
                    value = float(tl[p - 1])
                    token_lps.append(value)
                    tops.append(_top_dict(cands(p, p - 1), tokens[p], ids[p], value))
                text_offset += prompt_offsets
            if greedy:
                tokens.append(gen_text)
                token_lps.append(gen_lp)
                tops.append(_top_dict(cands(n, nrows - 1), gen_text, gen_id, gen_lp))
                text_offset.append(len(prompt_text))
            logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": text_offset}
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": "length"})
        r += nrows
    return choices


async def completions(service, request: Request, body: bytes) -> Response:
    req = service.parse(CompletionRequest, body)
    if req.max_tokens is None:
        req.max_tokens = 0
    if req.max_tokens > 1:
        raise UnsupportedOption(
            f"max_tokens {req.max_tokens}: this server scores prompts and does not generate; use 0 (score the prompt) "
            "or 1 (also the greedy next token)", param="max_tokens")
    if req.stream:
        raise UnsupportedOption("stream is not supported: this server scores prompts", param="stream")
    if (req.n or 1) > 1 or (req.best_of or 1) > 1:
        raise UnsupportedOption("n and best_of must be 1: scoring is deterministic", param="n")
    if req.suffix:
        raise UnsupportedOption("suffix is not supported", param="suffix")
    ids, lengths, lists, texts, offsets = prompt_ids(service, req.prompt, "prompt", req.add_special_tokens)
    spec = completion_spec(req, service.config.vocab_size)
    headers = None
    t, group = {}, None
    if spec is not None:
        t, group, headers = await run_work(service, request, ids, lengths, spec)
    choices = build_choices(service, req, lists, texts, offsets, t, group)
    n = int(ids.shape[0])
    gen = req.max_tokens * len(lists)
    obj = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
           "model": service.model_name, "choices": choices,
           "usage": {"prompt_tokens": n, "completion_tokens": gen, "total_tokens": n + gen}}
    return _json(obj, headers)


# ------------------------------------------------------------------------------------------------- embeddings


async def embeddings(service, request: Request, body: bytes) -> Response:
    from model.outputs import OutputSpec, ReturnHiddenStates

    req = service.parse(EmbeddingRequest, body)
    hidden = service.config.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        raise UnsupportedOption(f"dimensions {req.dimensions}: this model's embeddings have {hidden}",
                                param="dimensions")
    ids, lengths, lists, _, _ = prompt_ids(service, req.input, "input", req.add_special_tokens)
    mean = service.settings.pooling == "mean"
    mode = ReturnHiddenStates.ALL_NORMALIZED if mean else ReturnHiddenStates.LAST_NORMALIZED
    spec = OutputSpec(logits=False, return_hidden_states=mode, layers=(service.config.num_layers,))
    t, group, headers = await run_work(service, request, ids, lengths, spec)
    hs = t["hidden_states"][0]  # [rows, hidden] of the last layer, final norm applied
    data = []
    h = 0
    for i, k in enumerate(group["hidden_rows"]):
        rows = hs[h : h + k].astype(np.float64)
        h += k
        vec = rows.mean(axis=0) if mean else rows[-1]
        norm = float(np.linalg.norm(vec))
        vec = (vec / norm if norm > 0 else vec).astype("<f4")
        emb = base64.b64encode(vec.tobytes()).decode("ascii") if req.encoding_format == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = int(ids.shape[0])
    obj = {"object": "list", "data": data, "model": service.model_name,
           "usage": {"prompt_tokens": n, "total_tokens": n}}
    return _json(obj, headers)


# ------------------------------------------------------------------------------------------------- the routes


def register(app: FastAPI, service) -> None:
    def _doc(model) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/v1/completions", openapi_extra=_doc(CompletionRequest),
              responses=responses(CompletionResponse, *SCORING_ERRORS))
    async def _completions(request: Request):
        return await service.handle(request, "/v1/completions", lambda body: completions(service, request, body))

    @app.post("/v1/embeddings", openapi_extra=_doc(EmbeddingRequest),
              responses=responses(EmbeddingResponse, *SCORING_ERRORS))
    async def _embeddings(request: Request):
        return await service.handle(request, "/v1/embeddings", lambda body: embeddings(service, request, body))


__all__ = ["register", "CompletionRequest", "EmbeddingRequest", "InvalidInput"]
