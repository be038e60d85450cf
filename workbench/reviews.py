"""Human review of IPR relabels: verdicts in SQLite, samples from run folders, training export.

An IPR run folder (`<data>/runs/<run id>/`) holds `iteration-<k>/samples.jsonl`, one sampled image
per line with its original prompt, detections and relabeled prompt (the IPR loop writes it). A
person accepts, edits or rejects each relabel; the verdicts live in the app's SQLite file (table
`reviews`), never in the run folder, so a running loop can keep appending while people review.
`export_imagefolder` turns the reviewed samples into a Hugging Face `imagefolder` dataset that
diffusers' text-to-image training scripts read (`image` + `text` columns, plus `weight`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import InvalidInput
from workbench.jobs import run_names
from workbench.prompt_parser import MAX_PROMPT_CHARS, too_long
from workbench.store import connect_database

STATUSES = ("accepted", "edited", "rejected")
PENDING = "pending"  # no row in the table
SAMPLES_FILE = "samples.jsonl"
_ITERATION_DIR = re.compile(r"^iteration-(\d+)$")
# Keys the Review tab and the export cannot do without; the rest are optional.
_REQUIRED_KEYS = ("id", "image", "prompt")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    run_id TEXT NOT NULL,
    sample_id TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, sample_id)
);
"""


@dataclass(frozen=True)
class Review:
    run_id: str
    sample_id: str
    status: str  # one of STATUSES
    prompt: str | None  # the edited prompt; None unless status == "edited"
    updated_at: float


