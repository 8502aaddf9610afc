"""What the front end knows of the served model without a worker: its configuration, tokenizer and limits. Read
once in `create_app` (cheap), so that every request is validated before anything reaches a worker."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.task import Task

from .chat import ChatTemplate, SpecialTokens, prepare_tokenizer
from .rerankers import make_reranker
from .settings import Settings


@dataclass
class ServedModel:
    checkpoint: str  # resolved folder
    name: str  # the id clients see (--served-model-name, else the folder's name)
    config: object  # model.families.config.ModelConfig
    tokenizer: object | None  # tokenizers.Tokenizer, None without tokenizer.json; encodes as transformers' does
    max_seq_len: int
    chat_template: object | None = None  # service.chat.ChatTemplate, None when the checkpoint has none
    special_tokens: object | None = None  # service.chat.SpecialTokens
    reranker: object | None = None  # service.rerankers.Reranker, None when /v1/rerank is not served
    task: Task = Task.CAUSAL_LM
    num_labels: int | None = None  # a classifier's outputs per sequence
    id2label: dict[int, str] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def load(cls, settings: Settings) -> ServedModel:
        from model.families.config import ModelConfig
        from model.families.tokenizer import load_tokenizer

        if not settings.model:
            raise ValueError("settings.model must name a checkpoint folder")
        checkpoint = str(Path(settings.model).resolve())
        config = ModelConfig.from_pretrained(checkpoint)
        head = read_head(checkpoint, config)
        # One tokenizer for every path (text inputs, chat, rerank prompts), encoding as transformers' does.
        special_tokens = SpecialTokens.from_checkpoint(checkpoint)
        tokenizer = load_tokenizer(checkpoint)
        if tokenizer is not None:
            prepare_tokenizer(tokenizer, special_tokens)
        reranker = None
        if tokenizer is not None and (settings.reranker is not None or (head.task == Task.CLASSIFICATION
                                                                        and head.num_labels == 1)):
            reranker = make_reranker(settings.reranker, tokenizer, special_tokens)
        return cls(checkpoint=checkpoint, name=settings.served_model_name or Path(checkpoint).name, config=config,
                   tokenizer=tokenizer, max_seq_len=settings.max_seq_len or config.max_position_embeddings,
                   chat_template=ChatTemplate.from_checkpoint(checkpoint, special_tokens),
                   special_tokens=special_tokens, reranker=reranker, task=head.task, num_labels=head.num_labels,
                   id2label=head.id2label)


@dataclass(frozen=True)
class ServedHead:
    """What the checkpoint's head computes: the task and, for a classifier, its labels."""

    task: Task
    num_labels: int | None = None
    id2label: dict[int, str] = field(default_factory=dict)


def read_head(checkpoint: str, config) -> ServedHead:
    """The served task, from ModelConfig.task / num_labels / id2label where the model side provides them, else
    from config.json as transformers reads it (architectures[0] ending in ForSequenceClassification; num_labels
    is len(id2label), 2 when neither is given)."""
    task = getattr(config, "task", None)
    if task is not None:
        task = Task(task)
        num_labels = getattr(config, "num_labels", None) if task == Task.CLASSIFICATION else None
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        return ServedHead(task, num_labels, id2label)
    raw = json.loads((Path(checkpoint) / "config.json").read_text())
    arch = (raw.get("architectures") or [""])[0]
    if not arch.endswith("ForSequenceClassification"):
        return ServedHead(Task.CAUSAL_LM)
    id2label = {int(k): str(v) for k, v in (raw.get("id2label") or {}).items()}
    num_labels = raw.get("num_labels") or len(id2label) or 2
    if not id2label:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    return ServedHead(Task.CLASSIFICATION, num_labels, id2label)
