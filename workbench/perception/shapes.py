"""Embedded perception for the shapes world: classical image analysis, numpy only.

How an image is read:
1. Background = median colour of the image border (objects keep off the edges).
2. Every pixel is unmixed against each palette colour: pixel = bg + alpha * (colour - bg). The
   colour whose line fits best labels the pixel, alpha is its coverage. Anti-aliased edges are
   exactly such mixes, so they unmix cleanly instead of looking like a different colour.
3. Foreground = alpha > 0.5; blobs = its 8-connected components. A blob's colour is the majority
   vote of its pixels; a blob holding two large single-colour parts (touching objects, as a
   generative model may draw them) is split into those parts. Specks are ignored.
4. Each object's shape is found by fitting the three shape templates to its alpha map: the area
   and centroid fix each template's size and position; the template with the best soft IoU wins.
   The score grows with that IoU and is discounted when the runner-up template fits nearly as
   well or the blob's colour is mixed: a clean rendering scores 1, a blurred or misshapen blob
   much less.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from workbench.perception.base import Box, Detection, Tag
from workbench.shapes.captions import brief_caption, long_caption, short_caption
from workbench.shapes.render import coverage
from workbench.shapes.scene import Scene, ShapeObject
from workbench.shapes.world import COLOR_RGB, COLORS, PLURALS, SHAPES

_PALETTE = np.array([COLOR_RGB[c] for c in COLORS], dtype=np.float64)
_SHAPE_OF_PLURAL = {plural: shape for shape, plural in PLURALS.items()}

# Pixels whose colour lies this far (RGB units) from every palette line are "unknown" colour.
_MAX_RESIDUAL = 70.0
# A second colour in a blob is a separate object when it holds this share of the blob's pixels.
_SPLIT_SHARE = 0.25
# Template fit (soft IoU) at or below which the score is 0, and at or above which it is 1: a clean
# render fits at ~0.99, a slightly soft one (blur ~1 px) at ~0.85, a misshapen blob below ~0.7.
_FIT_FLOOR, _FIT_FULL = 0.6, 0.85
# Lead of the best template over the runner-up below which the shape counts as ambiguous (a clean
# render leads by ~0.16; a rounded square between circle and square by ~0.03).
_CLEAR_MARGIN = 0.05
# Share of a blob's pixels in its majority colour at or below which the score is 0, and at or
# above which colour costs nothing.
_PURITY_FLOOR, _PURITY_FULL = 0.6, 0.9


# --- pixel analysis ----------------------------------------------------------------------------


@dataclass
class PixelAnalysis:
    background: np.ndarray  # (3,) RGB
    alpha: np.ndarray  # (H, W, K) coverage of each palette colour, in [0, 1]
    label: np.ndarray  # (H, W) index of the best-fitting palette colour, -1 if none fits
    foreground: np.ndarray  # (H, W) bool
    coverage: np.ndarray  # (H, W) coverage in the pixel's own colour (1 for unknown colours)


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    return array


def estimate_background(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def analyse_pixels(image) -> PixelAnalysis:
    pixels = _as_rgb_array(image)
    background = estimate_background(pixels)
    delta = pixels - background  # (H, W, 3)
    directions = _PALETTE - background  # (K, 3)
    norms = np.maximum((directions**2).sum(axis=1), 1e-6)
    dots = delta @ directions.T  # (H, W, K)
    alpha = np.clip(dots / norms, 0.0, 1.0)
    length2 = (delta**2).sum(axis=-1)
    # |delta - alpha * d|^2, expanded so no (H, W, K, 3) array is built.
    residual2 = length2[..., None] - 2.0 * alpha * dots + alpha**2 * norms
    best = residual2.argmin(axis=-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]
    best_residual2 = np.take_along_axis(residual2, best[..., None], axis=-1)[..., 0]
    # Far from the background but on no palette line (a dark smudge): foreground of unknown colour.
    unknown = (best_residual2 > _MAX_RESIDUAL**2) & (length2 > 0.25 * norms.min())
    label = np.where(unknown, -1, best)
    foreground = (best_alpha > 0.5) | unknown
    return PixelAnalysis(background, alpha, label, foreground, np.where(unknown, 1.0, best_alpha))


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels with -1 off the mask, count).

    Min-label propagation with pointer jumping; converges in a few dozen cheap numpy steps.
    """
    height, width = mask.shape
    none = height * width
    labels = np.where(mask, np.arange(none).reshape(height, width), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        smallest = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(smallest, padded[dy : dy + height, dx : dx + width], out=smallest)
        smallest = np.where(mask, smallest, none)
        flat = np.append(smallest.ravel(), none)
        for _ in range(4):  # pointer jumping: follow each label to its own label
            smallest = np.where(mask, flat[smallest], none)
            flat = np.append(smallest.ravel(), none)
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    roots, dense = np.unique(labels[mask], return_inverse=True)
    out = np.full((height, width), -1, dtype=np.int64)
    out[mask] = dense
    return out, len(roots)


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


# --- shape fitting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeFit:
    shape: str
    cx: float
    cy: float
    size: float
    fit: float  # soft IoU of the template with the observed coverage


def _template_geometry(shape: str, area: float, mx: float, my: float) -> tuple[float, float, float]:
    """Centre and size of a shape with the given area and centroid (exact for this world's shapes)."""
    if shape == "circle":
        return mx, my, 2.0 * np.sqrt(area / np.pi)
    if shape == "square":
        return mx, my, np.sqrt(area)
    size = np.sqrt(2.0 * area)  # upright triangle: half its box; centroid 2/3 of the way down
    return mx, my - size / 6.0, size


def fit_shapes(alpha: np.ndarray, origin: tuple[int, int]) -> list[ShapeFit]:
    """Every shape template fitted to a coverage map whose top-left pixel is `origin`, best first."""
    total = float(alpha.sum())
    if total <= 0:
        return []
    height, width = alpha.shape
    ox, oy = origin
    ys, xs = np.mgrid[0:height, 0:width]
    mx = ox + float((alpha * (xs + 0.5)).sum()) / total
    my = oy + float((alpha * (ys + 0.5)).sum()) / total
    fits = []
    for shape in SHAPES:
        cx, cy, size = _template_geometry(shape, total, mx, my)
        template = coverage(shape, cx, cy, size, (ox, oy, ox + width, oy + height))
        fit = float(np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-9))
        fits.append(ShapeFit(shape, cx, cy, size, fit))
    return sorted(fits, key=lambda f: f.fit, reverse=True)


