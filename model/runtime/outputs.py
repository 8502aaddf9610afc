"""What a caller can ask of one sequence, and what it gets back.

``ReturnLogits`` and ``ReturnHiddenStates`` carry MAX's names and values. ``OutputSpec`` is the per-sequence
request used by the serving path: sequences in one batch may each ask for different rows and outputs, and one
forward pass of the trunk serves them all.

``OUTPUT_KINDS`` declares every output tensor once: its name (the ``SequenceOutput`` field, the safetensors tensor,
the client's attribute), the request field that asks for it (an ``OutputSpec`` field, the ``/v1/logits`` field of the
same name), whether it reads a next-token vocabulary (then it is a ``RowScores`` field the score reducer computes,
refused for a classifier), which rows it has, its element type on the wire, how sequences concatenate and where the
JSON response puts it. The runner's slicing, the worker's packing, the results budget, both response encoders, the
refusal for classifiers (``VOCABULARY_FIELDS``) and the Python client loop over it; tests hold ``SequenceOutput``,
``RowScores`` and the request schema to it. A new output is one row here, its ``OutputSpec`` and ``SequenceOutput``
fields, the reducer that computes it (``model/runtime/scores.py``) and the request field's validation
(``service/schemas.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from model.task import Task


class ReturnLogits(str, Enum):
    LAST_TOKEN = "last_token"
    VARIABLE = "variable"
    ALL = "all"


class ReturnHiddenStates(str, Enum):
    NONE = "none"
    LAST = "last"
    ALL = "all"
    LAST_NORMALIZED = "last_normalized"
    ALL_NORMALIZED = "all_normalized"

    @property
    def normalized(self) -> bool:
        return self in (ReturnHiddenStates.LAST_NORMALIZED, ReturnHiddenStates.ALL_NORMALIZED)

    @property
    def all_rows(self) -> bool:
        return self in (ReturnHiddenStates.ALL, ReturnHiddenStates.ALL_NORMALIZED)


@dataclass(frozen=True)
class OutputSpec:
    """What one sequence asks for. Rows are chosen by ``return_logits`` / ``return_n_logits``."""

    return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN
    return_n_logits: int = 1
    logits: bool = True  # full-vocabulary float32 logits of each returned row
    target_logprobs: bool = False  # log p(input[p+1] | input[:p+1]) for row p; NaN for the last position
    top_k: int = 0
    vocab_ids: tuple[int, ...] | None = None  # log-softmax at these ids of each returned row, in this order
    target_ranks: bool = False  # 1 + entries scoring strictly above input[p+1] for row p; -1 for the last position
    entropy: bool = False  # entropy (nats) of each returned row's next-token distribution
    return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE
    layers: tuple[int, ...] = (-1,)  # hidden-state layers: 0 = embeddings, i = output of block i, negative from end

    def __post_init__(self) -> None:
        # The modes may come as their string values (a request's fields): hold them as the enums.
        object.__setattr__(self, "return_logits", ReturnLogits(self.return_logits))
        object.__setattr__(self, "return_hidden_states", ReturnHiddenStates(self.return_hidden_states))
        if self.return_n_logits < 1:
            raise ValueError("return_n_logits must be >= 1")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.vocab_ids is not None:
            object.__setattr__(self, "vocab_ids", tuple(self.vocab_ids))
            if not self.vocab_ids:
                raise ValueError("vocab_ids must hold at least one id")

    def amount(self, name: str) -> int:
        """How much the field `name` asks for: a flag 0 or 1, a tuple its length, an int itself, None 0, a hidden-state
        mode 0 for none and 1 otherwise (what `OutputKind.request` and `OutputKind.per_row` read)."""
        value = getattr(self, name)
        if value is None:
            return 0
        if isinstance(value, ReturnHiddenStates):
            return int(value != ReturnHiddenStates.NONE)
        return len(value) if isinstance(value, tuple) else int(value)

    @property
    def needs_targets(self) -> bool:
        """Whether each row's next input token is read (its log-probability or its rank)."""
        return self.target_logprobs or self.target_ranks

    @property
    def needs_vocab(self) -> bool:
        """Whether the lm_head must run on this sequence's rows at all."""
        return bool(self.logits) or bool(self.vocabulary_fields)

    @property
    def vocabulary_fields(self) -> tuple[str, ...]:
        """The fields asked for whose outputs read a next-token distribution (`VOCABULARY_FIELDS`), in table order."""
        return tuple(name for name in VOCABULARY_FIELDS if self.amount(name))

    def unsupported_fields(self, task: Task) -> tuple[str, ...]:
        """The fields asked for that a model of `task` cannot answer: a classifier has no next-token vocabulary."""
        return () if task.has_vocabulary else self.vocabulary_fields

    def logit_rows(self, num_tokens: int) -> range:
        """Positions (0-based, within the sequence) whose logits come back, in order."""
        if self.return_logits == ReturnLogits.ALL:
            return range(num_tokens)
        if self.return_logits == ReturnLogits.VARIABLE:
            # Fixes MAX's flaw: a sequence shorter than n returns only its own rows.
            return range(max(0, num_tokens - self.return_n_logits), num_tokens)
        return range(num_tokens - 1, num_tokens)

    def hidden_rows(self, num_tokens: int) -> range:
        if self.return_hidden_states == ReturnHiddenStates.NONE:
            return range(0)
        if self.return_hidden_states.all_rows:
            return range(num_tokens)
        return range(num_tokens - 1, num_tokens)


