"""Review tab: accept, edit or reject the relabeled prompts of an IPR run, then export them.

Verdicts are written to SQLite the moment a button is pressed (`workbench.reviews`), so nothing is
lost on a restart and a paused IPR run trains on them when it continues. Handlers are plain
functions of (store, inputs) so they are tested without a browser.
"""

from __future__ import annotations

import json
from collections import Counter
from html import escape
from pathlib import Path
from urllib.parse import quote

import gradio as gr
import pandas as pd
from PIL import Image

from ..config import get_settings
from ..errors import InvalidInput, WorkbenchError
from ..perception.base import Detection
from ..prompt_parser import parse_prompt
from ..reviews import (
    PENDING,
    STATUSES,
    ReviewStore,
    export_imagefolder,
    iteration_files,
    list_review_runs,
    load_samples,
    trained_on,
    with_reviews,
)
from ..store import read_jsonl
from .inspect import DIFF_COLORS, annotated, word_diff

TABLE_COLUMNS = ["image", "id", "iter", "status", "original", "relabeled", "edit", "reasons", "trained on"]
ID_COLUMN = TABLE_COLUMNS.index("id")
THUMBNAIL_SIDE = 48  # pixels in the table; the selected sample is shown full size beside it
STATUS_FILTERS = ["all", PENDING, *STATUSES]
ALL = "all"
EXPORT_FOLDER = "export"


NO_RUNS = ("No IPR run has relabeled samples yet: start one in the Train tab (tick *Pause after each relabeling "
           "for a manual review* to review before it trains) or with `python -m pipelines.ipr`, then press Refresh.")


def run_folder(run_id: str | None) -> Path:
    """The folder of a run id; only plain folder names under the runs folder are accepted."""
    if not run_id:
        raise InvalidInput(NO_RUNS if not run_choices() else "Choose an IPR run first (press Refresh if a new run "
                                                             "is missing).")
    if Path(run_id).name != run_id or run_id in (".", ".."):
        raise InvalidInput(f"'{run_id}' is not a run id.")
    folder = get_settings().runs_dir / run_id
    if not iteration_files(folder):
        raise InvalidInput(f"Run '{run_id}' has no relabeled samples (no iteration-<k>/samples.jsonl).")
    return folder


def run_choices() -> list[str]:
    return list_review_runs(get_settings().runs_dir)


def reviewed_samples(store: ReviewStore, run_id: str | None) -> list[dict]:
    return with_reviews(load_samples(run_folder(run_id)), store.get_all(run_id))


def iteration_number(sample: dict) -> int | None:
    """The iteration as the Train, Compare and Results tabs count it: folder iteration-0 is iteration 1
    (0 is the base model there)."""
    return None if sample.get("iteration") is None else int(sample["iteration"]) + 1


def filter_samples(samples: list[dict], iteration=ALL, status: str = ALL, changed_only: bool = False) -> list[dict]:
    """Samples of one iteration (counted from 1), status and change."""
    shown = samples
    if iteration not in (None, "", ALL):
        shown = [s for s in shown if str(iteration_number(s)) == str(iteration)]
    if status not in (None, "", ALL):
        shown = [s for s in shown if s["status"] == status]
    if changed_only:
        shown = [s for s in shown if s.get("changed")]
    return shown


def thumbnail(run_dir: Path | None, sample: dict) -> str:
    """An <img> of the sample's image, served by Gradio's file route (the app allows the data folder
    only). The URL is relative, so it also works under a proxy's root path. `run_dir` is absolute
    (the settings resolve the data folder), so no per-row resolve is needed."""
    if run_dir is None or not sample.get("image"):
        return ""
    path = run_dir / sample["image"]
    return (f'<img src="gradio_api/file={quote(str(path))}" alt="{escape(str(sample["id"]))}" '
            f'width="{THUMBNAIL_SIDE}" height="{THUMBNAIL_SIDE}" loading="lazy">')


