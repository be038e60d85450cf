"""Scenes of the shapes world: what is where, how to sample one, and how to build one from a spec."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workbench.errors import InvalidInput
from workbench.evaluation import relative_position
from workbench.shapes.world import (
    BORDER_GAP,
    COLORS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    MAX_SIZE,
    MIN_SIZE,
    OBJECT_GAP,
    RELATIONS,
    SHAPES,
)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side of the (square) bounding box, pixels

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2.0
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "cx": self.cx, "cy": self.cy, "size": self.size}

    @classmethod
    def from_dict(cls, data: dict) -> ShapeObject:
        try:
            obj = cls(str(data["shape"]), str(data["color"]), float(data["cx"]), float(data["cy"]), float(data["size"]))
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInput(f"not a shape object: {data!r} ({error})") from None
        if obj.shape not in SHAPES or obj.color not in COLORS or obj.size <= 0:
            raise InvalidInput(f"not a shape object of this world: {data!r}")
        return obj


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    width: int = IMAGE_SIZE
    height: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            raise InvalidInput("a scene is a JSON object with an \"objects\" list")
        objects = tuple(ShapeObject.from_dict(o) for o in data["objects"])
        return cls(objects, int(data.get("width", IMAGE_SIZE)), int(data.get("height", IMAGE_SIZE)))


def scene_to_dict(scene: Scene) -> dict:
    return scene.to_dict()


def scene_from_dict(data: dict) -> Scene:
    return Scene.from_dict(data)


def boxes_too_close(a, b, gap: float = OBJECT_GAP) -> bool:
    """Whether two boxes overlap or leave fewer than `gap` pixels between them."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


# --- layout -------------------------------------------------------------------------------------

# The largest size that still lets n objects fit comfortably in 64x64 with their gaps.
_MAX_SIZE_FOR_COUNT = {1: MAX_SIZE, 2: MAX_SIZE, 3: 20.0, 4: 18.0}

# (object index, relation, target index): object must be `relation` its target, clearly: that is
# the only relation GenEval's rule finds between them.
Constraint = tuple[int, str, int]


def _layout(
    rng: np.random.Generator,
    items: list[tuple[str, str]],
    constraints: list[Constraint] = (),
    width: int = IMAGE_SIZE,
    height: int = IMAGE_SIZE,
    attempts: int = 60,
    tries_per_object: int = 60,
) -> Scene | None:
    """Random sizes and non-touching positions for (shape, colour) items, meeting the constraints.

    Objects are placed in order, so a constraint's target must come before its object.
    """
    n = len(items)
    max_size = _MAX_SIZE_FOR_COUNT.get(n, MIN_SIZE + 4)
    by_object: dict[int, list[tuple[str, int]]] = {}
    for index, relation, target in constraints:
        if target >= index:
            raise ValueError("a constraint's target must be placed before its object")
        by_object.setdefault(index, []).append((relation, target))
    for _ in range(attempts):
        placed: list[ShapeObject] = []
        for index, (shape, color) in enumerate(items):
            size = float(rng.uniform(MIN_SIZE, max_size))
            half = size / 2.0
            for _ in range(tries_per_object):
                cx = float(rng.uniform(BORDER_GAP + half, width - BORDER_GAP - half))
                cy = float(rng.uniform(BORDER_GAP + half, height - BORDER_GAP - half))
                candidate = ShapeObject(shape, color, round(cx, 2), round(cy, 2), round(size, 2))
                if any(boxes_too_close(candidate.box, other.box) for other in placed):
                    continue
                if all(relative_position(candidate.box, placed[t].box) == {rel} for rel, t in by_object.get(index, [])):
                    placed.append(candidate)
                    break
            else:
                break  # this object found no room: start the whole layout again
        if len(placed) == n:
            return Scene(tuple(placed), width, height)
    return None


def _random_item(rng: np.random.Generator) -> tuple[str, str]:
    return (SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))])


def _distinct_item(rng: np.random.Generator, taken: set[tuple[str, str]]) -> tuple[str, str]:
    while True:
        item = _random_item(rng)
        if item not in taken:
            return item


# Kinds of scene, with the object counts each allows and how often it is drawn.
_SCENE_KINDS = (
    ("single", 1, 1, 0.2),  # one object
    ("pair", 2, 2, 0.3),  # two different objects in a clear relation
    ("group", 2, 4, 0.2),  # several identical objects, for counting
    ("group_plus", 3, 4, 0.1),  # a group and one other object: "two red circles and a blue square"
    ("mixed", 2, 4, 0.2),  # anything goes
)


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene of min_objects..max_objects objects, drawn from a mix of scene kinds."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    kinds = [k for k in _SCENE_KINDS if k[1] <= max_objects and k[2] >= min_objects]
    weights = np.array([k[3] for k in kinds])
    while True:
        name, lo, hi, _ = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        n = int(rng.integers(max(lo, min_objects), min(hi, max_objects) + 1))
        constraints: list[Constraint] = []
        if name == "single":
            items = [_random_item(rng)]
        elif name == "pair":
            first = _random_item(rng)
            items = [first, _distinct_item(rng, {first})]
            constraints = [(1, RELATIONS[rng.integers(len(RELATIONS))], 0)]
        elif name == "group":
            items = [_random_item(rng)] * n
        elif name == "group_plus":
            group = _random_item(rng)
            items = [group] * (n - 1) + [_distinct_item(rng, {group})]
        else:
            items = [_random_item(rng) for _ in range(n)]
        # Shuffle so that the order of objects says nothing about their roles.
        order = rng.permutation(n) if not constraints else np.arange(n)
        scene = _layout(rng, [items[i] for i in order], constraints)
        if scene is not None:
            return scene


def scene_from_spec(spec: dict, rng: np.random.Generator, attempts: int = 60) -> Scene | None:
    """A scene that satisfies a GenEval metadata record's include/exclude clauses, or None if the
    world cannot hold it (unknown class or colour, more than four objects, contradictory clauses).

    Objects whose clause names no colour get random colours; positions are made clear (the asked
    relation is the only one GenEval's rule finds between the two objects).
    """
    items: list[tuple[str, str]] = []
    groups: list[list[int]] = []
    constraints: list[Constraint] = []
    for clause in spec.get("include", []):
        shape, count, color = clause.get("class"), int(clause.get("count", 1)), clause.get("color")
        if shape not in SHAPES or (color is not None and color not in COLORS) or count < 1:
            return None
        members = list(range(len(items), len(items) + count))
        for _ in members:
            items.append((shape, color or COLORS[rng.integers(len(COLORS))]))
        if "position" in clause:
            relation, target = clause["position"]
            if relation not in RELATIONS or not 0 <= target < len(groups):
                return None
            constraints += [(m, relation, t) for m in members for t in groups[target]]
        groups.append(members)
    if not items or len(items) > MAX_OBJECTS:
        return None
    for clause in spec.get("exclude", []):
        if sum(shape == clause.get("class") for shape, _ in items) >= int(clause.get("count", 1)):
            return None
    return _layout(rng, items, constraints, attempts=attempts)
