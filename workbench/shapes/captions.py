"""Caption writers for shapes scenes: exact long and short captions, noisy web alt text, prompts.

Grammar (deterministic, all lower case, no final full stop):
* objects are grouped by (colour, shape); groups are listed left to right by their leftmost member:
  "two red circles, a blue square and an orange triangle";
* the long caption adds one clause per group after the first, saying where it is relative to an
  earlier group (the nearest earlier one for which the relation holds for every pair of members),
  by GenEval's own position rule so captions and the scorer agree:
  "...; the blue square is to the right of the red circles; the orange triangle is below the blue square";
* with inline_pairs, a scene of two related groups is one phrase, the smaller group placed relative
  to the other: "a blue square to the left of two red circles" (brief: "a square to the left of two circles").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workbench.evaluation import relative_position
from workbench.prompt_parser import join_list, said_with_relations
from workbench.shapes.scene import Scene, ShapeObject
from workbench.shapes.world import COLORS, COUNT_WORDS, OPPOSITE_RELATION, PLURALS, RELATIONS, SHAPES, article

# How the long caption says each relation.
CAPTION_RELATION_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# A group is the figure of a pair (placed relative to the other) when it has fewer objects, or as
# many and this much less area.
FIGURE_AREA_RATIO = 1.5
# Web alt text often starts like this.
ALT_TEXT_PREFIXES = ("photo of", "image of", "picture of", "stock image of", "clipart of", "illustration of")


# --- phrases ------------------------------------------------------------------------------------


def object_phrase(shape: str, color: str | None = None, count: int | None = 1, numerals: bool = False) -> str:
    """ "a red circle", "an orange square", "three circles", "3 blue triangles" (numerals are used
    for counts of 2 and more; one object always takes an article); count None: "circles"."""
    noun = shape if count == 1 else PLURALS.get(shape, shape + "s")
    words = f"{color} {noun}" if color else noun
    if count is None:
        return words
    if count == 1:
        return f"{article(words)} {words}"
    return f"{count if numerals else COUNT_WORDS.get(count, str(count))} {words}"


def definite_phrase(shape: str, color: str | None, count: int) -> str:
    noun = shape if count == 1 else PLURALS.get(shape, shape + "s")
    return f"the {color} {noun}" if color else f"the {noun}"


# --- scene description -------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    shape: str
    color: str
    members: tuple[ShapeObject, ...]

    @property
    def count(self) -> int:
        return len(self.members)


def group_objects(scene: Scene) -> list[Group]:
    """Objects grouped by (colour, shape), groups ordered left to right by their leftmost member."""
    grouped: dict[tuple[str, str], list[ShapeObject]] = {}
    for obj in scene.objects:
        grouped.setdefault((obj.color, obj.shape), []).append(obj)
    groups = [Group(shape, color, tuple(members)) for (color, shape), members in grouped.items()]
    return sorted(groups, key=lambda g: (min(o.cx for o in g.members), min(o.cy for o in g.members), g.shape, g.color))


def group_relation(group: Group, reference: Group) -> str | None:
    """The relation of `group` to `reference` that holds for every pair of their members (GenEval's
    rule); where two hold (diagonal), the one along the larger centre offset; None if none holds."""
    common = set(RELATIONS)
    for obj in group.members:
        for ref in reference.members:
            common &= relative_position(obj.box, ref.box)
    if not common:
        return None
    if len(common) == 1:
        return common.pop()
    dx = np.mean([o.cx - r.cx for o in group.members for r in reference.members])
    dy = np.mean([o.cy - r.cy for o in group.members for r in reference.members])
    horizontal = abs(dx) >= abs(dy)
    return next(r for r in RELATIONS if r in common and (r in ("left of", "right of")) == horizontal)


def scene_relations(groups: list[Group]) -> list[tuple[int, str, int]]:
    """(group index, relation, earlier group index) for each group after the first that has one."""
    relations = []
    for j in range(1, len(groups)):
        for i in range(j - 1, -1, -1):
            relation = group_relation(groups[j], groups[i])
            if relation is not None:
                relations.append((j, relation, i))
                break
    return relations


@dataclass(frozen=True)
class _Mention:
    """How a caption states one group (possibly wrongly)."""

    shape: str
    color: str | None
    count: int | None  # None: plural without a number


def _write(mentions: list[_Mention], relations: list[tuple[int, str, int]]) -> str:
    text = join_list([object_phrase(m.shape, m.color, m.count) for m in mentions])
    clauses = []
    for j, relation, i in relations:
        subject, reference = mentions[j], mentions[i]
        verb = "is" if subject.count == 1 else "are"
        clauses.append(
            f"{definite_phrase(subject.shape, subject.color, subject.count or 2)} {verb} "
            f"{CAPTION_RELATION_PHRASE[relation]} {definite_phrase(reference.shape, reference.color, reference.count or 2)}"
        )
    return "; ".join([text] + clauses) if text else ""


def clause_caption(shapes: list[tuple[str, str | None]], relations: list[tuple[int, str, int]]) -> str:
    """Single shapes, (shape, colour or None) each, as the long captions state them: the list, then one
    clause per (placed, relation, reference) index triple, "a square and a blue triangle; the blue
    triangle is below the square" for [(square, None), (triangle, blue)] and [(1, "below", 0)]."""
    return _write([_Mention(shape, color, 1) for shape, color in shapes], relations)