def samples_table(samples: list[dict], run_dir: Path | None = None) -> pd.DataFrame:
    rows = [[thumbnail(run_dir, s), s["id"], iteration_number(s), s["status"], s["prompt"], s.get("relabeled", ""),
             s["final_prompt"] if s["status"] == "edited" else "", "; ".join(s.get("reasons") or []),
             training_note(s)] for s in samples]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def training_note(sample: dict) -> str:
    """Whether the next iteration trains on the sample, and why when a person's verdict decided it."""
    if not trained_on(sample):
        return "no (rejected)" if sample["status"] == "rejected" else "no (left out by the loop)"
    return "yes" if sample.get("keep", True) else "yes (your edit)"


def summary_line(samples: list[dict], shown: int) -> str:
    counts = Counter(s["status"] for s in samples)
    parts = ", ".join(f"{counts[name]} {name}" for name in STATUS_FILTERS[1:] if counts[name])
    return f"{len(samples)} samples ({parts}); {shown} shown."


def show_table(store: ReviewStore, run_id, iteration=ALL, status=ALL, changed_only=False) -> tuple[pd.DataFrame, str]:
    """(table, summary) of the run under the filters; an unusable run gives an empty table and why."""
    try:
        run_dir = run_folder(run_id)
        samples = reviewed_samples(store, run_id)
    except WorkbenchError as error:
        return samples_table([]), str(error)
    shown = filter_samples(samples, iteration, status, changed_only)
    return samples_table(shown, run_dir), summary_line(samples, len(shown))


def iteration_choices(run_id) -> list[str]:
    try:
        return [ALL, *(str(k + 1) for k in iteration_files(run_folder(run_id)))]
    except WorkbenchError:
        return [ALL]


def _box_threshold(run_dir: Path) -> float:
    try:
        return float(json.loads((run_dir / "config.json").read_text()).get("box_threshold", 0.3))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.3


def sample_view(store: ReviewStore, run_id, sample_id):
    """(annotated image, prompt to edit, details, word diff) of one sample; empty when none is chosen."""
    if not sample_id:
        return None, "", "", None
    try:
        run_dir = run_folder(run_id)
        sample = next((s for s in reviewed_samples(store, run_id) if s["id"] == sample_id), None)
        if sample is None:
            raise InvalidInput(f"Sample '{sample_id}' is not in run '{run_id}'.")
        with Image.open(run_dir / sample["image"]) as image:
            picture = image.convert("RGB")
    except (WorkbenchError, OSError) as error:
        return None, "", f"Cannot show sample '{sample_id}': {error}", None
    detections = [Detection.from_dict(d) for d in sample.get("detections") or []]
    details = "\n".join([
        f"**{sample_id}** — iteration {iteration_number(sample)}, seed {sample.get('seed')}, "
        f"status **{sample['status']}**, weight {float(sample.get('weight', 1.0)):g}, "
        f"trained on: {training_note(sample)}",
        f"- original: {sample['prompt']}",
        f"- relabeled: {sample.get('relabeled', '')}",
        *(f"- {reason}" for reason in sample.get("reasons") or []),
    ])
    return (annotated(picture, detections, threshold=_box_threshold(run_dir)), sample["final_prompt"], details,
            word_diff(sample["prompt"], sample["final_prompt"]))


def unsaved_edit_note(store: ReviewStore, run_id, sample_id, text) -> str:
    """What the page says when the user leaves a sample whose prompt box holds text not saved: the text,
    so that it is not lost; "" when the box matches what trains."""
    if not sample_id or text is None:
        return ""
    try:
        sample = next((s for s in reviewed_samples(store, run_id) if s["id"] == sample_id), None)
    except WorkbenchError:
        return ""
    if sample is None or " ".join(text.split()) == " ".join(sample["final_prompt"].split()):
        return ""
    return (f"Your edit of `{sample_id}` was not saved: \"{text.strip()}\". Select that sample again and press "
            f"*Save edit* to keep it.")


