"""IPR's relabeler: rewrite a prompt to what its image actually shows (Iterative Prompt Relabeling,
arXiv 2312.16204). IPR keeps training on (image, prompt) pairs whose prompt is true of the image:
a faithful image keeps its prompt, an unfaithful one gets a prompt rewritten from its detections,
and an image showing none of the asked objects is thrown away.

    relabel("two red circles left of a square", detections, 64, 64)
    -> RelabelResult(prompt="a blue square to the left of three red circles", changed=True, keep=True,
                     reasons=["asked for 2 circles, found 3", "asked circle left of square, observed right of"], ...)

Rules (each chosen so that the relabeler and GenEval's scorer, workbench.evaluation, agree):
* boxes are pixels of the width x height image; a box reaching a little past its edge is clipped to
  it (what the image shows is the part inside), and boxes outside it, far past its edge or all
  within [0, 1] (normalised, not pixels) are refused with a message, not relabeled wrongly;
* detections scoring at or below `box_threshold` are dropped (GenEval keeps score > threshold);
  per class the rest are ranked best first, at most 16, as the scorer does (group_detections);
* `changed` is False exactly when the scorer calls the image correct for the parsed prompt (tag
  inferred, so "three circles" is judged at the counting threshold, 0.9);
* the written prompt names every detected object of the classes the prompt asked for, with its
  detected count, then every other detected object whose class the vocabulary knows (IPR relabels
  to what the image shows; the shapes detector is exact, and for others the threshold is the
  user's call). Counts are written exact ("three circles" excludes a fourth), as GenEval does;
* colours are written when the prompt named one and the detector reports them: a class whose
  objects share a colour gets it ("two red circles"); a class of mixed colours is written without
  one ("two circles"), because GenEval checks a clause's colour on the class's top detections, so
  "a red circle and a blue circle" fails its scorer whatever the image. `split_colors=True`
  writes that split anyway (truer to the image, but GenEval's scorer cannot confirm it);
* a relation asked between two classes is written as observed by GenEval's rule
  (relative_position) between their written objects: the asked one if it holds for every pair,
  else the one that does (two holding: the one along the larger offset), else the pair is joined by
  "and". With one object a class this is the relation between the most confident detections.
  When a relation was asked but the image shows two other single objects (one of the named ones
  missing or replaced), the relation observed between those two is written, so the spatial fact
  survives the relabel. `say_relations=True` does that for every prompt: a relabel naming exactly
  two single objects says where one is relative to the other (the image shows it, and IPR's
  relabels are how a model that rarely composes a relation gets to see one named);
* a written "three circles" would be judged at the counting threshold: when fewer than three score
  above it, the prompt counts only those (or, with fewer than two, says "a circle");
* `keep` is False when nothing the prompt asked for was detected (IPR discards those samples).
With these rules, whenever `changed` is True the written prompt is one the scorer calls correct
for the same detections (split_colors aside).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from workbench.errors import InvalidInput
from workbench.evaluation import (
    COUNTING_THRESHOLD,
    POSITION_RELATIONS,
    THRESHOLD,
    group_detections,
    relative_position,
    score_detections,
)
from workbench.perception.base import Detection
from workbench.prompt_parser import Vocabulary, default_vocabulary, describe, framing, infer_tag, parse_prompt


@dataclass
class RelabelResult:
    prompt: str  # the prompt the image satisfies: the original when unchanged
    changed: bool
    keep: bool  # False: nothing the prompt asked for was detected, IPR drops the sample
    reasons: list[str]  # why it changed (or why it is not kept), short and readable
    spec: dict  # the original prompt, parsed
    detected_spec: dict = field(default_factory=dict)  # what the detections show, as a spec

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "changed": self.changed,
            "keep": self.keep,
            "reasons": list(self.reasons),
            "spec": self.spec,
            "detected_spec": self.detected_spec,
        }


# --- input checks -------------------------------------------------------------------------------


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_detection(item, where: str = "detection") -> Detection:
    """A Detection from a Detection or its dict, or InvalidInput saying what is wrong with it."""
    if isinstance(item, Detection):
        data = item.to_dict()
    elif isinstance(item, dict):
        data = item
    else:
        raise InvalidInput(f"{where} must be an object like {{\"label\": \"circle\", \"box\": [x0, y0, x1, y1], \"score\": 0.9}}")
    label, box, score, color = data.get("label"), data.get("box"), data.get("score"), data.get("color")
    if not isinstance(label, str) or not label.strip():
        raise InvalidInput(f"{where} needs a non-empty \"label\"")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_finite(v) for v in box):
        raise InvalidInput(f"{where} needs a \"box\" of four numbers [x0, y0, x1, y1] in pixels, got {box!r}")
    if box[2] < box[0] or box[3] < box[1]:
        raise InvalidInput(f"{where} has a box whose right or bottom edge comes before its left or top: {list(box)}")
    if not _finite(score) or not 0.0 <= score <= 1.0:
        raise InvalidInput(f"{where} needs a \"score\" between 0 and 1, got {score!r}")
    if color is not None and not isinstance(color, str):
        raise InvalidInput(f"{where} has a \"color\" that is not text: {color!r}")
    return Detection(label, tuple(float(v) for v in box), float(score), color or None)


# Detectors draw boxes a little past the image edge (GroundingDINO's are not clipped); a box reaching
# further out than this share of the image's side belongs to another image size.
MAX_OVERHANG = 0.25


def _inside_image(detections: list[Detection], width, height) -> list[Detection]:
    """The detections with their boxes clipped to the image; InvalidInput for boxes of another image
    size, or normalised to 0..1 instead of pixels."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"the image {name} must be a whole number of pixels, at least 1, got {value!r}")
    if detections and min(width, height) > 8 and all(0 <= v <= 1 for det in detections for v in det.box):
        raise InvalidInput(f"every box lies within [0, 1]: they look normalised, not in pixels; multiply x by the "
                           f"width ({width}) and y by the height ({height}) first")
    clipped = []
    for k, det in enumerate(detections):
        x0, y0, x1, y1 = det.box
        past = max(-x0 / width, -y0 / height, x1 / width - 1, y1 / height - 1)
        outside = x1 < 0 or y1 < 0 or x0 > width or y0 > height
        if outside or past > MAX_OVERHANG:
            where = "outside" if outside else "far past the edge of"
            raise InvalidInput(f"detection {k} ({det.label}) has a box {list(det.box)} {where} the {width}x{height} "
                               f"image: boxes of another image size?")
        box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
        clipped.append(replace(det, box=box) if box != det.box else det)
    return clipped


