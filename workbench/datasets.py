"""Datasets under the data folder: where they live, the one check that keeps every path inside the data
folder, finding and paging imagefolders, and the prompt sets the Data tab writes.

    datasets/<name>/metadata.jsonl            imagefolders made or recaptioned in the app
    datasets/skill-prompts-<job id>/          a prompt set: config.json, <skill>.json per skill, prompts.jsonl
    runs/<run>/.../metadata.jsonl             imagefolders inside runs (SELMA's data/<skill>/, RECAP's
                                              recaptioned/ and train/, IPR's iteration-<k>/train/)

The app reads and serves files from its data folder only: a path the page sends is resolved (links
included) and refused unless it lies inside that folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import get_settings
from .errors import InvalidInput
from .store import walk_folders

DATASETS_FOLDER = "datasets"
PROMPT_SET_PREFIX = "skill-prompts-"
PROMPT_SET_KIND = "skill_prompts"
SEARCH_DEPTH = 4  # runs/<run>/iteration-<k>/train is 3 levels below runs/
SKIPPED_FOLDERS = {"images", "checkpoints", "adapter", "pipeline"}  # hold no metadata.jsonl of their own


def data_dir() -> Path:
    return get_settings().data_dir.resolve()


def datasets_dir() -> Path:
    return data_dir() / DATASETS_FOLDER


def inside_data_folder(path: str | Path) -> Path:
    """The resolved path when it lies inside the data folder (relative paths are read from there), else
    InvalidInput: the workbench reads and serves no file outside its data folder."""
    text = str(path or "").strip()
    if not text:
        raise InvalidInput("Give a folder inside the data folder.")
    root = data_dir()
    candidate = Path(text).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise InvalidInput(f"'{text}' is outside the data folder ({root}); the workbench reads and serves files from "
                           f"its data folder only. Copy the dataset into {root / DATASETS_FOLDER} first.")
    return resolved


def imagefolder(path: str | Path, images_inside: bool = True) -> Path:
    """An imagefolder (a folder with metadata.jsonl) inside the data folder, or InvalidInput saying why not.

    With `images_inside` (for folders a job will read or copy) every row's image must lie inside the data
    folder too: a metadata.jsonl naming "../../outside.png" would otherwise bring that file into the data
    folder, where the app serves it. Browsing passes False: it shows no image outside (`row_image`)."""
    folder = inside_data_folder(path)
    if not folder.is_dir():
        raise InvalidInput(f"'{path}' is not an imagefolder: there is no folder {folder}.")
    if not (folder / "metadata.jsonl").is_file():
        raise InvalidInput(f"'{path}' is not an imagefolder: {folder} has no metadata.jsonl.")
    if images_inside:
        root, settings = data_dir(), get_settings()
        for number, row in enumerate(read_rows(folder), 1):
            name = row.get("file_name")
            if not isinstance(name, str) or not name:
                continue
            path = (folder / name).resolve()
            if root not in path.parents:
                raise InvalidInput(f"Row {number} of {folder / 'metadata.jsonl'} names an image outside the data "
                                   f"folder ({name}); the workbench reads no file outside {root}. Copy the images "
                                   "into the dataset's folder and name them relative to it.")
            if settings.is_private(path):
                raise InvalidInput(f"Row {number} of {folder / 'metadata.jsonl'} names {name}, which is the "
                                   f"workbench's database or its weights folder, not an image of the dataset.")
    return folder


def relative_name(folder: Path) -> str:
    """How the page names a folder: its path below the data folder."""
    return Path(folder).resolve().relative_to(data_dir()).as_posix()


def find_imagefolders() -> list[str]:
    """Imagefolders under datasets/ and inside runs, newest first, named relative to the data folder."""
    found = []
    for root in (datasets_dir(), get_settings().runs_dir):
        for folder, files in walk_folders(root, SKIPPED_FOLDERS, SEARCH_DEPTH):
            if "metadata.jsonl" in files:
                found.append(folder / "metadata.jsonl")
    found.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    return [relative_name(path.parent) for path in found]


def count_rows(folder: Path) -> int:
    with open(Path(folder) / "metadata.jsonl", "rb") as handle:
        return sum(1 for line in handle if line.strip())


def read_rows(folder: Path, start: int = 0, count: int | None = None) -> list[dict]:
    """Rows start .. start+count of an imagefolder's metadata.jsonl (unreadable lines as {"error": ...})."""
    rows = []
    with open(Path(folder) / "metadata.jsonl", encoding="utf-8", errors="replace") as handle:  # bytes: bad lines
        lines = (line for line in handle if line.strip())
        for index, line in enumerate(lines):
            if index < start:
                continue
            if count is not None and len(rows) >= count:
                break
            try:
                row = json.loads(line)
            except ValueError as error:
                row = {"error": f"line {index + 1} is not JSON ({error})"}
            rows.append(row if isinstance(row, dict) else {"error": f"line {index + 1} is no object"})
    return rows


def row_image(folder: Path, row: dict) -> Path | None:
    """The image file of a row (its file_name, relative to the folder or absolute), when it exists inside
    the data folder and is none of its private paths; None otherwise, so no file the app does not serve is
    ever shown (or opened: reading the database file would drop the app's locks on it)."""
    name = row.get("file_name")
    if not isinstance(name, str) or not name:
        return None
    path = (Path(folder) / name).resolve()
    root = data_dir()
    return path if root in path.parents and not get_settings().is_private(path) and path.is_file() else None


# --- generated datasets ------------------------------------------------------------------------------


def shapes_dataset_folder(images: int, seed: int) -> Path:
    """Where the Data tab renders the shapes world's alt-text dataset of these settings."""
    return datasets_dir() / f"shapes-alt-text-{images}-seed{seed}"


def recaption_folder(source: Path, captioner: str) -> Path:
    """Where the recaption of `source` by `captioner` goes: one fixed folder, so running it again continues it."""
    name = relative_name(source)
    name = name.removeprefix(DATASETS_FOLDER + "/")
    return datasets_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name).strip('-')}-recap-{captioner}"


def prompt_set_folder(name: str) -> Path:
    """A prompt set's folder by its name (only plain folder names under datasets/)."""
    name = Path(str(name or "")).name
    if not name.startswith(PROMPT_SET_PREFIX):
        raise InvalidInput(f"'{name}' is not a prompt set (their folders are named {PROMPT_SET_PREFIX}<id>).")
    return datasets_dir() / name


def prompt_sets() -> list[str]:
    """Saved prompt sets, newest first."""
    root = datasets_dir()
    found = [p for p in root.glob(PROMPT_SET_PREFIX + "*") if (p / "config.json").is_file()] if root.is_dir() else []
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def load_prompt_set(name: str) -> tuple[dict, list[dict]]:
    """(settings, per-skill records {"skill", "prompts", "stats"}) of a saved prompt set, skills in their order."""
    folder = prompt_set_folder(name)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise InvalidInput(f"The prompt set '{folder.name}' is gone or unreadable.") from None
    records = []
    for skill in config.get("skills") or []:
        path = folder / f"{skill}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
    return config, records