def _mentions(groups: list[Group]) -> list[_Mention]:
    return [_Mention(g.shape, g.color or None, g.count) for g in groups]


def short_caption(scene: Scene) -> str:
    """Every object with its colour and count, no layout: "two red circles and a blue square"."""
    return _write(_mentions(group_objects(scene)), [])


def _shape_groups(scene: Scene) -> list[Group]:
    """Objects grouped by shape alone (colours ignored), ordered left to right by their leftmost member."""
    by_shape: dict[str, list[ShapeObject]] = {}
    for obj in scene.objects:
        by_shape.setdefault(obj.shape, []).append(obj)
    groups = [Group(shape, "", tuple(members)) for shape, members in by_shape.items()]
    return sorted(groups, key=lambda g: (min(o.cx for o in g.members), min(o.cy for o in g.members), g.shape))


def brief_caption(scene: Scene, inline_pairs: bool = False) -> str:
    """What and how many, as a brief human caption says it: no colours, no layout: "two circles and a
    square". Shapes are listed left to right by their leftmost object.

    inline_pairs=True says where a pair of shapes lies when one phrase can: "a circle above a square"
    (see `long_caption`); other scenes keep the list.
    """
    groups = _shape_groups(scene)
    if inline_pairs and len(groups) == 2 and (pair := figure_and_ground(groups)):
        return _pair_phrase(*pair)
    return join_list([object_phrase(g.shape, None, g.count) for g in groups])


def figure_and_ground(groups: list[Group]) -> tuple[Group, str, Group] | None:
    """For two groups: (figure, relation, ground) as people place one thing relative to another, the
    smaller group (fewer objects, then clearly less area, then the name) placed relative to the
    other; None when no relation holds for every pair of members. Either group can be the figure, so
    every relation (left of as well as right of) gets said, not only the later group's to the earlier."""
    first, second = groups
    relation = group_relation(second, first)
    if relation is None:
        return None

    def area(group: Group) -> float:
        return sum(o.size ** 2 for o in group.members)

    # Sizes decide only when they clearly differ, so a captioner's small size errors do not flip the
    # phrase; otherwise the names do (stable, and independent of where the groups lie).
    if first.count != second.count:
        first_is_figure = first.count < second.count
    elif max(area(first), area(second)) > FIGURE_AREA_RATIO * min(area(first), area(second)):
        first_is_figure = area(first) < area(second)
    else:
        first_is_figure = (first.shape, first.color) < (second.shape, second.color)
    if first_is_figure:
        return first, OPPOSITE_RELATION[relation], second
    return second, relation, first


def _pair_phrase(figure: Group, relation: str, ground: Group) -> str:
    """ "a blue square to the left of two red circles"; groups without a colour are said without one."""
    return (f"{object_phrase(figure.shape, figure.color or None, figure.count)} {CAPTION_RELATION_PHRASE[relation]} "
            f"{object_phrase(ground.shape, ground.color or None, ground.count)}")


def long_caption(scene: Scene, inline_pairs: bool = False) -> str:
    """The short caption plus where each group lies relative to an earlier one.

    inline_pairs=True says a scene of two related groups in one phrase, as people describe a pair:
    "a blue square to the right of two red circles" instead of "two red circles and a blue square;
    the blue square is to the right of the red circles". Larger scenes keep the clauses.
    """
    groups = group_objects(scene)
    if inline_pairs and len(groups) == 2 and (pair := figure_and_ground(groups)):
        return _pair_phrase(*pair)
    return _write(_mentions(groups), scene_relations(groups))


