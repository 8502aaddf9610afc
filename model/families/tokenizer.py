"""The checkpoint's tokenizer, through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(checkpoint: str | Path) -> Tokenizer | None:
    """tokenizer.json of the checkpoint folder, or None when it has none (token-id input only)."""
    path = Path(checkpoint) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None
