"""Results history: every evaluation and comparison, one row per scored model variant, in SQLite.

The `results` table lives in the app's database (`workbench.db`, WAL mode) so a restart, the CLI and
the app all see the same history. Each row says what was scored (model, adapters, prompt set, seeds),
how it scored (per-tag stats as JSON, overall = mean of the per-tag accuracies), when, with which
revision of the workbench, and where its files are (source kind, source id, folder).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import pandas as pd

from .config import PROJECT_ROOT, get_settings
from .store import connect_database

logger = logging.getLogger(__name__)

SOURCES = ("eval", "compare", "ipr")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    label TEXT NOT NULL,
    adapters TEXT NOT NULL DEFAULT '[]',
    prompt_set TEXT NOT NULL,
    seeds INTEGER NOT NULL,
    per_tag TEXT NOT NULL,
    overall REAL,
    images INTEGER,
    iteration INTEGER,
    git_revision TEXT NOT NULL,
    source TEXT NOT NULL,
    source_id TEXT NOT NULL DEFAULT '',
    folder TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS results_created ON results (created);
"""

COLUMNS = ["id", "created", "model", "label", "adapters", "prompt_set", "seeds", "overall", "images",
           "iteration", "git_revision", "source", "source_id", "folder", "per_tag"]


@lru_cache(maxsize=1)
def git_revision() -> str:
    """The workbench's commit (`git rev-parse HEAD`), or "unknown" outside a git checkout."""
    try:
        done = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    revision = done.stdout.strip()
    return revision if done.returncode == 0 and revision else "unknown"


def _connect(db_path: Path | None) -> sqlite3.Connection:
    return connect_database(Path(db_path or get_settings().db_path), _SCHEMA)


def adapters_label(adapters: list[dict]) -> str:
    """A short name for a set of adapters: 'base', or each adapter's folder name and weight."""
    if not adapters:
        return "base"
    parts = []
    for adapter in adapters:
        path = Path(adapter["path"])
        # A trainer writes <run>/iteration-k/adapter/: the bare name "adapter" says nothing.
        name = f"{path.parent.name}/{path.name}" if path.name in ("adapter", "") or path.is_file() else path.name
        parts.append(f"{name}:{float(adapter.get('weight', 1.0)):g}")
    return " + ".join(parts)


def record(*, model: str, adapters: list[dict], prompt_set: str, seeds: int, per_tag: dict,
           overall: float | None, source: str, source_id: str = "", folder: str | Path = "",
           label: str | None = None, images: int | None = None, iteration: int | None = None,
           created: float | None = None, db_path: Path | None = None) -> int:
    """Store one scored variant; returns its row id. `per_tag` maps tag -> accuracy or stats dict."""
    if source not in SOURCES:
        raise ValueError(f"unknown results source {source!r} (one of {', '.join(SOURCES)})")
    conn = _connect(db_path)
    try:
        cursor = conn.execute(
            "INSERT INTO results (created, model, label, adapters, prompt_set, seeds, per_tag, overall, images,"
            " iteration, git_revision, source, source_id, folder) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (created or time.time(), model, label or adapters_label(adapters), json.dumps(adapters), prompt_set,
             int(seeds), json.dumps(per_tag), overall, images, iteration, git_revision(), source, source_id,
             str(folder)))
        return int(cursor.lastrowid)
    finally:
        conn.close()


def _accuracy(stats) -> float:
    return float(stats["accuracy"] if isinstance(stats, dict) else stats)


def load(model: str | None = None, source: str | None = None, db_path: Path | None = None) -> pd.DataFrame:
    """The history, oldest first: one row per scored variant, `per_tag` decoded to {tag: accuracy}."""
    conn = _connect(db_path)
    try:
        sql, args = "SELECT * FROM results", []
        where = [(column, value) for column, value in (("model", model), ("source", source)) if value]
        if where:
            sql += " WHERE " + " AND ".join(f"{column} = ?" for column, _ in where)
            args = [value for _, value in where]
        frame = pd.read_sql_query(sql + " ORDER BY created, id", conn, params=args)
    finally:
        conn.close()
    frame["per_tag"] = [{tag: _accuracy(stats) for tag, stats in json.loads(text).items()}
                        for text in frame["per_tag"]]
    frame["created"] = pd.to_datetime(frame["created"], unit="s")
    return frame[COLUMNS]


def wide(frame: pd.DataFrame) -> pd.DataFrame:
    """One column per tag next to the fixed columns: the form a spreadsheet wants."""
    tags = list(dict.fromkeys(tag for per_tag in frame["per_tag"] for tag in per_tag))
    out = frame.drop(columns=["per_tag"]).copy()
    for tag in tags:
        out[tag] = [per_tag.get(tag) for per_tag in frame["per_tag"]]
    return out


def to_csv(path: Path, frame: pd.DataFrame | None = None) -> Path:
    """Write the history (or the given filtered part of it) as CSV with one column per tag."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wide(load() if frame is None else frame).to_csv(path, index=False)
    return path


# --- evaluations: where a benchmark's output folder belongs ----------------------------------------


def eval_source(out_dir: Path) -> tuple[str, str, str | None, int | None]:
    """(source, source id, label, iteration) of a benchmark folder: an IPR run's `eval-base/` or
    `iteration-<k>/eval/`, else a plain evaluation named after its folder."""
    out_dir = Path(out_dir).resolve()
    for run, iteration in ((out_dir.parent, 0), (out_dir.parent.parent, None)):
        config = run / "config.json"
        try:
            if config.is_file() and json.loads(config.read_text()).get("kind") == "ipr":
                if iteration is None:
                    iteration = int(out_dir.parent.name.split("-")[1]) + 1
                return "ipr", run.name, "base" if iteration == 0 else f"iteration {iteration}", iteration
        except (OSError, ValueError, IndexError):
            continue
    return "eval", out_dir.name, None, None


def with_seeds(prompt_set: str, first_seed: int, seeds: int) -> str:
    """The prompt set's name, saying which seeds when they do not start at 0 (the seeds column holds a count)."""
    return f"{prompt_set} (seeds {first_seed}-{first_seed + seeds - 1})" if first_seed else prompt_set


def record_evaluation(config, summary: dict, out_dir: Path) -> int | None:
    """Store a benchmark's scores (called by run_benchmark). A failure is logged, never raised:
    the evaluation itself succeeded, and its scores.json is on disk."""
    try:
        source, source_id, label, iteration = eval_source(out_dir)
        adapters = [{"path": lora.path, "weight": lora.weight} for lora in config.loras]
        prompt_set = with_seeds(Path(config.prompts).name, config.first_seed, config.seeds)
        return record(model=config.model, adapters=adapters, prompt_set=prompt_set,
                      seeds=config.seeds, per_tag=summary["per_tag"], overall=summary["overall"],
                      images=summary.get("images"), source=source, source_id=source_id,
                      folder=Path(out_dir).resolve(), label=label or adapters_label(adapters), iteration=iteration)
    except Exception:  # noqa: BLE001 - see the docstring
        logger.warning("could not record the evaluation in %s in the results history", out_dir, exc_info=True)
        return None
