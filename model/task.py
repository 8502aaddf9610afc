"""What a checkpoint's head computes: the one name for it, from the architecture registry to `/info`."""

from __future__ import annotations

from enum import Enum


class Task(str, Enum):
    """The served task; its value is the name `/info` reports (a str, so JSON and comparisons read it as one)."""

    CAUSAL_LM = "causal-lm"  # an lm_head over the vocabulary: each row is a next-token distribution
    CLASSIFICATION = "classification"  # a `score` head over num_labels labels (classifiers, reward models)

    @property
    def has_vocabulary(self) -> bool:
        """Whether the head's rows are next-token distributions, which the vocabulary outputs read
        (`OutputKind.needs_vocab`); a classifier's rows are its labels' scores."""
        return self is Task.CAUSAL_LM
