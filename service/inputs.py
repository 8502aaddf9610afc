"""A request's inputs as the model takes them: every endpoint turns what it was sent (token ids, text or chat
messages) into packed ids and lengths here, with the one set of checks and error messages of the contract."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


@dataclass
class RequestInputs:
    """What a request sent: exactly one of the sources is set."""

    token_ids: list[list[int]] | None = None
    texts: list[str] | None = None
    add_special_tokens: bool = True  # for texts
    conversations: list[list[dict]] | None = None  # chat messages, rendered with the checkpoint's template
    add_generation_prompt: bool = False  # for conversations


def prompt_inputs(prompt, add_special_tokens: bool = True) -> RequestInputs:
    """OpenAI's `prompt` / `input`: a string, a list of strings, a list of ids, or a list of id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], str):
        return RequestInputs(texts=list(prompt), add_special_tokens=add_special_tokens)
    return RequestInputs(token_ids=list(prompt))


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
    if sent.conversations is not None:
        param = fields.messages
        if model.chat_template is None or model.tokenizer is None:
            raise UnsupportedOption("this model has no chat template (tokenizer_config.json chat_template or "
                                    "chat_template.jinja): send text or token ids", param=param)
        lists = model.chat_template.encode(model.tokenizer, sent.conversations, sent.add_generation_prompt)
    elif sent.texts is not None:
        param = fields.text
        if model.tokenizer is None:
            hint = f"{fields.ids} as token ids" if fields.ids == fields.text else fields.ids
            raise UnsupportedOption(f"this model has no tokenizer.json: send {hint}", param=param)
        encodings = model.tokenizer.encode_batch(sent.texts, add_special_tokens=sent.add_special_tokens) if sent.texts else []
        lists = [e.ids for e in encodings]
        texts, offsets = list(sent.texts), [e.offsets for e in encodings]
    else:
        param = fields.ids
        lists = sent.token_ids
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
