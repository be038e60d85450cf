"""Data tab, recaption: RECAP's recaptioner on its own. Give an imagefolder inside the data folder (or let
the app render the shapes world's alt-text dataset), let a captioner read every image's pixels and
write a short and a long caption, and compare them with the original alt text, image by image.

The recaption runs as a background job (`recaption`) into `<data>/datasets/<source>-recap-<captioner>/`,
a new imagefolder that keeps the alt text; the source is never written to. That folder is fixed by
source and captioner, so recaptioning the same again continues a stopped recaption where it stopped.
"""

from __future__ import annotations

import html
import json

import gradio as gr

from pipelines.recap import CAPTIONER_OPTIONS
from ..datasets import (datasets_dir, find_imagefolders, imagefolder, inside_data_folder, read_rows, recaption_folder,
                        relative_name, row_image, shapes_dataset_folder)
from ..errors import InvalidInput, WorkbenchError
from ..jobs import JobRunner, JobStatus
from ..perception.backends import CAPTIONERS, check_backend
from ..report import STYLE, image_data_uri
from .data_skills import cancel_job
from .generate import follow_job_as
from .train_runs import number

SHOWN_ROWS = 24  # the table shows the first rows; Browse datasets pages through all of them
MAX_IMAGES = 20000  # the shapes dataset the tab renders
THUMBNAIL_SIDE = 128
CAPTION_COLUMNS = {"alt_text": "original alt text", "short_caption": "short caption", "long_caption": "long caption"}


def recaption_settings(source, images, seed, captioner, skip_unreadable=False) -> dict:
    """The job's settings: the source imagefolder (inside the data folder) or the shapes dataset to render,
    the captioner (its weights checked now) and the output folder; InvalidInput says what is wrong."""
    if captioner not in CAPTIONERS:
        raise InvalidInput(f"Unknown captioner '{captioner}'. Available: {', '.join(CAPTIONERS)}.")
    if source:
        data, images, seed = imagefolder(source), None, None
    else:
        images, seed = number(images, "Images to render"), number(seed, "Seed")
        if not 1 <= images <= MAX_IMAGES:
            raise InvalidInput(f"Render between 1 and {MAX_IMAGES} images (got {images}).")
        data = shapes_dataset_folder(images, seed)
    check_backend("captioner", captioner, **CAPTIONER_OPTIONS.get(captioner, {}))  # missing weights: say so now
    return {"data": str(data) if source else None, "images": images, "seed": seed, "captioner": captioner,
            "out": str(recaption_folder(data, captioner)), "skip_unreadable": bool(skip_unreadable)}


def recaptioned_sets() -> list[str]:
    """Recaptioned imagefolders under datasets/, newest first."""
    root = datasets_dir()
    found = [p.parent for p in root.glob("*/recaption.json")] if root.is_dir() else []
    found = [folder for folder in found if (folder / "metadata.jsonl").is_file()]
    return [relative_name(f) for f in sorted(found, key=lambda f: f.stat().st_mtime, reverse=True)]


def recaption_table_html(folder, count: int = SHOWN_ROWS) -> str:
    """Thumbnail, original alt text, short and long caption of the first `count` images, as an HTML table."""
    esc = html.escape
    cells = "".join(f"<th>{esc(title)}</th>" for title in CAPTION_COLUMNS.values())
    body = []
    for row in read_rows(folder, 0, count):
        image = row_image(folder, row)
        picture = f'<img src="{image_data_uri(image, THUMBNAIL_SIDE)}" alt="{esc(row.get("file_name", ""))}">' \
            if image else "(no image)"
        texts = "".join(f'<td class="wb-prompt">{esc(str(row.get(key, "")))}</td>' for key in CAPTION_COLUMNS)
        body.append(f"<tr><td>{picture}</td>{texts}</tr>")
    return (f'<style>{STYLE}</style><div class="wb-report" id="recaption-table"><table><tr><th>image</th>{cells}</tr>'
            f'{"".join(body)}</table></div>')


