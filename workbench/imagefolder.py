"""Reading a Hugging Face `imagefolder`: metadata.jsonl rows, checked, with one-line errors.

The trainer and RECAP's recaptioner both read user folders; one reader keeps their checks and their
messages the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from workbench.errors import InvalidInput


def read_imagefolder(folder: Path | str, text_field: str = "text", text_hint: str = 'use "" for an empty caption',
                     kind: str = "Data", check_row: Callable[[dict, str], None] | None = None) -> tuple[Path, list[dict]]:
    """(metadata path, rows) of the imagefolder: every row a dict with a "file_name" string naming an existing
    image and a `text_field` string; `check_row(record, where)` may raise for fields of the caller's own.
    Raises InvalidInput (one line) on the first problem, and lists missing images together. An empty folder
    gives an empty list; the caller says what that means for it."""
    folder = Path(folder).expanduser()
    meta = folder / "metadata.jsonl"
    if not folder.is_dir():
        raise InvalidInput(f"{kind} folder not found: {folder}")
    if not meta.is_file():
        raise InvalidInput(f"{folder} has no metadata.jsonl: an imagefolder lists its images there, one JSON line "
                           f'each, e.g. {{"file_name": "images/0001.png", "{text_field}": "..."}}.')
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InvalidInput(f"{meta} is not text (UTF-8 JSON lines): is it the right file?") from None
    rows, missing = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{meta} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidInput(f"{where} is not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or not record["file_name"]:
            raise InvalidInput(f'{where} has no "file_name" string.')
        if not isinstance(record.get(text_field), str):
            raise InvalidInput(f'{where} has no "{text_field}" string ({text_hint}).')
        if check_row is not None:
            check_row(record, where)
        if (folder / record["file_name"]).is_file():
            rows.append(record)
        else:
            missing.append(record["file_name"])
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InvalidInput(f"{len(missing)} image file(s) listed in {meta} are missing: {shown}")
    return meta, rows