def load_detections(path) -> list[Detection]:
    """Detections from a JSON file: a list of {"label", "box", "score", "color"?} objects, or an
    object holding such a list under "detections"."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"detections file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise InvalidInput(f"detections file {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"cannot read detections file {path}: {error}") from None
    if isinstance(data, dict) and "detections" in data:
        data = data["detections"]
    if not isinstance(data, list):
        raise InvalidInput(f"detections file {path} must hold a JSON list of detections like [{{\"label\": \"circle\", \"box\": [x0, y0, x1, y1], \"score\": 0.9}}]")
    return [as_detection(item, f"{path.name}: detection {k}") for k, item in enumerate(data)]


# --- what the image shows -----------------------------------------------------------------------


@dataclass(eq=False)
class _Clause:
    """A written clause: detected objects of one class (and colour, when said)."""

    cls: str
    color: str | None
    members: list[Detection]
    relation: str | None = None
    target: _Clause | None = None
    paired: bool = False


def _asked_classes(spec: dict) -> list[str]:
    """The prompt's classes in the order it says them (a spec lists a relation's target first)."""
    include = spec["include"]
    subject_of = {clause["position"][1]: k for k, clause in enumerate(include) if "position" in clause}
    said: list[str] = []
    for k, clause in enumerate(include):
        if k in subject_of:
            said.append(include[subject_of[k]]["class"])
        said.append(clause["class"])
    return list(dict.fromkeys(said))


def _classes_to_write(spec: dict, found: dict[str, list[Detection]], vocabulary: Vocabulary) -> list[str]:
    """Asked classes that were detected, in the prompt's order, then the other detected classes the
    vocabulary can say (only those parse back), most confident first."""
    asked = [cls for cls in _asked_classes(spec) if cls in found]
    known = set(vocabulary.classes)
    others = [cls for cls in found if cls not in asked and cls in known]
    others.sort(key=lambda cls: (-found[cls][0].score, cls))
    return asked + others


def _color_groups(members: list[Detection], say_colors: bool, split_colors: bool) -> list[tuple[str | None, list[Detection]]]:
    """(colour, objects) clauses for one class, most confident first."""
    colors = [det.color for det in members]
    if not say_colors or None in colors:
        return [(None, members)]
    if len(set(colors)) == 1:
        return [(colors[0], members)]
    if not split_colors:
        return [(None, members)]
    return [(color, [d for d in members if d.color == color]) for color in dict.fromkeys(colors)]


def _center(det: Detection) -> tuple[float, float]:
    x0, y0, x1, y1 = det.box
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0


def observed_relation(subjects: list[Detection], targets: list[Detection], asked: str | None = None) -> str | None:
    """The relation of the subjects to the targets that GenEval's rule finds for every pair: the
    asked one when it holds, else the only one, else (diagonal) the one along the larger offset."""
    common = set(POSITION_RELATIONS)
    for subject in subjects:
        for target in targets:
            common &= relative_position(subject.box, target.box)
    if not common:
        return None
    if asked in common or len(common) == 1:
        return asked if asked in common else common.pop()
    dx = np.mean([_center(s)[0] - _center(t)[0] for s in subjects for t in targets])
    dy = np.mean([_center(s)[1] - _center(t)[1] for s in subjects for t in targets])
    horizontal = abs(dx) >= abs(dy)
    return next(r for r in POSITION_RELATIONS if r in common and (r in ("left of", "right of")) == horizontal)


def _pair_relations(spec: dict, first_clause: dict[str, _Clause]) -> None:
    """Link the written clauses of each asked pair by the relation observed between them."""
    include = spec["include"]
    for clause in include:
        if "position" not in clause:
            continue
        asked, target_index = clause["position"]
        subject_cls, target_cls = clause["class"], include[target_index]["class"]
        subject, target = first_clause.get(subject_cls), first_clause.get(target_cls)
        if subject is None or target is None or subject is target or subject.paired or target.paired:
            continue
        relation = observed_relation(subject.members, target.members, asked)
        if relation is not None:
            subject.relation, subject.target = relation, target
            subject.paired = target.paired = True


def _pair_two_singles(spec: dict, clauses: list[_Clause], any_prompt: bool = False) -> None:
    """A prompt about where things are (any prompt with `any_prompt`), whose image shows two other
    single objects (say "a circle above a triangle" drawn as a circle above a square): write where
    those two are, so the relabel keeps the spatial fact instead of dropping it."""
    asked = next((c["position"][0] for c in spec["include"] if "position" in c), None)
    if (asked is None and not any_prompt) or len(clauses) != 2 or any(c.paired or len(c.members) != 1 for c in clauses):
        return
    subject, target = clauses
    relation = observed_relation(subject.members, target.members, asked)
    if relation is not None:
        subject.relation, subject.target = relation, target
        subject.paired = target.paired = True


def _to_spec(clauses: list[_Clause], kept_excludes: list[dict]) -> dict:
    """GenEval metadata for the clauses: each target just before its subject, exact counts."""
    targets = {id(c.target) for c in clauses if c.target is not None}
    ordered: list[_Clause] = []
    for clause in clauses:
        if id(clause) in targets:
            continue  # placed just before the clause that points at it
        ordered += [clause.target, clause] if clause.target is not None else [clause]
    index = {id(c): k for k, c in enumerate(ordered)}
    include = []
    for clause in ordered:
        written = {"class": clause.cls, "count": len(clause.members)}
        if clause.color is not None:
            written["color"] = clause.color
        if clause.target is not None:
            written["position"] = [clause.relation, index[id(clause.target)]]
        include.append(written)
    totals = Counter()
    for clause in ordered:
        totals[clause.cls] += len(clause.members)
    exclude = [{"class": cls, "count": total + 1} for cls, total in totals.items() if total >= 2]
    spec = {"include": include}
    if exclude or kept_excludes:
        spec["exclude"] = exclude + kept_excludes
    return spec


def detected_spec(spec: dict, found: dict[str, list[Detection]], vocabulary: Vocabulary, split_colors: bool = False,
                  say_relations: bool = False) -> dict:
    """The spec of what the detections show, said in the terms of the prompt's spec (see module doc)."""
    say_colors = any("color" in clause for clause in spec["include"])
    clauses: list[_Clause] = []
    first_clause: dict[str, _Clause] = {}
    for cls in _classes_to_write(spec, found, vocabulary):
        for color, members in _color_groups(found[cls], say_colors, split_colors):
            clauses.append(_Clause(cls, color, members))
            first_clause.setdefault(cls, clauses[-1])  # holds the class's most confident object
    _pair_relations(spec, first_clause)
    _pair_two_singles(spec, clauses, any_prompt=say_relations)
    # "no dogs" stays true while no dog was detected.
    asked = set(_asked_classes(spec))
    kept_excludes = [dict(c) for c in spec.get("exclude", []) if int(c["count"]) == 1 and c["class"] not in asked and c["class"] not in found]
    return _to_spec(clauses, kept_excludes)


