"""Self-contained HTML reports of a comparison, an evaluation or an IPR run, for sharing.

    python -m workbench report RUN_OR_EVAL_ID --out report.html

The page has the comparison grid (one row per prompt and seed, one column per variant, each image
marked ✓ or ✗ with the requirements it fails), the per-tag accuracy table and, for an IPR run, the
metrics of every iteration. Images are inlined as base64 PNG data URIs and the style sheet is in the
page, so the file opens anywhere with nothing else. All text from runs is HTML-escaped.

The same grid is what the Compare tab shows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from .compare import RESULT_FILE, accuracy_table, difference_table, load_result, mark
from .config import get_settings
from .errors import InvalidInput
from .history import adapters_label, with_seeds
from .store import read_jsonl

STYLE = """
.wb-report { font-family: system-ui, sans-serif; color: #1f2328; }
.wb-report table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
.wb-report th, .wb-report td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: center; vertical-align: top; }
.wb-report th { background: #f6f8fa; }
.wb-report td.wb-prompt { text-align: left; min-width: 10em; max-width: 22em; }
.wb-report .wb-scroll { overflow-x: auto; }
.wb-report figure { margin: 0; width: 128px; }
.wb-report img { width: 128px; height: 128px; max-width: none; object-fit: contain; image-rendering: pixelated;
  display: block; }
.wb-report figcaption { font-size: 0.85em; margin-top: 2px; }
.wb-report .wb-ok { color: #1a7f37; font-weight: 600; }
.wb-report .wb-fail { color: #cf222e; font-weight: 600; }
"""


# --- reading a folder into one comparison ------------------------------------------------------------


def resolve_folder(run_id: str | Path) -> Path:
    """A folder path, or the name of a run under the data folder's runs/."""
    if not str(run_id).strip():
        raise InvalidInput("Give a run or evaluation: a folder, or the name of a run under runs/.")
    path = Path(run_id).expanduser()
    if path.is_dir():
        return path.resolve()
    named = get_settings().runs_dir / Path(str(run_id)).name
    if named.is_dir():
        return named.resolve()
    raise InvalidInput(f"No run or evaluation '{run_id}': give a folder, or the name of one under {named.parent}.")


def _eval_variant(eval_dir: Path, folder: Path, v: int, label: str | None = None) -> tuple[dict, list[dict]]:
    """A benchmark folder (scores.json, verdicts.jsonl) as one variant, paths relative to `folder`."""
    scores = json.loads((eval_dir / "scores.json").read_text())
    loras = scores.get("config", {}).get("loras", [])
    label = label or adapters_label(loras)
    rows = []
    for row in read_jsonl(eval_dir / "verdicts.jsonl"):
        requirements = {key[3:]: value for key, value in row.items() if key.startswith("ok_")}
        rows.append({"variant": v, "label": label, "index": row["index"], "tag": row["tag"], "prompt": row["prompt"],
                     "seed": row["seed"], "path": str((eval_dir / row["path"]).relative_to(folder)),
                     "correct": row["correct"], "mark": mark(row["correct"], requirements),
                     "reasons": [r for r in str(row.get("reasons") or "").split("; ") if r]})
    variant = {"label": label, "loras": loras, "per_tag": scores["per_tag"], "overall": scores["overall"]}
    return variant, rows


def load_comparison(folder: Path) -> dict:
    """{kind, title, model, variants, rows, metrics} of a comparison, evaluation or IPR run folder;
    InvalidInput (one line) when its files are damaged or not the workbench's."""
    try:
        return _load_comparison(Path(folder))
    except (ValueError, KeyError, TypeError) as error:  # JSON, UTF-8 and missing fields alike
        raise InvalidInput(f"{folder} holds files the workbench cannot read (damaged, or not written by it): "
                           f"{type(error).__name__}: {str(error)[:200]}") from None


def _load_comparison(folder: Path) -> dict:
    if (folder / RESULT_FILE).is_file():
        result = load_result(folder)
        config = result["config"]
        return {"kind": "compare", "title": f"Comparison {folder.name}", "model": config["model"],
                "variants": result["variants"], "rows": result["rows"], "metrics": [],
                "prompt_set": with_seeds(config.get("prompt_set", ""), config.get("first_seed", 0),
                                         config.get("seeds", 0))}
    if (folder / "scores.json").is_file() and (folder / "verdicts.jsonl").is_file():
        variant, rows = _eval_variant(folder, folder, 0)
        config = json.loads((folder / "scores.json").read_text()).get("config", {})
        return {"kind": "eval", "title": f"Evaluation {folder.name}", "model": config.get("model", ""),
                "variants": [variant], "rows": rows, "metrics": [], "prompt_set": Path(config.get("prompts", "")).name}
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("kind") == "ipr":
        from pipelines.ipr import read_metrics

        evals = [(folder / "eval-base", "base")] + [
            (folder / f"iteration-{k}" / "eval", f"iteration {k + 1}") for k in range(int(config.get("iterations", 0)))]
        variants, rows = [], []
        for eval_dir, label in evals:
            if (eval_dir / "scores.json").is_file() and (eval_dir / "verdicts.jsonl").is_file():
                variant, variant_rows = _eval_variant(eval_dir, folder, len(variants), label)
                variants.append(variant)
                rows += variant_rows
        return {"kind": "ipr", "title": f"IPR run {folder.name}", "model": config.get("model", ""),
                "variants": variants, "rows": rows, "metrics": read_metrics(folder),
                "prompt_set": Path(str(config.get("eval_prompts", ""))).name}
    raise InvalidInput(f"{folder} is not a comparison ({RESULT_FILE}), an evaluation (scores.json and "
                       f"verdicts.jsonl) or an IPR run (config.json).")


# --- HTML pieces ------------------------------------------------------------------------------------------


def image_data_uri(path: Path, max_side: int | None = None) -> str:
    """The image as a base64 PNG data URI, shrunk to `max_side` pixels when it is larger."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if max_side and max(image.size) > max_side:
            image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(row: dict | None, folder: Path, max_side: int | None) -> str:
    if row is None:
        return "<td></td>"
    esc = html.escape
    css = "wb-ok" if row["correct"] else "wb-fail"
    reasons = "; ".join(row.get("reasons") or []) or ("meets every requirement" if row["correct"] else "")
    alt = f"{row['label']}, seed {row['seed']}: {row['mark']}"
    return (f'<td><figure><img src="{image_data_uri(folder / row["path"], max_side)}" alt="{esc(alt)}" '
            f'title="{esc(reasons)}"><figcaption class="{css}">{esc(row["mark"])}</figcaption></figure></td>')


def grid_html(comparison: dict, folder: Path, max_side: int | None = 256, per_tag: int | None = None) -> str:
    """The comparison grid: a row per (prompt, seed), a column per variant, verdict under each image.

    `per_tag` keeps only the first that many prompts of each tag (the tables still count them all)."""
    esc = html.escape
    labels = [variant["label"] for variant in comparison["variants"]]
    cells: dict[tuple, dict] = {}
    for row in comparison["rows"]:
        cells[(row["index"], row["seed"], row["variant"])] = row
    keys = list(dict.fromkeys((row["index"], row["seed"]) for row in comparison["rows"]))
    shown_per_tag: dict[str, list] = {}
    header = "".join(f"<th>{esc(label)}</th>" for label in labels)
    body = []
    for index, seed in sorted(keys):
        first = next(cells[(index, seed, v)] for v in range(len(labels)) if (index, seed, v) in cells)
        prompts = shown_per_tag.setdefault(first["tag"], [])
        if index not in prompts:
            if per_tag is not None and len(prompts) >= per_tag:
                continue
            prompts.append(index)
        row_cells = "".join(_cell(cells.get((index, seed, v)), folder, max_side) for v in range(len(labels)))
        body.append(f'<tr><td class="wb-prompt">{esc(first["prompt"])}<br><small>{esc(first["tag"])} · seed '
                    f'{int(seed)}</small></td>{row_cells}</tr>')
    return (f'<div class="wb-scroll"><table class="wb-grid"><thead><tr><th>prompt</th>{header}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def accuracy_html(comparison: dict) -> str:
    table = accuracy_table(comparison["variants"]) if comparison["variants"] else pd.DataFrame()
    return table.to_html(index=False, escape=True, na_rep="", classes="wb-accuracy", border=0)


def difference_html(comparison: dict) -> str:
    """Each variant minus the first, with 95% CIs and paired p-values; empty with one variant."""
    table = difference_table(comparison["variants"], comparison["rows"])
    if table.empty:
        return ""
    return ("<h2>Difference from the first column (points)</h2><p>95% confidence interval of a bootstrap that "
            "redraws prompts with all their seeds, and the p-value of a paired sign-flip test. They cover these "
            "prompts and seeds, not the spread between training runs.</p>"
            + table.to_html(index=False, escape=True, na_rep="", classes="wb-accuracy", border=0))


def metrics_html(metrics: list[dict]) -> str:
    """IPR's per-iteration record: data counts and accuracies (%)."""
    rows = []
    for entry in metrics:
        row = {key: entry.get(key, "") for key in ("iteration", "label", "samples", "matched", "relabeled",
                                                    "dropped", "unsure", "training_pairs")}
        if entry.get("overall") is not None:
            row["overall %"] = round(100 * entry["overall"], 1)
        row.update({f"{tag} %": round(100 * value, 1) for tag, value in entry.get("per_tag", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows).to_html(index=False, escape=True, na_rep="", classes="wb-metrics", border=0)


def comparison_html(comparison: dict, folder: Path, max_side: int | None = 256, per_tag: int | None = None) -> str:
    """The report's body (tables, then the grid) in a styled block; the Compare tab shows this too."""
    esc = html.escape
    parts = [f"<style>{STYLE}</style>", '<div class="wb-report">',
             f"<h2>Accuracy (%) per tag</h2>{accuracy_html(comparison)}", difference_html(comparison)]
    if comparison.get("metrics"):
        parts.append(f"<h2>IPR iterations</h2>{metrics_html(comparison['metrics'])}")
    note = f" (first {per_tag} prompt(s) of each tag)" if per_tag is not None else ""
    parts.append(f"<h2>Images{esc(note)}</h2>"
                 "<p>Same prompts and seeds in every column; ✓ the image meets its prompt under GenEval's rules, "
                 "✗ names the requirements it fails (hover an image for the detector's reasons).</p>")
    parts.append(grid_html(comparison, folder, max_side, per_tag))
    parts.append("</div>")
    return "".join(parts)


def build_report(folder: Path, max_side: int | None = 256, per_tag: int | None = None) -> str:
    if per_tag is not None and per_tag < 1:
        raise InvalidInput(f"Prompts per tag (--per-tag) must be at least 1, or left out for all (got {per_tag}).")
    folder = Path(folder)
    comparison = load_comparison(folder)
    esc = html.escape
    variants = ", ".join(variant["label"] for variant in comparison["variants"]) or "none scored yet"
    summary = (f"<p>Model <b>{esc(str(comparison['model']))}</b> · prompts {esc(str(comparison['prompt_set']))} · "
               f"variants: {esc(variants)} · folder <code>{esc(str(folder))}</code> · written "
               f"{esc(time.strftime('%Y-%m-%d %H:%M'))}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(comparison['title'])}</title></head><body>"
            f'<div class="wb-report"><h1>{esc(comparison["title"])}</h1>{summary}</div>'
            f"{comparison_html(comparison, folder, max_side, per_tag)}</body></html>\n")


def write_report(run_id: str | Path, out: Path, max_side: int | None = 256, per_tag: int | None = None) -> Path:
    out = Path(out)
    if out.is_dir():
        raise InvalidInput(f"{out} is a folder; give the name of the HTML file to write, e.g. {out / 'report.html'}.")
    if max_side is not None and max_side < 0:
        raise InvalidInput(f"max_side must be 0 (keep the images' size) or more pixels (got {max_side}).")
    page = build_report(resolve_folder(run_id), max_side, per_tag)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
