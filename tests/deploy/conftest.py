from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def serve_setting_env_names() -> set[str]:
    """LOGITSERVE_<FIELD> for every field of the serve settings (flags of docs/api.md plus operational knobs)."""
    from service.settings import Settings

    return {f"LOGITSERVE_{name.upper()}" for name in Settings.model_fields}