# --- scoring ------------------------------------------------------------------------------------


def _thresholds(box_threshold: float) -> dict:
    return {"threshold": box_threshold, "counting_threshold": max(COUNTING_THRESHOLD, box_threshold)}


def _verdict(spec: dict, detections: list[Detection], box_threshold: float):
    return score_detections({**spec, "tag": infer_tag(spec)}, detections, **_thresholds(box_threshold))


def _fit_counting_threshold(written: dict, spec: dict, detections: list[Detection], found, vocabulary, box_threshold: float, split_colors: bool) -> dict:
    """A lone counted clause ("three circles") is judged at the counting threshold: count only the
    objects above it, or say one object when fewer than two are."""
    if infer_tag(written) != "counting":
        return written
    cls = written["include"][0]["class"]
    confident = group_detections(detections, _thresholds(box_threshold)["counting_threshold"]).get(cls, [])
    if len(confident) >= len(found[cls]):
        return written
    kept = confident if len(confident) >= 2 else found[cls][:1]
    return detected_spec(spec, {**found, cls: kept}, vocabulary, split_colors)


# --- reasons ------------------------------------------------------------------------------------


def _count_phrase(n: int, cls: str, vocabulary: Vocabulary) -> str:
    return f"{n} {cls if n == 1 else vocabulary.plural(cls)}"


