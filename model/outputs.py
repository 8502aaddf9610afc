"""What a caller can ask of one sequence, and what it gets back.

``ReturnLogits`` and ``ReturnHiddenStates`` carry MAX's names and values. ``OutputSpec`` is the per-sequence
request used by the serving path: sequences in one batch may each ask for different rows and outputs, and one
forward pass of the trunk serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


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
    return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE
    layers: tuple[int, ...] = (-1,)  # hidden-state layers: 0 = embeddings, i = output of block i, negative from end

    def __post_init__(self) -> None:
        if self.return_n_logits < 1:
            raise ValueError("return_n_logits must be >= 1")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def needs_vocab(self) -> bool:
        """Whether the lm_head must run on this sequence's rows at all."""
        return self.logits or self.target_logprobs or self.top_k > 0

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
    hidden_states: torch.Tensor | None = None  # [L, Rh, hidden] in the model's dtype
    hidden_positions: torch.Tensor | None = None  # int64 [Rh]
    layers: tuple[int, ...] = field(default_factory=tuple)  # resolved layer indices of hidden_states
