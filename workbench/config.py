"""Settings from the environment, with defaults that work on a laptop with no GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = PROJECT_ROOT / "assets"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    default_model: str
    device: str | None  # None: pick automatically
    dtype: str | None  # None: pick automatically

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "workbench.db"


def get_settings() -> Settings:
    """Read the settings anew each call, so tests and the CLI can change the environment."""
    return Settings(
        data_dir=Path(os.environ.get("WORKBENCH_DATA", "data")).resolve(),
        default_model=os.environ.get("WORKBENCH_DEFAULT_MODEL", "shapes"),
        device=os.environ.get("WORKBENCH_DEVICE") or None,
        dtype=os.environ.get("WORKBENCH_DTYPE") or None,
    )
