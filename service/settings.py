"""Serve settings: every `logitserve serve` flag, also read from `LOGITSERVE_<FLAG>` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOGITSERVE_", extra="ignore", protected_namespaces=())

    # The public flags of API.md.
    model: str | None = None
    tp: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_tokens: int = Field(8192, ge=1)
    max_seq_len: int | None = Field(None, ge=1)  # default: the model's max_position_embeddings
    max_queue_tokens: int | None = Field(None, ge=1)  # default: 16 x max_batch_tokens
    request_timeout: float | None = Field(300.0, gt=0)
    api_key: str | None = None
    pooling: Literal["last", "mean"] = "last"
    max_request_bytes: int = Field(33554432, ge=1)
    revision: str | None = None  # branch, tag or commit of a Hub id --model

    # Operational knobs (environment only).
    served_model_name: str | None = None
    worker_timeout: float = Field(600.0, gt=0)  # a batch held longer than this by a group counts as a hung group
    max_startup_failures: int = Field(3, ge=1)  # consecutive failed group starts before giving up
    log_level: str = "info"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "cpu" and not v.startswith("cuda"):
            raise ValueError("device must be cpu or cuda")
        return v

    @field_validator("api_key", "model", "served_model_name", "revision", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v

    @property
    def effective_max_queue_tokens(self) -> int:
        return self.max_queue_tokens if self.max_queue_tokens is not None else 16 * self.max_batch_tokens
