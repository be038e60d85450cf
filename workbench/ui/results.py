"""Results tab: every stored evaluation and comparison (workbench.history), plotted across entries,
filtered by model and source, exported as CSV into the data folder."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from .. import history
from ..config import get_settings

ALL = "all"
PLOT_COLUMNS = ["entry", "accuracy", "tag"]


def _filtered(model: str | None, source: str | None) -> pd.DataFrame:
    return history.load(model=None if model in (None, "", ALL) else model,
                        source=None if source in (None, "", ALL) else source)


def results_table(frame: pd.DataFrame) -> pd.DataFrame:
    """What a person reads: newest first, accuracies in %, one column per tag."""
    if frame.empty:
        return pd.DataFrame(columns=["entry", "time", "model", "variant", "prompt set", "seeds", "overall %"])
    out = pd.DataFrame({
        "entry": frame["id"], "time": frame["created"].dt.strftime("%Y-%m-%d %H:%M"), "model": frame["model"],
        "variant": frame["label"], "prompt set": frame["prompt_set"], "seeds": frame["seeds"],
        "overall %": (100 * frame["overall"]).round(1)})
    for tag in dict.fromkeys(tag for per_tag in frame["per_tag"] for tag in per_tag):
        out[f"{tag} %"] = [round(100 * per_tag[tag], 1) if tag in per_tag else None for per_tag in frame["per_tag"]]
    out["source"] = frame["source"]
    out["run"] = frame["source_id"]
    out["revision"] = frame["git_revision"].str[:10]
    return out.iloc[::-1].reset_index(drop=True)


def plot_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Long form for the line plot: accuracy (%) of every tag and of 'overall' per history entry.

    An entry is named by its zero-padded id and variant, so the axis reads as names and sorts by id."""
    rows = []
    for entry in frame.itertuples():
        name = f"{entry.id:04d} {entry.label}"
        rows += [[name, round(100 * value, 1), tag] for tag, value in entry.per_tag.items()]
        if entry.overall is not None and not pd.isna(entry.overall):
            rows.append([name, round(100 * entry.overall, 1), "overall"])
    return pd.DataFrame(rows, columns=PLOT_COLUMNS)


def show(model: str | None, source: str | None):
    """(table, plot data, model choices) for the filters."""
    frame = _filtered(model, source)
    models = [ALL] + sorted(set(history.load()["model"]))
    return results_table(frame), plot_frame(frame), gr.update(choices=models)


def export_csv(model: str | None, source: str | None):
    """The shown history as CSV under the data folder (the only folder the app serves files from)."""
    frame = _filtered(model, source)
    if frame.empty:
        return gr.update(visible=False), "Nothing to export: no results match the filters."
    path = get_settings().data_dir / "exports" / f"results-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    history.to_csv(path, frame)
    return gr.update(value=str(path), visible=True), f"Exported {len(frame)} row(s) to `{path}`."


def build_results_tab():
    """Create the tab inside the current Gradio context; returns (refresh function, inputs, outputs) for
    the page load."""
    gr.Markdown("Every evaluation (Generate tab, `python -m workbench eval`, IPR iterations) and every variant "
                "of a comparison, with the workbench revision that scored it.")
    with gr.Row():
        model = gr.Dropdown([ALL], value=ALL, label="Model", scale=3, elem_id="results-model")
        source = gr.Dropdown([ALL, *history.SOURCES], value=ALL, label="Source", scale=1)
        refresh = gr.Button("Refresh", scale=1)
        export = gr.Button("Export CSV", scale=1, elem_id="results-export")
    message = gr.Markdown(elem_id="results-message")
    plot = gr.LinePlot(pd.DataFrame(columns=PLOT_COLUMNS), x="entry", y="accuracy", color="tag",
                       tooltip=["entry", "tag", "accuracy"], y_lim=[0, 100], x_label_angle=-30,
                       title="Accuracy (%) per history entry")
    table = gr.Dataframe(label="Results (newest first)", interactive=False, elem_id="results-table")
    download = gr.File(label="CSV", interactive=False, visible=False)

    outputs = [table, plot, model]
    for trigger in (refresh.click, model.input, source.input):
        trigger(show, [model, source], outputs)
    export.click(export_csv, [model, source], [download, message])
    return show, [model, source], outputs
