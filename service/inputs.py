"""A request's inputs as the model takes them: every endpoint turns what it was sent (token ids, text or chat
messages) into packed ids and lengths here, with the one set of checks and error messages of the contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from .errors import InvalidInput, UnsupportedOption
from .packing import pack_ids
from .served import ServedModel


@dataclass(frozen=True)
class InputFields:
    """The request fields that carry token ids and text, named in error messages."""

    ids: str
    text: str
    messages: str | None = None  # the field of chat messages, where the endpoint takes them


SCORING_FIELDS = InputFields("input_ids", "inputs", "messages")


@dataclass(frozen=True)
class Truncation:
    """What a request asked about sequences longer than they may be: TEI's `truncate` and `truncation_direction`,
    vLLM's `truncate_prompt_tokens`, or nothing (`enabled` None: the server's --auto-truncate decides)."""

    enabled: bool | None = None
    direction: Literal["right", "left"] = "right"  # the side tokens are cut from
    max_tokens: int | None = None  # tokens kept; None: --max-seq-len

    def limit(self, model: ServedModel) -> int | None:
        """Tokens a sequence keeps, or None when it is not truncated (a longer one is refused)."""
        if not (self.enabled if self.enabled is not None else model.auto_truncate):
            return None
        return min(self.max_tokens, model.max_seq_len) if self.max_tokens is not None else model.max_seq_len


def truncation_of(truncate: bool | None = None, truncation_direction: str = "right",
                  truncate_prompt_tokens: int | None = None) -> Truncation:
    """A request's truncation fields as one Truncation. vLLM's `truncate_prompt_tokens` k keeps the last k tokens
    (-1: the last max-seq-len), as vLLM's left-side tokenizer truncation does; it wins over TEI's `truncate`."""
    if truncate_prompt_tokens is not None:
        keep = None if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        return Truncation(True, "left", keep)
    return Truncation(truncate, "left" if truncation_direction.lower() == "left" else "right")


# A copy of the served tokenizer per (limit, direction, strategy), configured to truncate as transformers' tokenizer
# truncation does (special tokens kept, a pair's second text cut first); the served tokenizer itself is never
# reconfigured, as requests share it across threads.
_TRUNCATING: dict[tuple[int, int, str, str], tuple[Tokenizer, Tokenizer]] = {}


def truncating_tokenizer(tokenizer: Tokenizer, max_length: int, direction: str,
                         strategy: str = "longest_first") -> Tokenizer:
    key = (id(tokenizer), max_length, direction, strategy)
    cached = _TRUNCATING.get(key)
    if cached is None or cached[0] is not tokenizer:
        copy = Tokenizer.from_str(tokenizer.to_str())
        copy.enable_truncation(max_length, strategy=strategy, direction=direction)
        if len(_TRUNCATING) > 64:
            _TRUNCATING.clear()
        cached = _TRUNCATING[key] = (tokenizer, copy)
    return cached[1]


def cut(ids: list[int], keep: int, direction: str) -> list[int]:
    """The `keep` tokens a truncation keeps of a token list."""
    if len(ids) <= keep:
        return ids
    return ids[len(ids) - keep:] if direction == "left" else ids[:keep]


@dataclass
class RequestInputs:
    """What a request sent: exactly one of the sources is set."""

    token_ids: list[list[int]] | None = None
    texts: list[str] | None = None
    add_special_tokens: bool = True  # for texts
    conversations: list[list[dict]] | None = None  # chat messages, rendered with the checkpoint's template
    add_generation_prompt: bool = False  # for conversations
    truncation: Truncation = field(default_factory=Truncation)


def prompt_inputs(prompt, add_special_tokens: bool = True, truncation: Truncation = Truncation()) -> RequestInputs:
    """OpenAI's `prompt` / `input`: a string, a list of strings, a list of ids, or a list of id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], str):
        return RequestInputs(texts=list(prompt), add_special_tokens=add_special_tokens, truncation=truncation)
    return RequestInputs(token_ids=list(prompt), truncation=truncation)


@dataclass
class PackedInputs:
    ids: np.ndarray  # int64 [T], every sequence packed
    lengths: list[int]
    token_lists: list[list[int]]  # the same ids, one list per sequence
    texts: list[str] | None = None  # the text of each sequence, when text was sent
    char_offsets: list | None = None  # per sequence, each token's (start, end) in its text, when text was sent

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])


def pack_inputs(model: ServedModel, sent: RequestInputs, fields: InputFields = SCORING_FIELDS) -> PackedInputs:
    """Validated token ids of every sequence, packed. Refused (nothing reaches a worker): no or both sources, no
    sequence, an empty sequence, a sequence longer than max-seq-len, an id outside the vocabulary."""
    given = [source is not None for source in (sent.token_ids, sent.texts, sent.conversations)]
    if sum(given) != 1:
        names = f"{fields.ids}, {fields.text} and {fields.messages}" if fields.messages else (
            f"{fields.ids} and {fields.text}")
        raise InvalidInput(f"send exactly one of {names}", param=fields.ids)
    texts = offsets = None
    keep = sent.truncation.limit(model)
    if sent.conversations is not None:
        param = fields.messages
        if model.chat_template is None or model.tokenizer is None:
            raise UnsupportedOption("this model has no chat template (tokenizer_config.json chat_template or "
                                    "chat_template.jinja): send text or token ids", param=param)
        lists = model.chat_template.encode(model.tokenizer, sent.conversations, sent.add_generation_prompt)
        if keep is not None:
            lists = [cut(ids, keep, sent.truncation.direction) for ids in lists]
    elif sent.texts is not None:
        param = fields.text
        if model.tokenizer is None:
            hint = f"{fields.ids} as token ids" if fields.ids == fields.text else fields.ids
            raise UnsupportedOption(f"this model has no tokenizer.json: send {hint}", param=param)
        tok = model.tokenizer if keep is None else truncating_tokenizer(model.tokenizer, keep,
                                                                         sent.truncation.direction)
        encodings = tok.encode_batch(sent.texts, add_special_tokens=sent.add_special_tokens) if sent.texts else []
        lists = [e.ids for e in encodings]
        texts, offsets = list(sent.texts), [e.offsets for e in encodings]
    else:
        param = fields.ids
        lists = sent.token_ids
        if keep is not None and lists:
            lists = [cut(ids, keep, sent.truncation.direction) for ids in lists]
    if not lists:
        raise InvalidInput("no sequence: send at least one", param=param)
    vocab = model.config.vocab_size
    arrays = []
    for i, ids in enumerate(lists):
        if not ids:
            raise InvalidInput(f"sequence {i} is empty", param=param)
        if len(ids) > model.max_seq_len:
            raise InvalidInput(
                f"sequence {i} has {len(ids)} tokens, more than max-seq-len {model.max_seq_len}", param=param)
        try:
            arr = np.array(ids, dtype=np.int64)
        except OverflowError:
            arr = None
        if arr is None or int(arr.min()) < 0 or int(arr.max()) >= vocab:
            pos = next(p for p, t in enumerate(ids) if not 0 <= t < vocab)
            raise InvalidInput(
                f"sequence {i}: token id {ids[pos]} at position {pos} is outside [0, {vocab})", param=param)
        arrays.append(arr)
    packed, _ = pack_ids(arrays)
    return PackedInputs(packed, [len(a) for a in arrays], lists, texts, offsets)
