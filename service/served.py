"""What the front end knows of the served model without a worker: its configuration, tokenizer and limits. Read
once in `create_app` (cheap), so that every request is validated before anything reaches a worker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .settings import Settings


@dataclass
class ServedModel:
    checkpoint: str  # resolved folder
    name: str  # the id clients see (--served-model-name, else the folder's name)
    config: object  # model.config.ModelConfig
    tokenizer: object | None  # tokenizers.Tokenizer, None without tokenizer.json
    max_seq_len: int
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def load(cls, settings: Settings) -> ServedModel:
        from model.config import ModelConfig
        from model.tokenizer import load_tokenizer

        if not settings.model:
            raise ValueError("settings.model must name a checkpoint folder")
        checkpoint = str(Path(settings.model).resolve())
        config = ModelConfig.from_pretrained(checkpoint)
        return cls(checkpoint=checkpoint, name=settings.served_model_name or Path(checkpoint).name, config=config,
                   tokenizer=load_tokenizer(checkpoint),
                   max_seq_len=settings.max_seq_len or config.max_position_embeddings)
