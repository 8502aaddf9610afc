"""Request bodies. `/v1/logits` and `/v1/hidden_states` refuse unknown fields; `model` is accepted and ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

DType = Literal["float32", "float16", "bfloat16"]


class ScoringInputs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    input_ids: list[list[StrictInt]] | None = None
    inputs: str | list[str] | None = None
    add_special_tokens: StrictBool = True
    dtype: DType = "float32"


class LogitsRequest(ScoringInputs):
    return_logits: Literal["last_token", "all", "variable"] = "last_token"
    return_n_logits: StrictInt = Field(1, ge=1)
    logits: StrictBool = True
    target_logprobs: StrictBool = False
    top_k: StrictInt = Field(0, ge=0, le=100)
    return_hidden_states: Literal["none", "last", "all", "last_normalized", "all_normalized"] = "none"


class HiddenStatesRequest(ScoringInputs):
    return_hidden_states: Literal["last", "all", "last_normalized", "all_normalized"] = "last"
    layers: list[StrictInt] = Field(default_factory=lambda: [-1], min_length=1)
