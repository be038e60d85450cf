"""CLIPScore: how well an image matches its prompt, by the cosine of their CLIP embeddings.

Convention: torchmetrics' `CLIPScore`, score = 100 x max(cos(image, prompt), 0), in [0, 100], with
openai/clip-vit-large-patch14 by default (torchmetrics' default too) and prompts cut to CLIP's 77 tokens.
Hessel et al. (2021) define CLIP-S as 2.5 x max(cos, 0) instead; multiply by 0.025 to compare with
their numbers. GenEval's verdicts say whether an image is right; CLIPScore adds a graded, detector-free
view of the same images, so a run can be compared with papers that report it.

`clip_score_for_run` scores a `workbench eval` output folder (its `verdicts.jsonl` and images) and
writes `clipscore.json` beside `scores.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .errors import InvalidInput
from .perception.clip_metrics import clip_model_name, load_clip

METRIC = "CLIPScore"
FORMULA = "100 * max(cos(image, prompt), 0) (torchmetrics' CLIPScore)"


def _clip(model, device: str | None = None):
    """A loaded Clip (or stand-in with embed_texts/embed_images) as given, else loaded by name."""
    if model is not None and not isinstance(model, (str, Path)):
        return model
    return load_clip(str(model) if model else clip_model_name(), METRIC, device=device)


def clip_score(images: Sequence[Image.Image], prompts: Sequence[str], model=None, *, batch_size: int = 16,
               device: str | None = None) -> list[float]:
    """One score per (image, prompt) pair: 100 x max(cos, 0), batched, without gradients.

    `model`: a hub id in the HF cache or a local folder (default $WORKBENCH_CLIP_MODEL or ViT-L/14),
    or an already loaded `Clip` to score many batches without reloading it.
    """
    if len(images) != len(prompts):
        raise InvalidInput(f"CLIPScore needs one prompt per image (got {len(images)} images, {len(prompts)} prompts).")
    if not images:
        return []
    clip = _clip(model, device)
    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        image_emb = clip.embed_images(list(images[start:start + batch_size]), batch_size=batch_size).float()
        text_emb = clip.embed_texts(list(prompts[start:start + batch_size])).float()
        unit = torch.nn.functional.normalize
        cosine = (unit(image_emb, dim=-1) * unit(text_emb, dim=-1)).sum(-1)
        scores += (100.0 * cosine.clamp(min=0.0)).tolist()
    return scores


def _read_rows(eval_dir: Path) -> list[dict]:
    verdicts = eval_dir / "verdicts.jsonl"
    if not verdicts.is_file():
        raise InvalidInput(f"{eval_dir} has no verdicts.jsonl: CLIPScore reads the output folder of `workbench eval`.")
    rows = []
    for number, line in enumerate(verdicts.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidInput(f"{verdicts}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("path", "prompt", "tag")):
            raise InvalidInput(f"{verdicts}, line {number}: a row needs \"path\", \"prompt\" and \"tag\" strings")
        if not (eval_dir / row["path"]).is_file():
            raise InvalidInput(f"{verdicts}, line {number}: image {eval_dir / row['path']} is missing")
        rows.append(row)
    if not rows:
        raise InvalidInput(f"{verdicts} lists no images")
    return rows


def clip_score_for_run(eval_dir, model=None, *, batch_size: int = 16, device: str | None = None) -> dict:
    """Score every image of a `workbench eval` folder against its prompt; write and return clipscore.json.

    The summary holds the mean over images, the mean per tag (tags in order of first appearance, as
    scores.json lists them), each image's score, the model and the formula.
    """
    eval_dir = Path(eval_dir)
    rows = _read_rows(eval_dir)
    clip = _clip(model, device)
    per_image = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = []
        for row in chunk:
            with Image.open(eval_dir / row["path"]) as image:
                images.append(image.convert("RGB"))
        scores = clip_score(images, [row["prompt"] for row in chunk], clip, batch_size=batch_size)
        per_image += [{"path": row["path"], "tag": row["tag"], "prompt": row["prompt"], "score": score}
                      for row, score in zip(chunk, scores)]
    per_tag: dict[str, dict] = {}
    for item in per_image:
        stats = per_tag.setdefault(item["tag"], {"total": 0.0, "images": 0})
        stats["total"] += item["score"]
        stats["images"] += 1
    summary = {
        "metric": METRIC,
        "formula": FORMULA,
        "model": getattr(clip, "name", None) or (str(model) if model else clip_model_name()),
        "mean": sum(item["score"] for item in per_image) / len(per_image),
        "images": len(per_image),
        "per_tag": {tag: {"mean": stats["total"] / stats["images"], "images": stats["images"]}
                    for tag, stats in per_tag.items()},
        "per_image": per_image,
    }
    (eval_dir / "clipscore.json").write_text(json.dumps(summary, indent=2))
    return summary