@dataclass
class SequenceOutput:
    """Results for one sequence; tensors are on the CPU. Absent outputs are None."""

    positions: torch.Tensor  # int64 [R]: positions of the logit rows
    logits: torch.Tensor | None = None  # float32 [R, vocab]
    target_logprobs: torch.Tensor | None = None  # float32 [R], NaN where there is no next token
    top_k_ids: torch.Tensor | None = None  # int64 [R, k]
    top_k_logprobs: torch.Tensor | None = None  # float32 [R, k]
    vocab_logprobs: torch.Tensor | None = None  # float32 [R, n]
    target_ranks: torch.Tensor | None = None  # int64 [R], -1 where there is no next token
    entropy: torch.Tensor | None = None  # float32 [R]
    hidden_states: torch.Tensor | None = None  # [L, Rh, hidden] in the model's dtype
    hidden_positions: torch.Tensor | None = None  # int64 [Rh]
    layers: tuple[int, ...] = field(default_factory=tuple)  # resolved layer indices of hidden_states


class Rows(str, Enum):
    """Which rows an output has, and so which offsets split it into sequences."""

    LOGIT = "logit"  # the rows chosen by return_logits: `positions`, split by `logit_offsets`
    HIDDEN = "hidden"  # the rows chosen by return_hidden_states: `hidden_positions`, split by `hidden_offsets`

    @property
    def offsets(self) -> str:
        """Name of the int64 [B+1] tensor of the binary response that splits these rows into sequences."""
        return f"{self.value}_offsets"


@dataclass(frozen=True)
class OutputKind:
    """One output tensor of a sequence, as every layer after the runner sees it."""

    name: str  # SequenceOutput field = safetensors tensor = client attribute
    rows: Rows
    dtype: str  # element type on the wire (numpy / torch name), before a request's `dtype` applies
    # The OutputSpec field (= the /v1/logits request field) that asks for it; None: every sequence has it.
    request: str | None = None
    # Read from the next-token distribution: a RowScores field of this name, computed by the score reducer; refused
    # for a model without a vocabulary (a classifier, Task.has_vocabulary).
    needs_vocab: bool = False
    row_dim: int = 0  # the dimension that holds rows: sequences concatenate along it
    json: tuple[str, ...] | None = None  # key path in a /v1/logits JSON item; None: binary only
    json_null: int | None = None  # an integer that JSON writes as null (float NaN is null already)
    follows_dtype: bool = False  # the request's `dtype` (float32 / float16 / bfloat16) applies
    # Elements of one row, as a product of named sizes: an OutputSpec field (a flag counts 0 or 1, a tuple its
    # length, an int itself) or a model size ("columns": the logit width, "hidden"). A kind not asked for is 0.
    # The result budget (service/budget.py) sizes a request from it before any forward runs.
    per_row: tuple[str, ...] = ()

    def asked_by(self, spec: OutputSpec) -> bool:
        return self.request is None or spec.amount(self.request) > 0

    def columns(self, spec: OutputSpec) -> int:
        """Elements per row that the spec sets (its `per_row` factors that are OutputSpec fields): the width a
        score kind's [R, n] rows are cut to for this sequence (a batch's rows are as wide as its widest ask)."""
        width = 1
        for name in self.per_row:
            width *= spec.amount(name)
        return width


