"""How `/v1/rerank` turns a query and its documents into token ids, and a model's output into a relevance score.

Three kinds of reranker:

- ``qwen3`` (Qwen3-Reranker, a causal LM): the model card's prompt, a system turn with the judging rule, then
  ``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}`` as the user turn and an empty
  thinking block opening the assistant turn; the score is the softmax of the last position's ``no`` and ``yes``
  logits, taken as ``yes`` minus ``no`` (whose sigmoid is that softmax's ``yes`` probability).
- ``bge-gemma`` (BAAI bge-reranker-v2-gemma, a causal LM, as FlagEmbedding's FlagLLMReranker prompts it):
  ``<bos>A: {query}\\nB: {passage}\\n{prompt}``; the score is the last position's ``Yes`` logit.
- a one-label ``*ForSequenceClassification`` checkpoint: the tokenizer's own pair encoding of query and document
  (transformers' ``tokenizer(query, document)``); the score is the head's output.

A causal LM's prompt is rendered as one text and tokenized without adding special tokens: the text carries its own
(bge-gemma's begins with the BOS token, Qwen3's with ``<|im_start|>``). Every reranker's relevance score is the
sigmoid of its raw score unless the request turns the activation off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch
from tokenizers import Tokenizer

from .chat import SpecialTokens
from .errors import InvalidInput, UnsupportedOption

QWEN3_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
QWEN3_PREFIX = f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
QWEN3_BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

BGE_GEMMA_BODY = "A: {query}\nB: {document}\n{instruction}"
BGE_GEMMA_DEFAULT_INSTRUCTION = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by providing "
    "a prediction of either 'Yes' or 'No'."
)


class RerankerKind(str, Enum):
    """The ``--reranker`` choices: causal LMs scored with their family's prompt."""

    QWEN3 = "qwen3"
    BGE_GEMMA = "bge-gemma"


class RerankerSetupError(ValueError):
    """The checkpoint's tokenizer cannot serve this reranker (a yes/no token missing or split): refused at start."""


class Reranker(Protocol):
    # Vocabulary rows read at each prompt's last position, in the order `raw_scores` takes them; empty for a
    # classifier, whose head output is read instead.
    label_token_ids: tuple[int, ...]

    def prompt_ids(self, query: str, documents: Sequence[str], instruction: str | None = None,
                   keep: int | None = None, direction: str = "right") -> list[list[int]]:
        """One id list per document; with `keep`, a prompt longer than `keep` tokens loses tokens of its document
        (from the `direction` side), never of its query."""
        ...

    def raw_scores(self, label_logits: torch.Tensor) -> torch.Tensor:
        """[n, len(label_token_ids)] last-position logits (for a classifier [n, 1] head outputs) -> [n]."""
        ...


def relevance_scores(raw_scores: torch.Tensor, use_activation: bool = True) -> torch.Tensor:
    """The response's ``relevance_score``: the sigmoid of the raw score, or the raw score itself."""
    return torch.sigmoid(raw_scores) if use_activation else raw_scores


def _yes_minus_no(label_logits: torch.Tensor) -> torch.Tensor:
    # [n, 2] logits of (no, yes) -> [n]; sigmoid(yes - no) is softmax([no, yes])[1]
    return label_logits[:, 1] - label_logits[:, 0]


def _first_label(label_logits: torch.Tensor) -> torch.Tensor:
    # [n, 1] -> [n]
    return label_logits[:, 0]


@dataclass(frozen=True)
class PromptReranker:
    """A causal LM that reads a prompt built from query and document and answers with a label token."""

    kind: RerankerKind
    prefix: str  # text before the body (the family's system turn, or the BOS token)
    body: str  # str.format pattern over instruction, query and document
    suffix: str
    default_instruction: str
    label_tokens: tuple[str, ...]
    label_token_ids: tuple[int, ...]
    raw_score: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    tokenizer: Tokenizer = field(repr=False, compare=False)

    def prompt(self, query: str, document: str, instruction: str | None = None) -> str:
        # str.format substitutes the values as they are: braces inside query or document stay text
        instruction = self.default_instruction if instruction is None else instruction
        return self.prefix + self.body.format(instruction=instruction, query=query, document=document) + self.suffix

    def prompt_ids(self, query: str, documents: Sequence[str], instruction: str | None = None,
                   keep: int | None = None, direction: str = "right") -> list[list[int]]:
        texts = [self.prompt(query, document, instruction) for document in documents]
        lists = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []
        if keep is not None:
            lists = [ids if len(ids) <= keep else self._cut_document(query, document, instruction, keep, direction)
                     for ids, document in zip(lists, documents)]
        return lists

    def _cut_document(self, query: str, document: str, instruction: str | None, keep: int,
                      direction: str) -> list[int]:
        """The prompt's ids with its document's tokens cut until the prompt fits `keep` tokens (the document is cut
        as tokens and decoded back into the prompt's text, so a few passes may be needed where tokens merge)."""
        ids = self.tokenizer.encode(self.prompt(query, document, instruction), add_special_tokens=False).ids
        while len(ids) > keep and document:
            doc_ids = self.tokenizer.encode(document, add_special_tokens=False).ids
            left = max(0, len(doc_ids) - (len(ids) - keep))
            kept = doc_ids[len(doc_ids) - left:] if direction == "left" else doc_ids[:left]
            document = self.tokenizer.decode(kept, skip_special_tokens=False) if left else ""
            ids = self.tokenizer.encode(self.prompt(query, document, instruction), add_special_tokens=False).ids
        return ids

    def raw_scores(self, label_logits: torch.Tensor) -> torch.Tensor:
        return self.raw_score(label_logits)