class ReviewStore:
    """Review verdicts, written at once; one connection shared by threads behind a lock.

    Lives in the same SQLite file as the jobs (its own table); WAL lets the CLI read it meanwhile.
    """

    def __init__(self, db_path: Path):
        self._lock = threading.Lock()
        self._conn = connect_database(db_path, _SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def set(self, run_id: str, sample_id: str, status: str, prompt: str | None = None) -> Review:
        """Record a verdict; an "edited" verdict needs the edited prompt, the others ignore it."""
        if not run_id or not sample_id:
            raise InvalidInput("Choose a run and a sample first.")
        if status not in STATUSES:
            raise InvalidInput(f"Unknown review status '{status}'; use one of {', '.join(STATUSES)}.")
        if status == "edited":
            prompt = " ".join((prompt or "").split())
            if not prompt:
                raise InvalidInput("The edited prompt is empty: write what the image shows, or reject it.")
            if len(prompt) > MAX_PROMPT_CHARS:  # the parser, and so the next iteration, refuses longer ones
                raise InvalidInput(too_long(prompt, "edited prompt"))
        else:
            prompt = None
        review = Review(run_id, sample_id, status, prompt, time.time())
        with self._lock:
            self._conn.execute(
                "INSERT INTO reviews (run_id, sample_id, status, prompt, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, sample_id) DO UPDATE SET status = excluded.status,"
                " prompt = excluded.prompt, updated_at = excluded.updated_at",
                (run_id, sample_id, status, prompt, review.updated_at),
            )
        return review

    def accept_pending(self, run_id: str, sample_ids: list[str]) -> int:
        """Accept those of `sample_ids` that have no verdict yet (edits and rejections stay as they
        are); one transaction. Returns how many were accepted."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                count = 0
                for sample_id in dict.fromkeys(sample_ids):
                    cursor = self._conn.execute(
                        "INSERT OR IGNORE INTO reviews (run_id, sample_id, status, prompt, updated_at)"
                        " VALUES (?, ?, 'accepted', NULL, ?)", (run_id, sample_id, now))
                    count += cursor.rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return count

    def get_all(self, run_id: str) -> dict[str, Review]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM reviews WHERE run_id = ?", (run_id,)).fetchall()
        return {row["sample_id"]: Review(row["run_id"], row["sample_id"], row["status"], row["prompt"],
                                         row["updated_at"]) for row in rows}


# --- run folders -------------------------------------------------------------------------------


def iteration_files(run_dir: Path) -> dict[int, Path]:
    """{iteration: samples.jsonl} of a run folder, in iteration order."""
    run_dir = Path(run_dir)
    found = {}
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            match = _ITERATION_DIR.match(child.name)
            if match and (child / SAMPLES_FILE).is_file():
                found[int(match.group(1))] = child / SAMPLES_FILE
    return dict(sorted(found.items()))


def list_review_runs(runs_dir: Path) -> list[str]:
    """Run ids (folder names) under `runs_dir` that hold IPR samples, newest first."""
    return run_names(runs_dir, lambda folder: bool(iteration_files(folder)))


def load_samples(run_dir: Path, iteration: int | None = None) -> list[dict]:
    """Every sample of the run (all iterations, or one), in file order.

    A line that is not a JSON object with an id, image and prompt, or that repeats an id, is an
    InvalidInput naming the file and line. A last line with no newline that does not parse is
    skipped: the IPR loop is still writing it.
    """
    files = iteration_files(run_dir)
    if iteration is not None:
        path = Path(run_dir) / f"iteration-{int(iteration)}" / SAMPLES_FILE
        if not path.is_file():
            raise InvalidInput(f"{path} does not exist: iteration {iteration} of this run has no samples.")
        files = {int(iteration): path}
    if not files:
        raise InvalidInput(f"{run_dir} holds no iteration-<k>/{SAMPLES_FILE}: it is not an IPR run folder "
                           f"(or its first iteration has not written samples yet).")
    samples: list[dict] = []
    seen: dict[str, str] = {}
    for number, path in files.items():
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        for index, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {index}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as error:
                if index == len(lines) and not text.endswith("\n"):
                    continue  # a line still being appended
                raise InvalidInput(f"{where} is not valid JSON ({error.msg}, column {error.colno}).") from None
            if not isinstance(sample, dict):
                raise InvalidInput(f"{where} is not a JSON object.")
            missing = [key for key in _REQUIRED_KEYS if not sample.get(key)]
            if missing:
                raise InvalidInput(f"{where} lacks {', '.join(missing)}.")
            sample_id = str(sample["id"])
            if sample_id in seen:
                raise InvalidInput(f"{where} repeats sample id '{sample_id}' (first at {seen[sample_id]}).")
            seen[sample_id] = where
            sample.setdefault("iteration", number)
            sample.setdefault("relabeled", sample["prompt"])
            samples.append(sample)
    return samples


def with_reviews(samples: list[dict], reviews: dict[str, Review]) -> list[dict]:
    """Copies of the samples with "status" (pending when unreviewed) and "final_prompt" (the edit
    of an edited sample, else the relabeled prompt)."""
    out = []
    for sample in samples:
        review = reviews.get(str(sample["id"]))
        status = review.status if review else PENDING
        final = review.prompt if review and review.status == "edited" else sample.get("relabeled") or sample["prompt"]
        out.append({**sample, "status": status, "final_prompt": final})
    return out


def _same_prompt(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


# A person's prompt for an image the loop dropped counts like any relabeled pair (IPR's factor).
HUMAN_RELABEL_WEIGHT = 0.5


def trained_on(sample: dict) -> bool:
    """Whether the next iteration trains on a reviewed sample: not when rejected, nor when the loop
    marked it keep=False, unless a person wrote a prompt for it (an edit is a label someone checked
    against the image)."""
    if sample.get("status") == "rejected":
        return False
    return bool(sample.get("keep", True)) or sample.get("status") == "edited"


def training_rows(reviewed_samples: list[dict]) -> list[dict]:
    """Rows to fine-tune on (`trained_on`): rejected samples and samples the loop marked keep=False are
    dropped, unless a person wrote a prompt for them.

    Weights are the IPR loop's; only an edit back to the original prompt gets 1.0, since the image
    then matches what was asked for.
    """
    rows = []
    for sample in reviewed_samples:
        edited = sample.get("status") == "edited"
        if not trained_on(sample):
            continue
        weight = float(sample.get("weight", 1.0))
        if edited and _same_prompt(sample["final_prompt"], sample["prompt"]):
            weight = 1.0
        elif edited and not sample.get("keep", True):
            weight = HUMAN_RELABEL_WEIGHT  # the loop gave it no weight of its own
        rows.append({"file_name": sample["image"], "text": sample["final_prompt"], "weight": weight,
                     "id": str(sample["id"])})
    return rows


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._") or "sample"


def export_imagefolder(run_dir: Path, run_id: str, store: ReviewStore, out_dir: Path) -> Path:
    """Write the reviewed run as an `imagefolder` dataset: images next to metadata.jsonl.

    Load it with `datasets.load_dataset("imagefolder", data_dir=out_dir)` (columns image, text,
    weight, id), e.g. diffusers' train_text_to_image*.py with --train_data_dir and
    --caption_column text. An earlier export in `out_dir` is replaced whole, so no image of a
    since-rejected sample lingers; a folder that is not an export is left alone.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    rows = training_rows(with_reviews(load_samples(run_dir), store.get_all(run_id)))
    if not rows:
        raise InvalidInput("Nothing to export: every sample is rejected or was not kept by the relabeler.")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "metadata.jsonl").is_file():
        raise InvalidInput(f"{out_dir} already holds files that are not an export; choose another folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        records = []
        for row in rows:
            source = run_dir / row["file_name"]
            if not source.is_file():
                raise InvalidInput(f"Image of sample '{row['id']}' is missing: {source}.")
            # Sample ids are unique across iterations; image file names are not.
            name = _safe_name(row["id"]) + (source.suffix or ".png")
            shutil.copy2(source, staging / name)
            records.append({**row, "file_name": name})
        with open(staging / "metadata.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}-{time.time_ns()}")
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