def recaption_summary(folder) -> str:
    """What a recaption did: captioner, images, skipped ones, and how often each caption differs from the alt text."""
    info = json.loads((folder / "recaption.json").read_text()) if (folder / "recaption.json").is_file() else {}
    rows = read_rows(folder)
    differs = {key: sum(r.get(key) != r.get("alt_text") for r in rows) for key in ("short_caption", "long_caption")}
    shown = min(SHOWN_ROWS, len(rows))
    empty = info.get("empty_captions", 0)
    blanks = f", {empty} with an empty caption: the captioner saw nothing" if empty else ""
    return (f"`{relative_name(folder)}`: {len(rows)} images captioned by the {info.get('captioner', '?')} captioner "
            f"({info.get('skipped', 0)} unreadable skipped{blanks}); the short caption differs from the alt text for "
            f"{differs['short_caption']}, the long one for {differs['long_caption']}. The first {shown} are shown; "
            f"*Browse datasets* pages through all of them.")


def open_recaptioned(name: str | None):
    """(status, table HTML) of a recaptioned folder under the data folder."""
    if not name:
        return "Choose a recaptioned dataset, or recaption one.", ""
    try:
        folder = imagefolder(name, images_inside=False)  # only shown, and row_image shows nothing outside
        return recaption_summary(folder), recaption_table_html(folder)
    except (WorkbenchError, OSError, ValueError) as error:
        return f"Cannot open: {error}", ""


def recaption_dataset(runner: JobRunner, source, images, seed, captioner, skip_unreadable=False):
    """Submit the recaption and follow it; yields (status, table HTML, recaptioned-set picker, job id)."""
    keep = (gr.update(), gr.update())
    try:
        settings = recaption_settings(source, images, seed, captioner, skip_unreadable)
        job_id = runner.submit("recaption", settings)
    except WorkbenchError as error:
        yield (f"Not started: {error}",) + keep + (None,)
        return
    job = yield from follow_job_as(runner, job_id, 0.5, lambda line: (line,) + keep + (job_id,))
    name = relative_name(inside_data_folder(settings["out"]))
    if job.status is not JobStatus.DONE:
        again = " Recaption the same again to continue where it stopped." if job.status is JobStatus.CANCELLED else ""
        yield (f"Job `{job_id}` {job.status.value}" + (f": {job.error}" if job.error else "") + "." + again,) \
            + keep + (job_id,)
        return
    status, table = open_recaptioned(name)
    yield status, table, gr.update(choices=recaptioned_sets(), value=name), job_id


def build_recaption_section(runner: JobRunner):
    """Create the section inside the current Gradio context; returns what refreshes it when the page
    loads: (function, inputs, outputs)."""
    gr.Markdown("RECAP's recaptioning: a captioner reads each image and writes a short and a long caption; the "
                "alt text is kept beside them. Only folders inside the data folder can be read: copy a dataset "
                f"into `{datasets_dir()}` first.")
    with gr.Row():
        with gr.Column():
            source = gr.Dropdown(find_imagefolders(), value=None, allow_custom_value=True, elem_id="recaption-source",
                                 label="Imagefolder inside the data folder (empty: render the shapes world's "
                                       "alt-text dataset)")
            with gr.Row():
                images = gr.Number(200, label="Shapes images to render", precision=0)
                seed = gr.Number(0, label="Seed", precision=0)
        with gr.Column():
            captioner = gr.Dropdown(list(CAPTIONERS), value="shapes", label="Captioner",
                                    info="shapes: the shapes world's own; blip, blip2: from local weights")
            skip_unreadable = gr.Checkbox(False, label="Skip unreadable images",
                                          info="leave out images that cannot be read instead of stopping")
            with gr.Row():
                start = gr.Button("Recaption", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
    job = gr.State(None)
    status = gr.Markdown(elem_id="recaption-status")
    saved = gr.Dropdown(recaptioned_sets(), value=None, label="Recaptioned datasets")
    table = gr.HTML(elem_id="recaption-grid")

    def on_start(*values):
        yield from recaption_dataset(runner, *values)

    start.click(on_start, [source, images, seed, captioner, skip_unreadable], [status, table, saved, job])
    cancel.click(lambda j: cancel_job(runner, j), job, status)
    saved.input(open_recaptioned, saved, [status, table])

    def refresh():
        return gr.update(choices=find_imagefolders()), gr.update(choices=recaptioned_sets())

    return refresh, None, [source, saved]