def _colors_said(members: list[Detection], cls: str) -> str:
    """ "blue square", "1 red, 1 blue"; a detector that reports no colour gives "no colour"."""
    colors = Counter(det.color or "no colour" for det in members)
    if len(colors) == 1:
        return f"{next(iter(colors))} {cls}" if members[0].color else "no colour"
    return ", ".join(f"{n} {color}" for color, n in colors.items())


def _differences(spec: dict, found: dict[str, list[Detection]], vocabulary: Vocabulary, written: dict) -> list[str]:
    """What the image does differently from the prompt, one short line each."""
    reasons = []
    include = spec["include"]
    exact_excludes = {(c["class"], int(c["count"])) for c in spec.get("exclude", [])}
    for cls in _asked_classes(spec):
        asked = sum(int(c["count"]) for c in include if c["class"] == cls)
        n = len(found.get(cls, []))
        exact = asked == 1 or (cls, asked + 1) in exact_excludes
        if n < asked or (exact and asked >= 2 and n > asked):
            reasons.append(f"asked for {_count_phrase(asked, cls, vocabulary)}, found {n}")
    for clause in include:
        count, members = int(clause["count"]), found.get(clause["class"], [])[: int(clause["count"])]
        # The scorer checks a colour on the class's `count` most confident objects.
        if "color" in clause and len(members) == count and any(det.color != clause["color"] for det in members):
            asked = f"{clause['color']} {clause['class']}" if count == 1 else f"{count} {clause['color']} {vocabulary.plural(clause['class'])}"
            reasons.append(f"asked {asked}, found {_colors_said(members, clause['class'])}")
    for clause in include:
        if "position" not in clause:
            continue
        asked, target_index = clause["position"]
        subject_cls, target_cls = clause["class"], include[target_index]["class"]
        if found.get(subject_cls) and found.get(target_cls):
            observed = relative_position(found[subject_cls][0].box, found[target_cls][0].box)
            if asked not in observed:
                said = " and ".join(sorted(observed)) or "no clear relation"
                reasons.append(f"asked {subject_cls} {asked} {target_cls}, observed {said}")
    included = set(_asked_classes(spec))
    for clause in spec.get("exclude", []):
        if int(clause["count"]) == 1 and clause["class"] not in included and found.get(clause["class"]):
            reasons.append(f"asked for no {clause['class']}, found {len(found[clause['class']])}")
    for cls in dict.fromkeys(c["class"] for c in written["include"]):
        if cls not in included:
            n = sum(c["count"] for c in written["include"] if c["class"] == cls)
            reasons.append(f"also found {_count_phrase(n, cls, vocabulary)}")
    return reasons


