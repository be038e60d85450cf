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

    @property
    def private_paths(self) -> list[Path]:
        """What inside the data folder the app neither serves nor reads as data: the SQLite database and its
        journals (a process that opens and closes the database file drops the app's locks on it, and the next
        process to close it then deletes the live journal: jobs and reviews written afterwards are lost) and
        the weights users put there."""
        db = self.db_path
        return [db.with_name(db.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")] + [self.weights_dir]

    @property
    def weights_dir(self) -> Path:
        return self.data_dir / "weights"

    def is_private(self, path: Path) -> bool:
        """Whether a resolved path is one of `private_paths` or lies inside one."""
        return any(path == private or private in path.parents for private in self.private_paths)


def get_settings() -> Settings:
    """Read the settings anew each call, so tests and the CLI can change the environment."""
    return Settings(
        data_dir=Path(os.environ.get("WORKBENCH_DATA", "data")).resolve(),
        default_model=os.environ.get("WORKBENCH_DEFAULT_MODEL", "shapes"),
        device=os.environ.get("WORKBENCH_DEVICE") or None,
        dtype=os.environ.get("WORKBENCH_DTYPE") or None,
    )
