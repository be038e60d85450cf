"""GenEval-style scoring of generated images from their detections.

The rules are GenEval's (Ghosh et al., 2023), copied from `evaluation/evaluate_images.py` and
`evaluation/summary_scores.py` of https://github.com/djghosh13/geneval :
* detections of a class are kept above a confidence threshold (0.3, or 0.9 for "counting" prompts),
  best first, at most 16 per class, with optional class-wise NMS (off by default: max_overlap 1.0);
* each `include` clause needs at least `count` of its class; colour and position are checked only on
  the `count` most confident of them; a position clause compares every one of them with every object
  of the earlier clause it points to, using `relative_position` below (POSITION_THRESHOLD = 0.1);
* any `exclude` clause whose `count` is reached fails the image (counting prompts exclude count+1);
* a prompt file's overall score is the mean of the per-tag accuracies.
GenEval classifies colours with CLIP on each box; here the detector reports each box's colour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.errors import InvalidInput
from workbench.perception.base import Box, Detection

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0  # 1.0 keeps overlapping boxes, as GenEval's default
POSITION_THRESHOLD = 0.1

POSITION_RELATIONS = ("left of", "right of", "above", "below")


def relative_position(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Position of A relative to B, factoring in object dimensions (GenEval's rule, verbatim).

    The centre offset is shrunk on each axis by `threshold` times the summed box dimensions; a
    relation holds when that shrunk offset, divided by the full offset's length, passes 0.5.
    """
    boxes = np.array([box_a, box_b], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised_offset = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised_offset) < 1e-3):
        return set()
    dx, dy = revised_offset / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def compute_iou(box_a: Box, box_b: Box) -> float:
    """GenEval's IoU (inclusive pixel ends, hence the +1), used only for its optional NMS."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


@dataclass
class Verdict:
    correct: bool
    reasons: list[str]
    # Which aspects held: "objects" (every class present), "counts" (include counts met and no
    # exclude reached), "colors" / "position" (None when the prompt asks for none). An aspect that
    # could not be checked because too few objects were found counts as not holding.
    requirements: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"correct": self.correct, "reasons": list(self.reasons), "requirements": dict(self.requirements)}


def _normalize_class(name: str) -> str:
    return " ".join(name.lower().split())


def group_detections(
    detections: list[Detection],
    threshold: float,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """Per class: detections scoring above `threshold`, best first, capped and NMS-filtered."""
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(_normalize_class(det.label), []).append(det)
    kept: dict[str, list[Detection]] = {}
    for name, dets in by_class.items():
        ordering = sorted((d for d in dets if d.score > threshold), key=lambda d: d.score, reverse=True)
        ordering = ordering[:max_objects]
        chosen: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            chosen.append(best)
            if nms_threshold < 1:
                ordering = [d for d in ordering if compute_iou(best.box, d.box) < nms_threshold]
        if chosen:
            kept[name] = chosen
    return kept


def score_detections(
    metadata: dict,
    detections: list[Detection],
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
) -> Verdict:
    """GenEval's verdict for one image of a prompt, given that image's detections."""
    confidence = counting_threshold if metadata.get("tag") == "counting" else threshold
    objects = group_detections(detections, confidence, max_objects, nms_threshold)

    correct = True
    reasons: list[str] = []
    present = counts_ok = True
    colors_ok: bool | None = None
    position_ok: bool | None = None
    matched_groups: list[list[Detection] | None] = []

    for req in metadata.get("include", []):
        classname = _normalize_class(req["class"])
        count = int(req["count"])
        matched = True
        if not objects.get(classname):
            present = False
        found = objects.get(classname, [])[:count]
        if "color" in req:
            colors_ok = True if colors_ok is None else colors_ok
        if "position" in req:
            position_ok = True if position_ok is None else position_ok
        if len(found) < count:
            correct = matched = counts_ok = False
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
            if "color" in req:
                colors_ok = False
            if "position" in req:
                position_ok = False
        else:
            if "color" in req:
                colors = [d.color for d in found]
                n_match = colors.count(req["color"])
                if n_match < count:
                    correct = matched = colors_ok = False
                    others = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors) if c is not None)
                    reasons.append(f"expected {req['color']} {classname}>={count}, found {n_match} {req['color']}; and {others}")
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = position_ok = False
                    reasons.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in matched_groups[target_group]:
                            true_rels = relative_position(obj.box, target.box, position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = position_ok = False
                                found_rels = " and ".join(sorted(true_rels))
                                reasons.append(f"expected {classname} {expected_rel} target, found {found_rels} target")
                                break
                        if not matched:
                            break
            elif "position" in req:
                position_ok = False  # GenEval skips the check once the colour failed
        matched_groups.append(found if matched else None)

    for req in metadata.get("exclude", []):
        classname = _normalize_class(req["class"])
        n_found = len(objects.get(classname, []))
        if n_found >= int(req["count"]):
            correct = counts_ok = False
            reasons.append(f"expected {classname}<{req['count']}, found {n_found}")

    return Verdict(
        correct=correct,
        reasons=reasons,
        requirements={"objects": present, "counts": counts_ok, "colors": colors_ok, "position": position_ok},
    )


# --- prompt files -------------------------------------------------------------------------------


def _check_clause(clause, where: str, index: int, kind: str, n_before: int) -> None:
    if not isinstance(clause, dict):
        raise InvalidInput(f"{where}: {kind}[{index}] must be an object like {{\"class\": \"circle\", \"count\": 1}}")
    if not isinstance(clause.get("class"), str) or not clause["class"].strip():
        raise InvalidInput(f"{where}: {kind}[{index}] needs a non-empty \"class\" string")
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidInput(f"{where}: {kind}[{index}] needs a whole \"count\" of at least 1, got {count!r}")
    if kind == "exclude":
        return
    if "color" in clause and (not isinstance(clause["color"], str) or not clause["color"].strip()):
        raise InvalidInput(f"{where}: include[{index}] has a \"color\" that is not a non-empty string")
    if "position" in clause:
        position = clause["position"]
        if not (isinstance(position, (list, tuple)) and len(position) == 2):
            raise InvalidInput(f"{where}: include[{index}] \"position\" must be [relation, clause index]")
        relation, target = position
        if relation not in POSITION_RELATIONS:
            raise InvalidInput(f"{where}: include[{index}] relation {relation!r} is not one of {', '.join(POSITION_RELATIONS)}")
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n_before:
            raise InvalidInput(f"{where}: include[{index}] position target {target!r} must index an earlier include clause")


def validate_metadata(record, where: str) -> dict:
    """Check one GenEval metadata record; `where` (file and line) starts every error message."""
    if not isinstance(record, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("tag"), str) or not record["tag"].strip():
        raise InvalidInput(f"{where}: missing \"tag\" (a non-empty string such as \"counting\")")
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise InvalidInput(f"{where}: missing \"prompt\" (the text to generate from)")
    include = record.get("include")
    if not isinstance(include, list) or not include:
        raise InvalidInput(f"{where}: \"include\" must be a non-empty list of clauses")
    for i, clause in enumerate(include):
        _check_clause(clause, where, i, "include", i)
    exclude = record.get("exclude", [])
    if not isinstance(exclude, list):
        raise InvalidInput(f"{where}: \"exclude\" must be a list of clauses")
    for i, clause in enumerate(exclude):
        _check_clause(clause, where, i, "exclude", 0)
    return record


def load_prompt_file(path) -> list[dict]:
    """Read a GenEval `evaluation_metadata.jsonl` file (one JSON record a line, blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"cannot read prompt file {path}: {error}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidInput(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        records.append(validate_metadata(record, where))
    if not records:
        raise InvalidInput(f"prompt file {path} holds no prompts")
    return records


# --- summaries ----------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict:
    """GenEval's summary of per-image results (each row has "tag", "correct" and ideally "prompt").

    overall is the mean of the per-tag accuracies (tags in order of first appearance), not the mean
    over images, so every task weighs the same whatever its number of prompts.
    """
    per_tag: dict[str, dict] = {}
    by_prompt: dict[str, bool] = {}
    for row in rows:
        correct = bool(row["correct"])
        stats = per_tag.setdefault(row["tag"], {"correct": 0, "total": 0})
        stats["correct"] += int(correct)
        stats["total"] += 1
        key = row.get("metadata") or row.get("prompt")
        if key is not None:
            key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
            by_prompt[key] = by_prompt.get(key, False) or correct
    for stats in per_tag.values():
        stats["accuracy"] = stats["correct"] / stats["total"]
    n_images = sum(s["total"] for s in per_tag.values())
    return {
        "per_tag": per_tag,
        "overall": float(np.mean([s["accuracy"] for s in per_tag.values()])) if per_tag else None,
        "images": n_images,
        "image_accuracy": sum(s["correct"] for s in per_tag.values()) / n_images if n_images else None,
        "prompts": len(by_prompt),
        "prompt_accuracy": sum(by_prompt.values()) / len(by_prompt) if by_prompt else None,
    }
