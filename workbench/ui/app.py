"""Assemble the Gradio app from one module per tab; tabs only call services and the job runner."""

from __future__ import annotations

import gradio as gr

from ..config import get_settings
from ..job_kinds import register_all
from ..jobs import get_runner
from .compare import build_compare_tab
from .data import build_data_tab
from .adapters import model_choices, model_lists
from .generate import build_generate_tab, model_defaults
from .inspect import build_inspect_tab
from .local_captions import build_local_captions_tab, past_runs
from .results import build_results_tab
from .review import build_review_tab
from .runs import build_runs_tab
from .train import build_train_tab, ipr_runs

TITLE = "align-workbench"
# The shapes model's 64 px images would show at their own size in the Inspect tab's input: fill the box,
# with sharp pixels, as the detections beside it are shown.
CSS = "#inspect-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
INTRO = ("Make text-to-image models follow their prompts: generate, inspect, relabel, fine-tune and "
         "compare. The default model is the embedded **shapes world**, which runs on a CPU.")


def build_app() -> gr.Blocks:
    runner = get_runner()
    register_all(runner)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Tab("Generate"):
            model, model_info, sliders = build_generate_tab(runner)
        with gr.Tab("Inspect & Relabel"):
            build_inspect_tab()
        with gr.Tab("Local captions & masks"):
            fine_run = build_local_captions_tab()
        with gr.Tab("Review"):
            review_refresh = build_review_tab()
        with gr.Tab("Data"):
            data_refreshes = build_data_tab(runner)
        with gr.Tab("Train"):
            train_run = build_train_tab(runner)
        with gr.Tab("Compare"):
            compare_refresh = build_compare_tab(runner)
        with gr.Tab("Results"):
            show_results, results_inputs, results_outputs = build_results_tab()
        with gr.Tab("Runs"):
            build_runs_tab(runner)
        demo.load(model_defaults, model, sliders + [model_info])
        # Runs (and full fine-tunes) made since the app was built appear when the page is (re)loaded.
        every_model_list = model_lists(demo.blocks)

        def refresh_model_lists():
            choices = model_choices()
            return [gr.update(choices=choices) for _ in every_model_list]

        demo.load(refresh_model_lists, None, every_model_list)
        demo.load(*review_refresh)
        demo.load(lambda: gr.update(choices=ipr_runs()), None, train_run)
        demo.load(*compare_refresh)
        demo.load(lambda: gr.update(choices=past_runs()), None, fine_run)
        demo.load(show_results, results_inputs, results_outputs)
        for refresh in data_refreshes:  # datasets, prompt sets and skills made since the app was built
            demo.load(*refresh)
    return demo


def served_paths() -> tuple[list[str], list[str]]:
    """(allowed, blocked) paths for Gradio's file route: the data folder, less its private paths (the SQLite
    database and its journals, and the weights users put there: `Settings.private_paths`)."""
    settings = get_settings()
    return [str(settings.data_dir)], [str(path) for path in settings.private_paths]


def launch(demo: gr.Blocks) -> None:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    allowed, blocked = served_paths()
    # Only the data folder (plus Gradio's own cache) is served; server name and port come from
    # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, as on Hugging Face Spaces.
    demo.queue(default_concurrency_limit=4).launch(allowed_paths=allowed, blocked_paths=blocked, css=CSS)