def record_verdict(store: ReviewStore, run_id, sample_id, verdict: str, prompt: str | None = None) -> str:
    """Write one verdict now; returns the message for the page."""
    try:
        run_folder(run_id)
        if not sample_id:
            raise InvalidInput("Select a sample in the table first.")
        samples = {s["id"]: s for s in reviewed_samples(store, run_id)}
        if sample_id not in samples:
            raise InvalidInput(f"Sample '{sample_id}' is not in run '{run_id}'.")
        review = store.set(run_id, sample_id, verdict, prompt)
    except WorkbenchError as error:
        return f"Not saved: {error}"
    if verdict == "edited":
        message = f"Saved the edit of `{sample_id}`: {review.prompt}"
        if not parse_prompt(review.prompt)["include"]:  # a typo, most likely: it still trains as written
            message += (" Note: it names no object the vocabulary knows (the shapes world and COCO's 80 classes); "
                        "it trains as written.")
        return message
    message = f"`{sample_id}` {verdict}."
    relabeled = samples[sample_id].get("relabeled", "")
    if verdict == "accepted" and prompt and " ".join(prompt.split()) != " ".join(relabeled.split()):
        message += " The relabeled prompt is what trains; your changed text was not kept (use Save edit for that)."
    return message


def accept_shown(store: ReviewStore, run_id, table) -> str:
    """Accept the pending samples among the table's rows; edits and rejections stay."""
    try:
        run_folder(run_id)
    except WorkbenchError as error:
        return f"Not saved: {error}"
    ids = [str(value) for value in (table["id"].tolist() if isinstance(table, pd.DataFrame) and "id" in table
                                    else [row[ID_COLUMN] for row in table or []]) if value]
    if not ids:
        return "No samples are shown: change the filters first."
    accepted = store.accept_pending(run_id, ids)
    return f"Accepted {accepted} pending sample(s) of the {len(ids)} shown; reviewed ones kept their verdict."


def export_run(store: ReviewStore, run_id) -> str:
    try:
        run_dir = run_folder(run_id)
        out = export_imagefolder(run_dir, run_id, store, run_dir / EXPORT_FOLDER)
    except WorkbenchError as error:
        return f"Not exported: {error}"
    ids = [row["id"] for row in read_jsonl(out / "metadata.jsonl")]
    reviews = store.get_all(str(run_id))
    checked = sum(1 for sample_id in ids if sample_id in reviews)
    return (f"Exported {len(ids)} image(s) with their prompts to `{out}` (Hugging Face imagefolder: "
            f"`load_dataset(\"imagefolder\", data_dir=...)`, caption column `text`, loss weight `weight`): "
            f"{checked} accepted or edited by hand, {len(ids) - checked} not reviewed yet with the relabeler's "
            "prompt, as the next iteration would train on them; rejected samples are left out.")


# --- layout --------------------------------------------------------------------------------------


