"""Data tab: the data methods train on. Skill prompts (SELMA's LLM prompt writing with the ROUGE-L filter,
`data_skills`), recaptioning a dataset (RECAP's short and long captions beside the alt text,
`data_recaption`), and browsing every imagefolder in the data folder (here): made or recaptioned in
the app, or inside runs (SELMA's data/<skill>/, RECAP's recaptioned/ and train/, IPR's iteration train/).

Only folders inside the data folder are listed or opened (`workbench.datasets`).
"""

from __future__ import annotations

import json
import math

import gradio as gr
import pandas as pd

from ..datasets import count_rows, find_imagefolders, imagefolder, read_rows, row_image
from ..errors import WorkbenchError
from ..jobs import JobRunner
from .data_recaption import build_recaption_section
from .data_skills import build_skill_prompts_section

PAGE_SIZES = [12, 24, 48, 96]
CAPTION_KEYS = ("text", "long_caption", "short_caption", "alt_text", "prompt")  # the gallery's caption, first found
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def cell(value):
    """A metadata value as a table cell: numbers and text as they are, anything else as JSON."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)


def browse_page(name: str | None, page=1, page_size=PAGE_SIZES[1]):
    """(gallery items, metadata table, summary, page) of one page of an imagefolder inside the data folder."""
    if not name:
        return [], pd.DataFrame(), "Choose a dataset.", 1
    try:
        folder = imagefolder(name, images_inside=False)  # only shown, and row_image shows nothing outside
        total = count_rows(folder)
        size = int(page_size or PAGE_SIZES[1])
        pages = max(1, math.ceil(total / size))
        page = min(max(1, int(page or 1)), pages)
        rows = read_rows(folder, (page - 1) * size, size)
    except (WorkbenchError, OSError, ValueError) as error:
        return [], pd.DataFrame(), f"Cannot open: {error}", 1
    gallery = []
    for row in rows:
        image = row_image(folder, row)
        if image is not None and image.suffix.lower() in IMAGE_SUFFIXES:  # the gallery shows pictures only
            caption = next((row[key] for key in CAPTION_KEYS if isinstance(row.get(key), str)), row.get("file_name"))
            gallery.append((str(image), caption))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = pd.DataFrame([[cell(row.get(key)) for key in columns] for row in rows], columns=columns)
    if not rows:
        return gallery, table, f"`{name}`: its metadata.jsonl lists no rows.", page
    first = (page - 1) * size + 1
    summary = (f"`{name}`: {total} rows; page {page} of {pages} (rows {first}-{first + len(rows) - 1}); "
               f"{len(gallery)} of this page's images shown")
    return gallery, table, summary, page


def build_browse_section():
    """Create the section inside the current Gradio context; returns what refreshes it when the page
    loads: (function, inputs, outputs)."""
    with gr.Row():
        dataset = gr.Dropdown(find_imagefolders(), value=None, label="Dataset (imagefolders in the data folder)",
                              scale=4, elem_id="browse-dataset")
        refresh = gr.Button("Refresh", scale=1)
    with gr.Row():
        previous = gr.Button("← Previous", scale=1)
        page = gr.Number(1, label="Page", precision=0, scale=1)
        following = gr.Button("Next →", scale=1)
        page_size = gr.Dropdown(PAGE_SIZES, value=PAGE_SIZES[1], label="Rows per page", scale=1)
    summary = gr.Markdown(elem_id="browse-summary")
    gallery = gr.Gallery(label="Images", columns=8, height="auto", object_fit="contain", elem_id="browse-gallery")
    table = gr.Dataframe(interactive=False, wrap=True, max_height=500, label="Metadata")

    outputs = [gallery, table, summary, page]
    for event in (dataset.input, page.submit, page_size.input):
        event(browse_page, [dataset, page, page_size], outputs)
    previous.click(lambda n, p, s: browse_page(n, (p or 1) - 1, s), [dataset, page, page_size], outputs)
    following.click(lambda n, p, s: browse_page(n, (p or 1) + 1, s), [dataset, page, page_size], outputs)
    refresh.click(lambda: gr.update(choices=find_imagefolders()), None, dataset)
    return lambda: gr.update(choices=find_imagefolders()), None, [dataset]


def build_data_tab(runner: JobRunner) -> list[tuple]:
    """Create the tab inside the current Gradio context; returns what refreshes its lists when the page
    loads, one (function, inputs, outputs) per section."""
    with gr.Tabs():
        with gr.Tab("Skill prompts"):
            skills = build_skill_prompts_section(runner)
        with gr.Tab("Recaption a dataset"):
            recaption = build_recaption_section(runner)
        with gr.Tab("Browse datasets"):
            browse = build_browse_section()
    return [skills, recaption, browse]
