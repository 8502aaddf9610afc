"""OpenAI-compatible endpoints: `POST /v1/completions` (a scoring subset) and `POST /v1/embeddings`.

Both go through the same engine as `/v1/logits`: a request becomes packed inputs and one `OutputSpec`, and the
response is built from the worker's tensors.

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

import base64
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from model.runtime.outputs import (
    HIDDEN_STATES,
    TARGET_LOGPROBS,
    TOP_K_IDS,
    TOP_K_LOGPROBS,
    OutputSpec,
    ReturnHiddenStates,
    ReturnLogits,
)

from ..deps import (
    Authorized,
    EngineDep,
    ServedDep,
    SettingsDep,
    TokenizingDep,
    WorkersAccepting,
    json_body,
    request_body,
)
from ..errors import InvalidInput, UnsupportedOption
from ..inputs import InputFields, PackedInputs, prompt_inputs
from ..responses import budgeted_json, json_response
from ..schemas import (
    SCORING_ERRORS,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    responses,
)
from ..workers import RequestOutputs
from .metered import WorkRoute

router = APIRouter(route_class=WorkRoute, dependencies=[Authorized, WorkersAccepting])

CompletionBody = json_body(CompletionRequest)
EmbeddingBody = json_body(EmbeddingRequest)

# Tokens of context used to decode a token's text (enough for SentencePiece's leading space and most multi-byte
# characters split over byte tokens).
CONTEXT_WINDOW = 4
# Prompt tokens past which an echo with logprobs is streamed, one prompt's choice at a time (~150 bytes of JSON and
# ~1 KB of Python objects per token).
ECHO_STREAM_TOKENS = 4096


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


def completion_spec(req: CompletionRequest, vocab_size: int) -> OutputSpec | None:
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


@dataclass
class _Prompt:
    """One prompt of a completion request and its rows of the outputs (None: not computed or not asked for)."""

    ids: list[int]
    text: str | None  # as sent; None when token ids were sent
    char_offsets: list | None  # each token's (start, end) in `text`
    num_rows: int
    top_ids: np.ndarray | None = None  # int64 [rows, k]
    top_logprobs: np.ndarray | None = None  # float32 [rows, k]
    target_logprobs: np.ndarray | None = None  # float32 [rows]


def iter_choices(tokenizer, req: CompletionRequest, inputs: PackedInputs,
                 outputs: RequestOutputs | None) -> Iterator[dict]:
    """One choice per prompt, from its tokens and (when anything was computed) its outputs; made as they are asked
    for, so that a streamed body holds one prompt's choice at a time."""
    tt = TokenTexts(tokenizer)
    rows = outputs.logit_rows if outputs is not None else [0] * len(inputs.lengths)
    r = 0
    for i, ids in enumerate(inputs.token_lists):
        part = [None if outputs is None or outputs.get(kind) is None else outputs[kind][r : r + rows[i]]
                for kind in (TOP_K_IDS, TOP_K_LOGPROBS, TARGET_LOGPROBS)]
        prompt = _Prompt(ids, inputs.texts[i] if inputs.texts else None,
                         inputs.char_offsets[i] if inputs.texts else None, rows[i], *part)
        yield _choice(tt, req, i, prompt)
        r += rows[i]


def _choice(tt: TokenTexts, req: CompletionRequest, index: int, p: _Prompt) -> dict:
    greedy, n = req.max_tokens == 1, len(p.ids)
    gen_id = gen_lp = None
    if greedy:  # the argmax of the last row
        gen_id, gen_lp = int(p.top_ids[-1][0]), float(p.top_logprobs[-1][0])
    queries = _queries(req, p, gen_id)
    decoded = tt.in_context(p.ids + ([gen_id] if greedy else []), queries) if queries else []
    qtext = dict(zip(queries, decoded))
    # The prompt's text and each token's character offset in it.
    if p.text is not None:
        prompt_text, prompt_offsets = p.text, [int(o[0]) for o in p.char_offsets]
    else:
        pieces = [qtext[(q, p.ids[q])] for q in range(n)]
        prompt_text, prompt_offsets = "".join(pieces), np.cumsum([0] + [len(s) for s in pieces[:-1]]).tolist()
    gen_text = qtext[(n, gen_id)] if greedy else ""
    logprobs = None
    if req.logprobs is not None:
        logprobs = _logprobs(req, p, qtext, prompt_offsets, len(prompt_text), (gen_id, gen_text, gen_lp))
    text = (prompt_text if req.echo else "") + gen_text
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": "length"}


def _queries(req: CompletionRequest, p: _Prompt, gen_id: int | None) -> list[tuple[int, int]]:
    """The (position, token) pairs whose text the choice shows: the prompt's tokens (for the echo of id prompts and
    for logprobs), the greedy token, and the top candidates of each row shown."""
    k, greedy, echo, n = req.logprobs or 0, req.max_tokens == 1, bool(req.echo), len(p.ids)
    queries: list[tuple[int, int]] = []
    if (echo and req.logprobs is not None) or p.text is None:
        queries += [(q, p.ids[q]) for q in range(n)]
    if greedy:
        queries.append((n, gen_id))
    if req.logprobs is not None and k:
        first_row = 0 if p.num_rows == n else n - 1  # position of the first returned row
        for j in range(p.num_rows):
            pos = first_row + j + 1  # the token this row predicts
            if (pos < n and echo) or (pos >= n and greedy):
                queries += [(pos, int(c)) for c in p.top_ids[j][:k]]
    return queries


