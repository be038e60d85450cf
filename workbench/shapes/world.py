"""The fixed vocabulary of the embedded shapes world (every other shapes module builds on it)."""

from __future__ import annotations

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
# Saturated, well separated in RGB (nearest pairs, orange/yellow and red/orange, are ~90 apart) and
# far from the background, so both the detector and a small generative model can tell them apart.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 45),
    "green": (40, 165, 65),
    "blue": (35, 85, 215),
    "yellow": (235, 215, 30),
    "purple": (140, 55, 185),
    "orange": (245, 125, 15),
}
BACKGROUND_RGB: tuple[int, int, int] = (245, 245, 245)

# GenEval's relation names: "A left of B" means A's centre lies left of B's.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
# Every English phrasing a prompt may use for a relation; the first one is GenEval's.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}

COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4

# Object sizes (bounding-box side, pixels) and spacing used by scene sampling.
MIN_SIZE = 10.0
MAX_SIZE = 22.0
OBJECT_GAP = 3.0  # empty pixels kept between the boxes of two objects
BORDER_GAP = 2.0  # empty pixels kept between a box and the image edge


def article(word: str) -> str:
    """'a' or 'an' for the word that follows it."""
    return "an" if word[:1] in "aeiou" else "a"