def _score(fits: list[ShapeFit], purity: float) -> float:
    """Confidence that the blob is one clean object of the best-fitting shape."""
    best = fits[0].fit
    margin = best - fits[1].fit if len(fits) > 1 else 1.0

    def ramp(value: float, floor: float, full: float) -> float:
        return float(np.clip((value - floor) / (full - floor), 0.0, 1.0))

    # An ambiguous shape halves the score rather than zeroing it: it is still some object.
    clarity = 0.5 + 0.5 * ramp(margin, 0.0, _CLEAR_MARGIN)
    return ramp(best, _FIT_FLOOR, _FIT_FULL) * clarity * ramp(purity, _PURITY_FLOOR, _PURITY_FULL)


# --- detector ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    mask: np.ndarray  # (H, W) bool, the object's foreground pixels
    color: int  # palette index
    purity: float  # share of the blob's pixels that have this colour


def _pieces(analysis: PixelAnalysis, min_area: int) -> list[_Piece]:
    blobs, n_blobs = connected_components(analysis.foreground)
    areas = np.bincount(blobs[blobs >= 0], minlength=n_blobs)
    pieces = []
    for blob in np.flatnonzero(areas >= min_area):
        mask = blobs == blob
        colors = analysis.label[mask]
        votes = np.bincount(colors[colors >= 0], minlength=len(COLORS))
        if votes.sum() == 0:
            continue  # nothing in a palette colour
        significant = [k for k in np.argsort(votes)[::-1] if votes[k] >= max(min_area, _SPLIT_SHARE * mask.sum())]
        if len(significant) <= 1:
            majority = int(votes.argmax())
            pieces.append(_Piece(mask, majority, float(votes[majority] / mask.sum())))
            continue
        for k in significant:  # touching objects of different colours: one piece per colour part
            parts, n_parts = connected_components(mask & (analysis.label == k))
            part_areas = np.bincount(parts[parts >= 0], minlength=n_parts)
            for part in np.flatnonzero(part_areas >= min_area):
                part_mask = parts == part
                # Edge pixels of the other colour muddy the split, not the object: count as pure.
                pieces.append(_Piece(part_mask, int(k), 1.0))
    return pieces