# Each kind by name, for the code that reads one (`RequestOutputs[VOCAB_LOGPROBS]`).
POSITIONS = OutputKind("positions", Rows.LOGIT, "int64", json=("positions",))  # [R]
LOGITS = OutputKind("logits", Rows.LOGIT, "float32", request="logits", json=("logits",), follows_dtype=True,
                    per_row=("logits", "columns"))  # [R, vocab] (a classifier's: [R, num_labels])
TARGET_LOGPROBS = OutputKind("target_logprobs", Rows.LOGIT, "float32", request="target_logprobs", needs_vocab=True,
                             json=("target_logprobs",), per_row=("target_logprobs",))  # [R], NaN: no next token
TOP_K_IDS = OutputKind("top_k_ids", Rows.LOGIT, "int64", request="top_k", needs_vocab=True, json=("top_k", "ids"),
                       per_row=("top_k",))  # [R, k]
TOP_K_LOGPROBS = OutputKind("top_k_logprobs", Rows.LOGIT, "float32", request="top_k", needs_vocab=True,
                            json=("top_k", "logprobs"), per_row=("top_k",))  # [R, k]
VOCAB_LOGPROBS = OutputKind("vocab_logprobs", Rows.LOGIT, "float32", request="vocab_ids", needs_vocab=True,
                            json=("vocab_logprobs",), per_row=("vocab_ids",))  # [R, n]
TARGET_RANKS = OutputKind("target_ranks", Rows.LOGIT, "int64", request="target_ranks", needs_vocab=True,
                          json=("target_ranks",), json_null=-1, per_row=("target_ranks",))  # [R], -1: no next token
ENTROPY = OutputKind("entropy", Rows.LOGIT, "float32", request="entropy", needs_vocab=True, json=("entropy",),
                     per_row=("entropy",))  # [R]
HIDDEN_STATES = OutputKind("hidden_states", Rows.HIDDEN, "float32", request="return_hidden_states", row_dim=1,
                           json=("hidden_states",), follows_dtype=True, per_row=("layers", "hidden"))  # [L, Rh, hidden]
HIDDEN_POSITIONS = OutputKind("hidden_positions", Rows.HIDDEN, "int64", request="return_hidden_states")  # [Rh]

# Table order is the order of the JSON keys and of the binary body's tensors (each row set's offsets right after
# its first tensor).
OUTPUT_KINDS: tuple[OutputKind, ...] = (
    POSITIONS, LOGITS, TARGET_LOGPROBS, TOP_K_IDS, TOP_K_LOGPROBS, VOCAB_LOGPROBS, TARGET_RANKS, ENTROPY,
    HIDDEN_STATES, HIDDEN_POSITIONS,
)

# The kinds the score reducer computes from the vocabulary-wide logits (RowScores' fields), and the request fields
# that ask for them: the one list of what a model without a vocabulary refuses.
SCORE_KINDS: tuple[OutputKind, ...] = tuple(k for k in OUTPUT_KINDS if k.needs_vocab)
VOCABULARY_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(k.request for k in SCORE_KINDS))
# Every request field that asks for an output (the /v1/logits body's output fields), in table order.
OUTPUT_REQUEST_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(k.request for k in OUTPUT_KINDS if k.request))