@dataclass(frozen=True)
class PairClassifierReranker:
    """A one-label sequence classifier over the tokenizer's pair encoding of query and document."""

    tokenizer: Tokenizer = field(repr=False, compare=False)
    label_token_ids: tuple[int, ...] = ()

    def prompt_ids(self, query: str, documents: Sequence[str], instruction: str | None = None,
                   keep: int | None = None, direction: str = "right") -> list[list[int]]:
        if instruction is not None:
            raise UnsupportedOption(
                "this reranker is a sequence classifier, whose input has no instruction; instruction applies "
                "under --reranker qwen3|bge-gemma",
                param="instruction",
            )
        # The post-processor adds the checkpoint's special tokens around and between the two. transformers takes an
        # empty document for no pair at all (``text_pair`` is tested for truth) and encodes the query alone: so here.
        inputs = [(query, document) if document else query for document in documents]
        if not inputs:
            return []
        if keep is None:
            return [e.ids for e in self.tokenizer.encode_batch(inputs, add_special_tokens=True)]
        # transformers' truncation="only_second": the document loses tokens, the query none
        from .inputs import truncating_tokenizer

        pairs = truncating_tokenizer(self.tokenizer, keep, direction, "only_second")
        singles = truncating_tokenizer(self.tokenizer, keep, direction)
        lists = []
        for item in inputs:
            try:
                encoding = (pairs.encode(item[0], item[1], add_special_tokens=True) if isinstance(item, tuple)
                            else singles.encode(item, add_special_tokens=True))
                lists.append(encoding.ids)
            except Exception:  # the tokenizers library refuses a pair whose query alone does not fit
                raise InvalidInput(f"the query alone is longer than the {keep} tokens a pair may have",
                                   param="query") from None
        return lists

    def raw_scores(self, label_logits: torch.Tensor) -> torch.Tensor:
        return _first_label(label_logits)


def _single_token_id(tokenizer: Tokenizer, text: str, by_vocabulary: bool, kind: RerankerKind) -> int:
    """The id of a label token, found as the family's own code finds it: Qwen3's by vocabulary entry
    (convert_tokens_to_ids), FlagEmbedding's by encoding the word without special tokens."""
    if by_vocabulary:
        token_id = tokenizer.token_to_id(text)
        if token_id is None:
            raise RerankerSetupError(f"--reranker {kind.value}: the tokenizer has no token {text!r} in its vocabulary")
        return token_id
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1 or tokenizer.decode(ids) != text:  # one token, and not the unknown token
        pieces = [tokenizer.id_to_token(i) for i in ids]
        raise RerankerSetupError(
            f"--reranker {kind.value}: the tokenizer encodes {text!r} as {pieces}; the score reads one token"
        )
    return ids[0]


def _special_token_text(tokenizer: Tokenizer, text: str, kind: RerankerKind) -> str:
    """A special token the prompt writes as text: it must come back as exactly its own id."""
    token_id = tokenizer.token_to_id(text)
    if token_id is None or tokenizer.encode(text, add_special_tokens=False).ids != [token_id]:
        raise RerankerSetupError(
            f"--reranker {kind.value}: the tokenizer does not encode {text!r} as one special token"
        )
    return text


def make_reranker(
    kind: RerankerKind | str | None, tokenizer: Tokenizer, special_tokens: SpecialTokens | None = None
) -> Reranker:
    """The reranker of ``--reranker kind`` over this tokenizer, or the pair classifier when ``kind`` is None.
    ``special_tokens`` supplies bge-gemma's BOS (and pad) tokens. Raises RerankerSetupError when the tokenizer
    cannot serve the family's prompt."""
    if kind is None:
        return PairClassifierReranker(tokenizer=tokenizer)
    kind = RerankerKind(kind)
    if kind is RerankerKind.QWEN3:
        for marker in ("<|im_start|>", "<|im_end|>"):
            _special_token_text(tokenizer, marker, kind)
        labels = ("no", "yes")
        return PromptReranker(
            kind=kind,
            prefix=QWEN3_PREFIX,
            body=QWEN3_BODY,
            suffix=QWEN3_SUFFIX,
            default_instruction=QWEN3_DEFAULT_INSTRUCTION,
            label_tokens=labels,
            label_token_ids=tuple(_single_token_id(tokenizer, label, True, kind) for label in labels),
            raw_score=_yes_minus_no,
            tokenizer=tokenizer,
        )
    # FlagEmbedding starts the prompt with BOS when the tokenizer has one that is not also its pad token.
    named = (special_tokens or SpecialTokens()).by_name
    bos, pad = named.get("bos_token"), named.get("pad_token")
    prefix = _special_token_text(tokenizer, bos, kind) if bos is not None and bos != pad else ""
    return PromptReranker(
        kind=kind,
        prefix=prefix,
        body=BGE_GEMMA_BODY,
        suffix="",
        default_instruction=BGE_GEMMA_DEFAULT_INSTRUCTION,
        label_tokens=("Yes",),
        label_token_ids=(_single_token_id(tokenizer, "Yes", False, kind),),
        raw_score=_first_label,
        tokenizer=tokenizer,
    )
