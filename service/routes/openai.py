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

from ..deps import Authorized, EngineDep, ServedDep, SettingsDep, WorkersAccepting, json_body, request_body
from ..errors import InvalidInput, UnsupportedOption
from ..inputs import InputFields, PackedInputs, pack_inputs, prompt_inputs
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


def iter_choices(tokenizer, req: CompletionRequest, inputs: PackedInputs,
                 outputs: RequestOutputs | None) -> Iterator[dict]:
    """One choice per prompt, from its tokens and (when anything was computed) its outputs; made as they are asked
    for, so that a streamed body holds one prompt's choice at a time."""
    k = req.logprobs if req.logprobs is not None else 0
    greedy = req.max_tokens == 1
    echo = bool(req.echo)
    want_lp = req.logprobs is not None
    tt = TokenTexts(tokenizer)
    lists, texts, offsets = inputs.token_lists, inputs.texts or [None] * len(inputs.lengths), inputs.char_offsets
    rows = outputs.logit_rows if outputs is not None else [0] * len(lists)
    r = 0
    for i, ids in enumerate(lists):
        n = len(ids)
        nrows = rows[i]
        # Texts of the prompt tokens (needed for the echo of id prompts and for logprobs).
        need_prompt_texts = (echo and want_lp) or texts[i] is None
        queries: list[tuple[int, int]] = []
        if need_prompt_texts:
            queries += [(p, ids[p]) for p in range(n)]
        top_ids = top_vals = None
        if outputs is not None and outputs.get(TOP_K_IDS) is not None:
            top_ids = outputs[TOP_K_IDS][r : r + nrows]
            top_vals = outputs[TOP_K_LOGPROBS][r : r + nrows]
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
                tl = outputs[TARGET_LOGPROBS][r : r + nrows]
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
        yield {"index": i, "text": text, "logprobs": logprobs, "finish_reason": "length"}
        r += nrows


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest),
             responses=responses(CompletionResponse, *SCORING_ERRORS))
async def completions(req: CompletionBody, request: Request, served: ServedDep, engine: EngineDep) -> Response:
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
    inputs = pack_inputs(served, prompt_inputs(req.prompt, req.add_special_tokens), InputFields("prompt", "prompt"))
    spec = completion_spec(req, served.config.vocab_size)
    scored = None
    if spec is not None:
        scored = await engine.score(inputs, spec, request.receive)
    choices = iter_choices(served.tokenizer, req, inputs, scored.outputs if scored is not None else None)
    n = inputs.num_tokens
    gen = req.max_tokens * len(inputs.lengths)
    body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": n, "completion_tokens": gen, "total_tokens": n + gen}}
    if scored is None:
        return json_response({**body, "choices": list(choices)})
    # Echoed log-probabilities of long prompts are large (a dict of top tokens per token): streamed a prompt at a
    # time above the threshold.
    streamed = req.logprobs is not None and bool(req.echo) and n > ECHO_STREAM_TOKENS
    return budgeted_json(body, scored, streamed=streamed)


# ------------------------------------------------------------------------------------------------- embeddings


@router.post("/v1/embeddings", openapi_extra=request_body(EmbeddingRequest),
             responses=responses(EmbeddingResponse, *SCORING_ERRORS))
async def embeddings(req: EmbeddingBody, request: Request, served: ServedDep, engine: EngineDep,
                     settings: SettingsDep) -> Response:
    hidden = served.config.hidden_size
    if req.dimensions is not None and req.dimensions > hidden:
        raise InvalidInput(f"dimensions {req.dimensions} is larger than this model's hidden size {hidden}",
                           param="dimensions")
    inputs = pack_inputs(served, prompt_inputs(req.input, req.add_special_tokens), InputFields("input", "input"))
    mean = settings.pooling == "mean"
    mode = ReturnHiddenStates.ALL_NORMALIZED if mean else ReturnHiddenStates.LAST_NORMALIZED
    spec = OutputSpec(logits=False, return_hidden_states=mode, layers=(served.config.num_layers,))
    scored = await engine.score(inputs, spec, request.receive)
    hs = scored.outputs[HIDDEN_STATES][0]  # [rows, hidden] of the last layer, final norm applied
    data = []
    h = 0
    for i, k in enumerate(scored.outputs.hidden_rows):
        rows = hs[h : h + k].astype(np.float64)
        h += k
        vec = rows.mean(axis=0) if mean else rows[-1]
        vec = vec[: req.dimensions]  # Matryoshka: the first components, normalized below
        norm = float(np.linalg.norm(vec))
        vec = (vec / norm if norm > 0 else vec).astype("<f4")
        emb = base64.b64encode(vec.tobytes()).decode("ascii") if req.encoding_format == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    scored.release()  # the vectors are copies: the results are no longer read
    n = inputs.num_tokens
    return json_response({"object": "list", "data": data, "model": served.name,
                          "usage": {"prompt_tokens": n, "total_tokens": n}}, headers=scored.timing_headers)