def _logprobs(req: CompletionRequest, p: _Prompt, qtext: dict, prompt_offsets: list[int], prompt_len: int,
              gen: tuple) -> dict:
    """OpenAI's `logprobs` object of one choice: the echoed prompt's tokens (the first without a log-probability),
    then the greedy token."""
    k, n = req.logprobs or 0, len(p.ids)
    gen_id, gen_text, gen_lp = gen

    def cands(pos: int, row: int) -> list[tuple[str, int, float]]:
        if not k:
            return []
        return [(qtext[(pos, int(c))], int(c), float(v)) for c, v in zip(p.top_ids[row][:k], p.top_logprobs[row][:k])]

    tokens: list[str] = []
    token_lps: list = []
    tops: list = []
    text_offset: list[int] = []
    if req.echo:
        tokens += [qtext[(q, p.ids[q])] for q in range(n)]
        token_lps.append(None)
        tops.append(None)
        for q in range(1, n):
            value = float(p.target_logprobs[q - 1])
            token_lps.append(value)
            tops.append(_top_dict(cands(q, q - 1), tokens[q], p.ids[q], value))
        text_offset += prompt_offsets
    if req.max_tokens == 1:
        tokens.append(gen_text)
        token_lps.append(gen_lp)
        tops.append(_top_dict(cands(n, p.num_rows - 1), gen_text, gen_id, gen_lp))
        text_offset.append(prompt_len)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": text_offset}


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest),
             responses=responses(CompletionResponse, *SCORING_ERRORS))
async def completions(req: CompletionBody, request: Request, served: ServedDep, engine: EngineDep,
                      tokenizing: TokenizingDep) -> Response:
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
    inputs = await tokenizing.pack(served, prompt_inputs(req.prompt, req.add_special_tokens),
                                   InputFields("prompt", "prompt"))
    spec = completion_spec(req, served.config.vocab_size)
    if spec is None:
        return json_response(_completion(served, req, inputs, list(iter_choices(served.tokenizer, req, inputs, None))))
    with await engine.score(inputs, spec, request.receive) as scored:
        body = _completion(served, req, inputs, iter_choices(served.tokenizer, req, inputs, scored.outputs))
        # Echoed log-probabilities of long prompts are large (a dict of top tokens per token): streamed a prompt at
        # a time above the threshold.
        streamed = req.logprobs is not None and bool(req.echo) and inputs.num_tokens > ECHO_STREAM_TOKENS
        return budgeted_json(body, scored, streamed=streamed)


def _completion(served, req: CompletionRequest, inputs: PackedInputs, choices) -> dict:
    n = inputs.num_tokens
    gen = req.max_tokens * len(inputs.lengths)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": n, "completion_tokens": gen, "total_tokens": n + gen}}


# ------------------------------------------------------------------------------------------------- embeddings


@router.post("/v1/embeddings", openapi_extra=request_body(EmbeddingRequest),
             responses=responses(EmbeddingResponse, *SCORING_ERRORS))
async def embeddings(req: EmbeddingBody, request: Request, served: ServedDep, engine: EngineDep,
                     settings: SettingsDep, tokenizing: TokenizingDep) -> Response:
    hidden = served.config.hidden_size
    if req.dimensions is not None and req.dimensions > hidden:
        raise InvalidInput(f"dimensions {req.dimensions} is larger than this model's hidden size {hidden}",
                           param="dimensions")
    inputs = await tokenizing.pack(served, prompt_inputs(req.input, req.add_special_tokens),
                                   InputFields("input", "input"))
    mean = settings.pooling == "mean"
    mode = ReturnHiddenStates.ALL_NORMALIZED if mean else ReturnHiddenStates.LAST_NORMALIZED
    spec = OutputSpec(logits=False, return_hidden_states=mode, layers=(served.config.num_layers,))
    with await engine.score(inputs, spec, request.receive) as scored:
        hs = scored.outputs[HIDDEN_STATES][0]  # [rows, hidden] of the last layer, final norm applied
        data = []
        h = 0
        for i, k in enumerate(scored.outputs.hidden_rows):
            rows = hs[h : h + k].astype(np.float64)  # a copy: the vectors outlive the results
            h += k
            vec = rows.mean(axis=0) if mean else rows[-1]
            vec = vec[: req.dimensions]  # Matryoshka: the first components, normalized below
            norm = float(np.linalg.norm(vec))
            vec = (vec / norm if norm > 0 else vec).astype("<f4")
            emb = base64.b64encode(vec.tobytes()).decode("ascii") if req.encoding_format == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        headers = scored.timing_headers
    n = inputs.num_tokens
    return json_response({"object": "list", "data": data, "model": served.name,
                          "usage": {"prompt_tokens": n, "total_tokens": n}}, headers=headers)
