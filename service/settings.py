"""Serve settings: the one declaration of every `logitserve serve` option. Each field is read from
`LOGITSERVE_<FIELD>`; fields marked as flags are also `--<field-with-dashes>` options, generated from here
(name, type, default and help text) by `service.cli`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def flag(default: Any, description: str, metavar: str | None = None, **constraints: Any) -> Any:
    """A setting that is also a command-line flag of `logitserve serve`."""
    return Field(default, description=description, json_schema_extra={"flag": True, "metavar": metavar},
                 **constraints)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOGITSERVE_", extra="ignore", protected_namespaces=())

    # The public flags of docs/api.md.
    model: str | None = flag(None, "checkpoint folder, .gguf file or Hub id org/name (default: the embedded default "
                                   "model)", "PATH")
    tp: int = flag(1, "tensor-parallel degree (processes per replica)", "N", ge=1)
    replicas: int = flag(1, "independent model replicas", "R", ge=1)
    device: str = flag("cpu", "cpu or cuda (cuda:N for one device)", "cpu|cuda")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = flag(
        "auto", "weights' dtype: auto is the checkpoint's on CUDA and float32 on CPU")
    host: str = flag("127.0.0.1", "bind address", "HOST")
    port: int = flag(8000, "port", "PORT", ge=0, le=65535)
    max_batch_tokens: int = flag(8192, "token budget of one batch", "N", ge=1)
    max_seq_len: int | None = flag(None, "longest sequence accepted (default: the model's max_position_embeddings)",
                                   "N", ge=1)
    max_queue_tokens: int | None = flag(None, "tokens the queue may hold before 429 (default: 16 x max-batch-tokens)",
                                        "N", ge=1)
    request_timeout: float | None = flag(300.0, "seconds a request may wait for its result before 504", "SECONDS",
                                         gt=0)
    api_key: str | None = flag(None, "require Authorization: Bearer KEY", "KEY")
    pooling: Literal["last", "mean"] = flag("last", "embedding pooling")
    max_request_bytes: int = flag(33554432, "largest request body (413 above)", "N", ge=1)
    max_result_bytes: int = flag(4294967296, "result bytes held for responses not yet sent; new batches wait past "
                                 "it, a larger response alone gets 422", "N", ge=1)
    revision: str | None = flag(None, "branch, tag or commit of a Hub id --model (default: its default branch)", "REV")
    reranker: Literal["qwen3", "bge-gemma"] | None = flag(
        None, "serve /v1/rerank from a causal LM with this family's prompt and yes/no tokens", "qwen3|bge-gemma")
    batch_invariant: Literal["on", "off"] | None = flag(
        None, "a sequence's outputs are the same bits whatever shares its batch (default: on for cpu, off for cuda, "
        "where on is refused)", "on|off")
    prefix_sharing: Literal["on", "off"] = flag(
        "on", "sequences of a batch that start with the same tokens compute them once (where the model supports "
              "it: CPU, SDPA attention; /info reports it)")
    prefix_cache_bytes: int | None = flag(
        None, "bytes each replica's prefix cache may hold (default: 1 GiB where prefix sharing is in force, else 0; "
              "0 turns the cache off; /info reports it)", "N", ge=0)
    allowed_hosts: Annotated[list[str], NoDecode] = flag(
        [], "host names a request's Host header may carry besides the bound address, localhost names, 127.0.0.1 and "
            "::1 (always allowed), comma-separated; *.example.com for subdomains, * for any (default: none more; any "
            "for a server bound to all interfaces)", "HOST,...")
    cors_origins: Annotated[list[str], NoDecode] = flag(
        [], "origins a web page may call the API from, comma-separated (default: none)", "ORIGIN,...")
    auto_truncate: bool = flag(False, "cut an input longer than --max-seq-len to fit (from the right, or as the "
                                      "request's truncation_direction says) instead of refusing it", "")
    default_prompt_name: str | None = flag(
        None, "the sentence-transformers prompt applied to embedding inputs that name none (default: the "
              "checkpoint's default_prompt_name)", "NAME")

    # Operational knobs (environment only).
    served_model_name: str | None = Field(None, description="the model id clients see (default: the folder's name)")
    worker_timeout: float = Field(600.0, gt=0, description="seconds a replica may hold one batch before it counts "
                                                           "as hung and is restarted")
    send_timeout: float = Field(60.0, gt=0, description="seconds one send of a response body may wait for the client "
                                                        "to read before the connection is dropped and its results "
                                                        "released")
    prefix_routing: bool = Field(True, description="with several replicas, send a batch to the replica whose prefix "
                                                   "cache holds its prefixes unless it is clearly busier (off: the "
                                                   "least busy replica, as a baseline)")
    drain_timeout: float = Field(5.0, ge=0, description="seconds SIGTERM lets admitted requests finish before the "
                                                        "batches still running are cancelled (their clients get 503)")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send a request's headers (408 and "
                                                          "the connection closed after)")
    body_timeout: float = Field(60.0, gt=0, description="seconds a client has to send a request's body once its "
                                                        "headers are in (408 after)")
    max_header_bytes: int = Field(65536, ge=1024, description="bytes of a request's line and headers (431 above)")
    max_startup_failures: int = Field(3, ge=1, description="consecutive failed starts of a replica before giving up")
    log_level: str = Field("info", description="uvicorn's log level")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "cpu" and not v.startswith("cuda"):
            raise ValueError("device must be cpu or cuda")
        return v

    @field_validator("batch_invariant")
    @classmethod
    def _invariance_device(cls, v: str | None, info) -> str | None:
        if v == "on" and info.data.get("device", "cpu") != "cpu":
            raise ValueError("batch invariance is implemented for the CPU only (see docs/batch_invariance.md)")
        return v

    @field_validator("api_key", "model", "served_model_name", "default_prompt_name", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, v):
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @property
    def effective_max_queue_tokens(self) -> int:
        return self.max_queue_tokens if self.max_queue_tokens is not None else 16 * self.max_batch_tokens

    @classmethod
    def flags(cls) -> dict[str, Any]:
        """The fields that are command-line flags, by field name (FieldInfo)."""
        return {name: f for name, f in cls.model_fields.items()
                if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("flag")}