def _parse_label(label: str) -> tuple[str | None, str | None]:
    """(shape, colour) named by a label such as "circle", "red squares" or "a blue triangle"."""
    shape = color = None
    for word in re.findall(r"[a-z]+", label.lower()):
        word = _SHAPE_OF_PLURAL.get(word, word)
        if word in SHAPES:
            shape = word
        elif word in COLORS:
            color = word
    return shape, color


def _matches(detection: Detection, labels: list[str]) -> bool:
    for label in labels:
        shape, color = _parse_label(label)
        if shape is None and color is None:
            continue
        if shape in (None, detection.label) and color in (None, detection.color):
            return True
    return False


class ShapesDetector:
    """Finds the world's shapes with their colours; scores say how cleanly each one is drawn."""

    # Below this a detection is a blob that fits two shapes almost equally (an ambiguous fit halves
    # the score) or is impure in colour: something is there, but which shape is a guess. IPR does
    # not train on images holding one (`IPRConfig.min_confidence`).
    confident_score = 0.9

    def __init__(self, min_score: float = 0.05, min_area: int = 12):
        self.min_score = min_score
        self.min_area = min_area  # pixels in a 64x64 image; scaled with the image's area

    def detect(self, image: Image.Image, labels: list[str] | None = None) -> list[Detection]:
        analysis = analyse_pixels(image)
        height, width = analysis.label.shape
        min_area = max(4, int(round(self.min_area * height * width / 4096)))
        detections = []
        for piece in _pieces(analysis, min_area):
            ys, xs = np.nonzero(piece.mask)
            # Window around the piece, wide enough to hold a slightly misplaced template.
            x0, y0 = max(int(xs.min()) - 3, 0), max(int(ys.min()) - 3, 0)
            x1, y1 = min(int(xs.max()) + 4, width), min(int(ys.max()) + 4, height)
            inside = piece.mask[y0:y1, x0:x1]
            # The piece plus its faint anti-aliased rim (background-side pixels next to it).
            rim = _dilate(inside) & ~analysis.foreground[y0:y1, x0:x1]
            # Rim pixels count by their coverage in the object's colour; the piece's own pixels by
            # their coverage in whatever colour they have (an off-colour pixel is still covered).
            alpha = np.where(rim, analysis.alpha[y0:y1, x0:x1, piece.color], 0.0)
            alpha = np.where(inside, analysis.coverage[y0:y1, x0:x1], alpha)
            fits = fit_shapes(alpha, (x0, y0))
            if not fits:
                continue
            best = fits[0]
            score = _score(fits, piece.purity)
            if score < self.min_score:
                continue
            half = best.size / 2.0
            box = (best.cx - half, best.cy - half, best.cx + half, best.cy + half)
            detections.append(Detection(best.shape, tuple(float(v) for v in box), score, COLORS[piece.color]))
        detections.sort(key=lambda d: d.score, reverse=True)
        if labels is not None:
            detections = [d for d in detections if _matches(d, labels)]
        return detections