def build_review_tab(store: ReviewStore | None = None):
    """Create the tab inside the current Gradio context; returns what the app runs on page load:
    (function, inputs, outputs) that refresh the run list and say what to do when there is no run."""
    store = store or ReviewStore(get_settings().db_path)
    with gr.Row():
        run = gr.Dropdown(run_choices(), value=None, label="IPR run", scale=4, elem_id="review-run",
                          info="Runs whose folder holds iteration-<k>/samples.jsonl")
        refresh = gr.Button("Refresh", scale=1, elem_id="review-refresh")
    with gr.Row():
        iteration = gr.Dropdown([ALL], value=ALL, label="Iteration", elem_id="review-iteration")
        status = gr.Dropdown(STATUS_FILTERS, value=ALL, label="Status", elem_id="review-status-filter")
        changed_only = gr.Checkbox(label="Changed by the relabel only", elem_id="review-changed")
    summary = gr.Markdown(elem_id="review-summary")
    with gr.Row():
        with gr.Column(scale=3):
            table = gr.Dataframe(samples_table([]), headers=TABLE_COLUMNS, interactive=False, wrap=True,
                                 max_height=600, label="Samples (click a row)", elem_id="review-table",
                                 datatype=["html"] + ["str"] * (len(TABLE_COLUMNS) - 1),
                                 column_widths=["9%", "11%", "7%", "12%", "15%", "15%", "10%", "14%", "7%"])
            accept_all = gr.Button("Accept all shown (pending ones)", elem_id="review-accept-all")
            with gr.Row():
                export = gr.Button("Export reviewed run (imagefolder)", elem_id="review-export")
        with gr.Column(scale=2):
            image = gr.AnnotatedImage(label="Image and detections", height=320, elem_id="review-image")
            sample_id = gr.Textbox(label="Sample", interactive=False, elem_id="review-sample")
            details = gr.Markdown(elem_id="review-details")
            diff = gr.HighlightedText(label="Original → prompt to train on", color_map=DIFF_COLORS,
                                      show_legend=True, elem_id="review-diff")
            prompt = gr.Textbox(label="Prompt to train on (edit, then Save edit)", lines=2, elem_id="review-prompt")
            with gr.Row():
                accept = gr.Button("Accept", variant="primary", elem_id="review-accept")
                save_edit = gr.Button("Save edit", elem_id="review-save-edit")
                reject = gr.Button("Reject", variant="stop", elem_id="review-reject")
    message = gr.Markdown(elem_id="review-message")

    filters = [run, iteration, status, changed_only]
    sample_outputs = [image, prompt, details, diff]

    def refresh_runs(current):
        choices = run_choices()
        return gr.update(choices=choices, value=current if current in choices else None)

    def change_run(previous_run, previous_sample, typed, run_id, status_value, changed):
        rows, text = show_table(store, run_id, ALL, status_value, changed)
        note = unsaved_edit_note(store, previous_run, previous_sample, typed)
        return (gr.update(choices=iteration_choices(run_id), value=ALL), rows, text, "", None, "", "", None, note,
                run_id)

    def refilter(run_id, iteration_value, status_value, changed):
        return show_table(store, run_id, iteration_value, status_value, changed)

    def select_row(run_id, previous, typed, event: gr.SelectData):
        chosen = str(event.row_value[ID_COLUMN]) if event.row_value else ""
        note = unsaved_edit_note(store, run_id, previous, typed) if chosen != previous else ""
        return note, chosen, *sample_view(store, run_id, chosen)

    def act(verdict):
        def handler(run_id, chosen, text, iteration_value, status_value, changed):
            note = record_verdict(store, run_id, chosen, verdict, text)
            return (note, *show_table(store, run_id, iteration_value, status_value, changed),
                    *sample_view(store, run_id, chosen))
        return handler

    def accept_all_shown(run_id, rows, iteration_value, status_value, changed):
        return accept_shown(store, run_id, rows), *show_table(store, run_id, iteration_value, status_value, changed)

    refresh.click(refresh_runs, run, run).then(refilter, filters, [table, summary])
    shown_run = gr.State(None)  # the run whose sample is shown, to name an unsaved edit when the run changes
    run.change(change_run, [shown_run, sample_id, prompt, run, status, changed_only],
               [iteration, table, summary, sample_id, *sample_outputs, message, shown_run])
    for control in (iteration, status, changed_only):
        control.change(refilter, filters, [table, summary])
    table.select(select_row, [run, sample_id, prompt], [message, sample_id, *sample_outputs])
    action_inputs = [run, sample_id, prompt, iteration, status, changed_only]
    action_outputs = [message, table, summary, *sample_outputs]
    accept.click(act("accepted"), action_inputs, action_outputs, api_name="review_accept")
    save_edit.click(act("edited"), action_inputs, action_outputs, api_name="review_edit")
    prompt.submit(act("edited"), action_inputs, action_outputs)
    reject.click(act("rejected"), action_inputs, action_outputs, api_name="review_reject")
    accept_all.click(accept_all_shown, [run, table, iteration, status, changed_only], [message, table, summary])
    export.click(lambda run_id: export_run(store, run_id), run, message, api_name="review_export")

    def on_page_load():  # runs made since the app was built; with none, what to do
        choices = run_choices()
        return gr.update(choices=choices), ("" if choices else NO_RUNS)

    return on_page_load, None, [run, summary]