def _unsure_counts(spec: dict, detections: list[Detection], found, box_threshold: float, vocabulary: Vocabulary) -> list[str]:
    """A counting prompt whose objects were all found, but some not confidently enough to count."""
    if infer_tag(spec) != "counting":
        return []
    clause = spec["include"][0]
    counting_threshold = _thresholds(box_threshold)["counting_threshold"]
    confident = len(group_detections(detections, counting_threshold).get(clause["class"], []))
    if confident >= int(clause["count"]) or len(found.get(clause["class"], [])) < int(clause["count"]):
        return []
    return [f"asked for {_count_phrase(int(clause['count']), clause['class'], vocabulary)}, "
            f"found {confident} scoring above the counting threshold {counting_threshold:g}"]


# --- the relabeler ------------------------------------------------------------------------------


def relabel(
    prompt: str,
    detections: list,
    width: int,
    height: int,
    box_threshold: float = THRESHOLD,
    vocabulary: Vocabulary | None = None,
    *,
    split_colors: bool = False,
    say_relations: bool = False,
    keep_framing: bool = False,
) -> RelabelResult:
    """The prompt that the image (its detections: Detection objects or their dicts, boxes in pixels
    of a width x height image) actually satisfies; see the module doc for the rules.

    keep_framing=True writes the rewrite inside the prompt's own framing ("a photo of ... on a white
    background", `prompt_parser.framing`), so a relabeled prompt differs from the original only where
    the image does. Without it the rewrite is the bare scene, and only unchanged prompts keep their
    framing: a text encoder trained on such pairs learns that a framed prompt means a faithful image."""
    vocabulary = vocabulary or default_vocabulary()
    if not _finite(box_threshold) or not 0.0 <= box_threshold < 1.0:
        raise InvalidInput(f"the box threshold must be a number in [0, 1), got {box_threshold!r}")
    spec = parse_prompt(prompt, vocabulary)
    dets = _inside_image([as_detection(item, f"detection {k}") for k, item in enumerate(detections)], width, height)

    found = group_detections(dets, box_threshold)
    keep = any(cls in found for cls in _asked_classes(spec))
    written = detected_spec(spec, found, vocabulary, split_colors, say_relations)
    verdict = _verdict(spec, dets, box_threshold)
    if not spec["include"]:
        return RelabelResult(prompt, False, False, ["the prompt names no object the vocabulary knows"], spec, written)
    if verdict.correct:
        return RelabelResult(prompt, False, keep, [], spec, written)

    written = _fit_counting_threshold(written, spec, dets, found, vocabulary, box_threshold, split_colors)
    reasons = _differences(spec, found, vocabulary, written) + _unsure_counts(spec, dets, found, box_threshold, vocabulary)
    reasons = reasons or list(verdict.reasons)
    if not keep:
        reasons.append("nothing the prompt asked for was detected: drop this sample")
    rewrite = describe(written, vocabulary)
    if keep_framing:
        rewrite = with_framing(prompt, rewrite, vocabulary)
    return RelabelResult(rewrite, True, keep, reasons, spec, written)


def with_framing(original: str, scene: str, vocabulary: Vocabulary | None = None) -> str:
    """`scene` inside the original prompt's framing: ("a photo of two circles on a white background",
    "a square") -> "a photo of a square on a white background"."""
    prefix, suffix = framing(original, vocabulary)
    words = prefix.split()
    if words and words[-1].lower() in ("is", "are"):  # "there are three circles" -> "there is a circle"
        words[-1] = "is" if scene.split()[0] in ("a", "an") else "are"
    text = " ".join(words + [scene])
    if suffix:
        text += suffix if suffix[0] in ",.;:!?" else " " + suffix
    return text