class ShapesSegmenter:
    """Per box, the foreground pixels inside it that have the box's majority colour."""

    def segment(self, image: Image.Image, boxes: list[Box]) -> list[np.ndarray]:
        analysis = analyse_pixels(image)
        height, width = analysis.label.shape
        masks = []
        for box in boxes:
            x0, y0 = max(int(np.floor(box[0])) - 1, 0), max(int(np.floor(box[1])) - 1, 0)
            x1, y1 = min(int(np.ceil(box[2])) + 1, width), min(int(np.ceil(box[3])) + 1, height)
            mask = np.zeros((height, width), dtype=bool)
            window = analysis.foreground[y0:y1, x0:x1] & (analysis.label[y0:y1, x0:x1] >= 0)
            if window.any():
                majority = np.bincount(analysis.label[y0:y1, x0:x1][window]).argmax()
                mask[y0:y1, x0:x1] = window & (analysis.label[y0:y1, x0:x1] == majority)
            masks.append(mask)
        return masks


def scene_from_detections(detections: list[Detection], width: int, height: int, min_score: float = 0.3) -> Scene:
    """The scene the detections describe (boxes become centres and sizes)."""
    objects = []
    for det in detections:
        if det.score < min_score or det.label not in SHAPES:
            continue
        x0, y0, x1, y1 = det.box
        size = float(((x1 - x0) + (y1 - y0)) / 2.0)
        objects.append(ShapeObject(det.label, det.color or "", (x0 + x1) / 2.0, (y0 + y1) / 2.0, size))
    return Scene(tuple(objects), width, height)


class ShapesTagger:
    """Tags for each shape, colour and "colour shape" seen, scored by their best detection."""

    def __init__(self, detector: ShapesDetector | None = None, min_score: float = 0.3):
        self.detector = detector or ShapesDetector()
        self.min_score = min_score

    def tag(self, image: Image.Image) -> list[Tag]:
        best: dict[str, float] = {}
        for det in self.detector.detect(image):
            if det.score < self.min_score:
                continue
            names = [det.label] + ([det.color, f"{det.color} {det.label}"] if det.color else [])
            for name in names:
                best[name] = max(best.get(name, 0.0), det.score)
        return [Tag(name, score) for name, score in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))]


class ShapesCaptioner:
    """Captions written from the detections with the world's own caption grammar.

    brief_short=True makes the short caption brief, as people write one: objects and counts without
    colours ("two circles and a square", `brief_caption`); the long one still states every colour
    and the layout. inline_pairs=True writes a related pair in one phrase in both modes ("a red circle
    to the left of a blue square", "a circle to the left of a square"), see `figure_and_ground`.
    """

    def __init__(self, detector: ShapesDetector | None = None, min_score: float = 0.3, brief_short: bool = False,
                 inline_pairs: bool = False):
        self.detector = detector or ShapesDetector()
        self.min_score = min_score
        self.brief_short = brief_short
        self.inline_pairs = inline_pairs

    def caption(self, image: Image.Image, mode: str = "short") -> str:
        if mode not in ("short", "long"):
            raise ValueError(f"caption mode must be 'short' or 'long', not {mode!r}")
        width, height = image.size
        scene = scene_from_detections(self.detector.detect(image), width, height, self.min_score)
        if mode == "long":
            return long_caption(scene, inline_pairs=self.inline_pairs)
        return brief_caption(scene, self.inline_pairs) if self.brief_short else short_caption(scene)


def match_scene(scene: Scene, detections: list[Detection], min_iou: float = 0.5) -> tuple[bool, list[float]]:
    """Whether the detections recover the scene exactly (same objects, shapes and colours, boxes
    matched one-to-one at IoU >= min_iou) and the IoUs of the matched pairs."""
    remaining = list(detections)
    ious = []
    exact = len(detections) == len(scene.objects)
    for obj in scene.objects:
        candidates = [(box_iou(obj.box, d.box), i) for i, d in enumerate(remaining)]
        if not candidates:
            exact = False
            continue
        iou, index = max(candidates)
        det = remaining[index]
        if iou < min_iou:
            exact = False
            continue
        remaining.pop(index)
        ious.append(iou)
        if det.label != obj.shape or det.color != obj.color:
            exact = False
    return exact and not remaining, ious


def box_iou(a: Box, b: Box) -> float:
    """IoU of two continuous xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
