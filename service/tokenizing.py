"""Tokenization and chat-template rendering off the event loop, with their limits.

Turning text into ids takes time in proportion to the text (seconds for megabytes), and the event loop serves every
other request meanwhile, `/health` included. So a request's text is tokenized (and its messages rendered) in a
small thread pool: the tokenizers library releases the GIL in `encode_batch`, and what still holds it (making the
id lists, rendering a template) does so in short steps that the event loop's thread interleaves with. A process
pool would keep the GIL out entirely, but it pays to pickle every text there and every id list back, and each
process holds its own tokenizer; measured on /tokenize, the threads kept /health's p99 under the bar (see
docs/reliability.md).

Limits, both the whole queue's (`--max-queue-tokens`, which no request can exceed: it would never be admitted):
- before tokenizing, a request's characters: at most the token limit times the longest token of the vocabulary
  (a text with more characters cannot have fewer tokens), so that no text is tokenized only to be refused;
- after, its tokens (413 either way, naming the limit).
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from .errors import PayloadTooLarge
from .inputs import SCORING_FIELDS, InputFields, PackedInputs, RequestInputs, pack_inputs
from .served import ServedModel
from .settings import Settings

T = TypeVar("T")


def queue_limit_error(tokens: int, limit: int, param: str | None = None) -> PayloadTooLarge:
    """A request that would never fit the queue, even empty."""
    return PayloadTooLarge(f"this request has {tokens} tokens, more than the whole queue holds (--max-queue-tokens "
                           f"{limit}); split it", param=param)


def text_chars(value: Any) -> int:
    """Characters of every string in a request's texts or messages (contents, names, tool calls)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_chars(v) for v in value)
    return 0


@functools.lru_cache(maxsize=8)
def longest_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest token (byte-level vocabularies write one character per byte, so this
    bounds the characters one token covers)."""
    return max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)


class TokenizingPool:
    """The app's tokenizing threads (`app.state.tokenizing`) and the request limits they apply."""

    def __init__(self, settings: Settings, threads: int | None = None):
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.max_tokens = settings.effective_max_queue_tokens
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="logitserve-tokenize")
        # Requests wait here, not in the executor's unbounded queue: at most one job per thread is handed over.
        self._slots: asyncio.Semaphore | None = None

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on a tokenizing thread; its exception is raised here."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def max_chars(self, tokenizer) -> int:
        return self.max_tokens * longest_token_chars(tokenizer)

    def check_chars(self, tokenizer, chars: int, param: str | None) -> None:
        if tokenizer is None:
            return  # refused by pack_inputs: no tokenizer
        limit = self.max_chars(tokenizer)
        if chars > limit:
            raise PayloadTooLarge(
                f"this request's text has {chars} characters, more than the server tokenizes for one request "
                f"({limit}: --max-queue-tokens {self.max_tokens} tokens of at most {limit // self.max_tokens} "
                "characters each); split it", param=param)

    def check_tokens(self, tokens: int, param: str | None) -> None:
        if tokens > self.max_tokens:
            raise queue_limit_error(tokens, self.max_tokens, param)

    async def pack(self, served: ServedModel, sent: RequestInputs, fields: InputFields = SCORING_FIELDS
                   ) -> PackedInputs:
        """`pack_inputs` on a tokenizing thread, within the request limits."""
        if sent.texts is not None:
            self.check_chars(served.tokenizer, text_chars(sent.texts), fields.text)
        if sent.conversations is not None:
            self.check_chars(served.tokenizer, text_chars(sent.conversations), fields.messages)
        if sent.token_ids is not None:
            self.check_tokens(sum(len(ids) for ids in sent.token_ids if isinstance(ids, list)), fields.ids)
        inputs = await self.run(pack_inputs, served, sent, fields)
        param = fields.text if sent.texts is not None else fields.messages
        self.check_tokens(inputs.num_tokens, param)
        return inputs