# --- noisy alt text -----------------------------------------------------------------------------


@dataclass
class AltTextNoise:
    """How often web alt text gets a scene wrong; every rate is a probability in [0, 1].

    Units: drop_object, wrong_count, drop_count, drop_color are drawn per group (drop_object for
    every group but the first, so something is always mentioned; drop_count only for groups said
    to hold 2+); swap_color once per caption that mentions two groups of different colours;
    omit_relation and swap_relation per relation clause; prefix once per caption.
    The defaults make most captions wrong or silent about composition, so a model trained on them
    confuses counts, lets colours leak between objects and misplaces objects.
    """

    drop_object: float = 0.3  # leave a group out
    wrong_count: float = 0.3  # state a different number (1 to 4)
    drop_count: float = 0.3  # plural with no number: "red circles"
    drop_color: float = 0.35  # leave out the colour word
    swap_color: float = 0.25  # exchange the colours of two groups (attribute leakage)
    omit_relation: float = 0.6  # say nothing about where a group is
    swap_relation: float = 0.3  # state the opposite relation
    prefix: float = 0.4  # start with "photo of", "image of", ...

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AltTextNoise.{name} must be in [0, 1], got {value}")


def noisy_alt_text(scene: Scene, rng: np.random.Generator, noise: AltTextNoise = AltTextNoise()) -> str:
    """Short web-style alt text for the scene, with compositional errors at the rates of `noise`.

    With every rate at 0 this is exactly `long_caption(scene)`.
    """
    groups = group_objects(scene)
    relations = scene_relations(groups)
    mentions = _mentions(groups)

    keep = [0] + [j for j in range(1, len(mentions)) if rng.random() >= noise.drop_object]
    new_index = {old: new for new, old in enumerate(keep)}
    mentions = [mentions[j] for j in keep]
    relations = [(new_index[j], r, new_index[i]) for j, r, i in relations if j in new_index and i in new_index]

    noisy = []
    for m in mentions:
        count, color = m.count, m.color
        if rng.random() < noise.wrong_count:
            count = int(rng.choice([c for c in COUNT_WORDS if c != count]))
        if count is not None and count >= 2 and rng.random() < noise.drop_count:
            count = None
        if rng.random() < noise.drop_color:
            color = None
        noisy.append(_Mention(m.shape, color, count))
    mentions = noisy

    colored = [k for k, m in enumerate(mentions) if m.color]
    if len({mentions[k].color for k in colored}) >= 2 and rng.random() < noise.swap_color:
        while True:
            a, b = rng.choice(colored, size=2, replace=False)
            if mentions[a].color != mentions[b].color:
                break
        ma, mb = mentions[a], mentions[b]
        mentions[a], mentions[b] = _Mention(ma.shape, mb.color, ma.count), _Mention(mb.shape, ma.color, mb.count)

    stated = []
    for j, relation, i in relations:
        if rng.random() < noise.omit_relation:
            continue
        if rng.random() < noise.swap_relation:
            relation = OPPOSITE_RELATION[relation]
        stated.append((j, relation, i))

    text = _write(mentions, stated)
    if rng.random() < noise.prefix:
        text = f"{ALT_TEXT_PREFIXES[rng.integers(len(ALT_TEXT_PREFIXES))]} {text}"
    return text


# --- prompts ------------------------------------------------------------------------------------


def prompt_for_spec(spec: dict, relation_phrases: dict[str, str] | None = None, numerals: bool = False) -> str:
    """An English prompt for a GenEval metadata record's include clauses.

    "a red circle and a blue square"; a positioned clause is said with its target, in GenEval's
    words unless `relation_phrases` maps relations to other phrasings: "a circle left of a square".
    """
    phrases = relation_phrases or {r: r for r in RELATIONS}
    include = spec.get("include", [])
    said = [object_phrase(c["class"], c.get("color"), int(c.get("count", 1)), numerals) for c in include]
    return join_list(said_with_relations(include, said, phrases))


def caption_words() -> set[str]:
    """Every word the caption writers and prompt_for_spec can emit."""
    words = set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(COUNT_WORDS.values())
    words |= {"a", "an", "and", "the", "is", "are"}
    for phrase in list(CAPTION_RELATION_PHRASE.values()) + list(RELATIONS) + list(ALT_TEXT_PREFIXES):
        words |= set(phrase.split())
    return words
