"""ShapesBench: GenEval's six tasks over the shapes world, and training prompts kept apart from it.

Run `python -m workbench.shapes.bench_prompts` to (re)write assets/prompts/shapesbench.jsonl, and with
`--heldout` assets/prompts/shapesbench-heldout.jsonl (the same tasks in other words).

The world has only 3 classes and 6 colours, so some tasks hold fewer than 50 different requests:
single_object 3, counting 9 (counts 2-4), colors 18, two_object 6 (ordered pairs), position 24;
color_attr has 180. Those tasks reach 50 distinct prompts by asking the same thing in different
words (templates below), cycling through every request before repeating one.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np

from workbench.errors import InvalidInput
from workbench.shapes.captions import caption_words, clause_caption, join_list, object_phrase
from workbench.shapes.world import COLORS, COUNT_WORDS, MAX_OBJECTS, PLURALS, RELATION_PHRASES, RELATIONS, SHAPES

SHAPESBENCH_SEED = 43  # GenEval's default seed
PROMPTS_PER_TAG = 50
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SHAPESBENCH_PATH = Path(__file__).resolve().parents[2] / "assets" / "prompts" / "shapesbench.jsonl"
HELDOUT_PATH = SHAPESBENCH_PATH.with_name("shapesbench-heldout.jsonl")  # heldout_prompts(), shipped

# {o}: "a circle"; {n}: "circle"; the first template is GenEval's bare form without "a photo of".
_SINGLE_TEMPLATES = (
    "{o}", "a photo of {o}", "an image of {o}", "a picture of {o}", "a drawing of {o}",
    "an illustration of {o}", "one {n}", "a single {n}", "just one {n}", "exactly one {n}", "1 {n}",
    "{o} shape", "{o} on a plain background", "{o} on a white background", "a simple {n}",
    "a lone {n}", "{o} by itself",
)
_COLOR_TEMPLATES = ("{o}", "a photo of {o}", "one {n}")
# {w}: "three"; {d}: "3"; {p}: "circles"
_COUNT_TEMPLATES = (
    "{w} {p}", "{d} {p}", "a photo of {w} {p}", "exactly {w} {p}", "an image of {d} {p}", "{w} {p} on a plain background",
)
# {a}, {b}: "a circle", "a square"; {na}, {nb}: "circle", "square"
_TWO_TEMPLATES = (
    "{a} and {b}", "a photo of {a} and {b}", "an image of {a} and {b}", "a picture of {a} and {b}",
    "one {na} and one {nb}", "{a} with {b}", "{a} together with {b}", "both {a} and {b}", "{a} as well as {b}",
)

# Share of training position prompts that state the relation the way the shapes world's captions do,
# as a clause after the list ("a circle and a square; the circle is above the square") instead of
# inline ("a circle above a square"). A model that has only seen the clause form draws a single
# object for the inline one, so IPR would find no relation to relabel; asked in the clause form it
# draws both objects, and every one it places wrongly is relabeled in the inline form.
CLAUSE_POSITION_SHARE = 0.5

# Wrappers for training prompts around an object list X; none of them is a ShapesBench template
# except the bare "{x}", whose collisions training_prompts rejects.
_TRAINING_WRAPPERS = (
    "{x}", "{x}", "{x}", "{x}", "a scene with {x}", "a rendering of {x}", "{x} on a light background",
    "a diagram showing {x}", "a simple picture of {x}",
)


def _record(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    record = {"tag": tag, "include": include}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = prompt
    return record


def _tag_candidates(tag: str) -> list[list[dict]]:
    """Every request of a task, each as the list of its phrasings (records)."""
    requests = []
    if tag == "single_object":
        for shape in SHAPES:
            inc = [{"class": shape, "count": 1}]
            requests.append([_record(tag, inc, t.format(o=object_phrase(shape), n=shape)) for t in _SINGLE_TEMPLATES])
    elif tag == "colors":
        for shape, color in itertools.product(SHAPES, COLORS):
            inc = [{"class": shape, "count": 1, "color": color}]
            o = object_phrase(shape, color)
            requests.append([_record(tag, inc, t.format(o=o, n=f"{color} {shape}")) for t in _COLOR_TEMPLATES])
    elif tag == "counting":
        for shape, count in itertools.product(SHAPES, (2, 3, 4)):
            inc, exc = [{"class": shape, "count": count}], [{"class": shape, "count": count + 1}]
            words = dict(w=COUNT_WORDS[count], d=count, p=PLURALS[shape])
            requests.append([_record(tag, inc, t.format(**words), exc) for t in _COUNT_TEMPLATES])
    elif tag == "two_object":
        for a, b in itertools.permutations(SHAPES, 2):
            inc = [{"class": a, "count": 1}, {"class": b, "count": 1}]
            words = dict(a=object_phrase(a), b=object_phrase(b), na=a, nb=b)
            requests.append([_record(tag, inc, t.format(**words)) for t in _TWO_TEMPLATES])
    elif tag == "position":
        # GenEval's layout: the target first, then the object placed relative to it (clause 0).
        for (a, b), relation in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
            inc = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]
            requests.append(
                [_record(tag, inc, f"{object_phrase(a)} {phrase} {object_phrase(b)}") for phrase in RELATION_PHRASES[relation]]
            )
    elif tag == "color_attr":
        for (a, b), (ca, cb) in itertools.product(itertools.permutations(SHAPES, 2), itertools.permutations(COLORS, 2)):
            inc = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
            requests.append([_record(tag, inc, f"{object_phrase(a, ca)} and {object_phrase(b, cb)}")])
    else:
        raise ValueError(f"unknown ShapesBench tag {tag!r}")
    return requests


def _pick(requests: list[list[dict]], n: int, rng: np.random.Generator) -> list[dict]:
    """n records, round-robin over shuffled requests so every request appears before any repeats."""
    order = rng.permutation(len(requests))
    phrasings = [[requests[i][j] for j in rng.permutation(len(requests[i]))] for i in order]
    picked = []
    for round_ in range(max(len(p) for p in phrasings)):
        for records in phrasings:
            if round_ < len(records) and len(picked) < n:
                picked.append(records[round_])
    return picked


def shapesbench_prompts(seed: int = SHAPESBENCH_SEED, per_tag: int = PROMPTS_PER_TAG) -> list[dict]:
    """ShapesBench's records (GenEval's evaluation_metadata format), per_tag distinct prompts a tag."""
    rng = np.random.default_rng(seed)
    records = []
    for tag in TAGS:
        picked = _pick(_tag_candidates(tag), per_tag, rng)
        if len(picked) < per_tag:
            raise ValueError(f"ShapesBench can hold only {len(picked)} distinct {tag} prompts")
        records.extend(picked)
    return records


def write_shapesbench(path: Path = SHAPESBENCH_PATH, seed: int = SHAPESBENCH_SEED, per_tag: int = PROMPTS_PER_TAG) -> Path:
    return write_prompts(shapesbench_prompts(seed, per_tag), path)


# --- held-out prompts --------------------------------------------------------------------------

# Other wordings of the same six tasks, in words the shapes model's tokenizer holds whole, none of
# them a ShapesBench template: for checking that a gain measured on ShapesBench is not one of its
# phrasings. color_attr keeps its one wording and asks for colour pairs that ShapesBench does not.
HELDOUT_SEED = 7
_HELDOUT_SINGLE = (
    "there is {o}", "{o} on white", "clipart of {o}", "a clipart of {o}", "a stock photo of {o}",
    "stock image of {o}", "an image showing {o}", "a photo showing {o}", "a drawing showing {o}",
    "an illustration showing {o}", "a single {n} shape", "one {n} shape", "just {o}",
    "{o} by itself on a plain background", "a lone {n} on white", "exactly one {n} shape",
    "{o} shape on a light background",
)
_HELDOUT_COLOR = ("there is {o}", "an image showing {o}", "a single {n} shape")
_HELDOUT_COUNT = ("there are {w} {p}", "{w} {p} together", "just {w} {p}", "a picture of {w} {p}",
                  "a drawing of {d} {p}", "{w} {p} on white", "exactly {d} {p}")
_HELDOUT_TWO = ("{a} beside {b}", "{a} next to {b}", "there is {a} and {b}", "a picture showing {a} and {b}",
                "a drawing of {a} and {b}", "{a} and {b} together", "an illustration of {a} and {b}",
                "clipart of {a} and {b}", "{a} and one {nb}")
_HELDOUT_POSITION = ("{a} is {r} {b}", "there is {a} {r} {b}", "a picture of {a} {r} {b}")


def _heldout_candidates(tag: str, bench: list[dict]) -> list[list[dict]]:
    """Like _tag_candidates, in the held-out wordings (color_attr: the pairs ShapesBench leaves out)."""
    if tag == "color_attr":
        asked = {_spec_key(r["include"]) for r in bench if r["tag"] == "color_attr"}
        return [records for records in _tag_candidates(tag) if _spec_key(records[0]["include"]) not in asked]
    templates = {"single_object": _HELDOUT_SINGLE, "colors": _HELDOUT_COLOR, "counting": _HELDOUT_COUNT,
                 "two_object": _HELDOUT_TWO}
    requests = []
    for records in _tag_candidates(tag):  # the same requests (metadata), reworded
        first = records[0]
        include, exclude = first["include"], first.get("exclude")
        if tag == "position":
            target, subject = include[0]["class"], include[1]["class"]
            relation = include[1]["position"][0]
            texts = [t.format(a=object_phrase(subject), b=object_phrase(target), r=phrase)
                     for t in _HELDOUT_POSITION for phrase in RELATION_PHRASES[relation]]
        elif tag == "two_object":
            a, b = include[0]["class"], include[1]["class"]
            texts = [t.format(a=object_phrase(a), b=object_phrase(b), na=a, nb=b) for t in templates[tag]]
        elif tag == "counting":
            shape, count = include[0]["class"], include[0]["count"]
            texts = [t.format(w=COUNT_WORDS[count], d=count, p=PLURALS[shape]) for t in templates[tag]]
        else:
            shape, color = include[0]["class"], include[0].get("color")
            texts = [t.format(o=object_phrase(shape, color), n=f"{color} {shape}" if color else shape)
                     for t in templates[tag]]
        requests.append([_record(tag, include, text, exclude) for text in texts])
    return requests


def heldout_prompts(seed: int = HELDOUT_SEED, per_tag: int = PROMPTS_PER_TAG) -> list[dict]:
    """ShapesBench's six tasks, per_tag prompts each, none of them a ShapesBench prompt (compared
    ignoring case, spacing and punctuation); the same record format."""
    bench = shapesbench_prompts()
    taken = {normalize_prompt(r["prompt"]) for r in bench}
    rng = np.random.default_rng(seed)
    records = []
    for tag in TAGS:
        requests = [[r for r in records_ if normalize_prompt(r["prompt"]) not in taken]
                    for records_ in _heldout_candidates(tag, bench)]
        picked = _pick([r for r in requests if r], per_tag, rng)
        if len(picked) < per_tag:
            raise ValueError(f"the held-out set can hold only {len(picked)} distinct {tag} prompts")
        records.extend(picked)
    return records


# --- training prompts ---------------------------------------------------------------------------


def normalize_prompt(prompt: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", prompt.lower()))


def _spec_key(include: list[dict]) -> str:
    return json.dumps(sorted(json.dumps(c, sort_keys=True) for c in include))


TRAINING_KINDS = ("single_object", "colors", "counting", "two_object", "color_attr", "position", "mixed")


def _training_record(rng: np.random.Generator, kinds: tuple[str, ...] = TRAINING_KINDS,
                     clause_share: float = CLAUSE_POSITION_SHARE) -> dict:
    """One random training request in plain English, richer than ShapesBench's (colours on counts
    and positions, several groups, varied wording)."""

    def pick(options):
        return options[rng.integers(len(options))]

    def maybe_color():
        return pick(COLORS) if rng.random() < 0.8 else None

    numerals = rng.random() < 0.2
    kind = pick(kinds)
    include: list[dict] = []
    exclude: list[dict] = []
    if kind in ("single_object", "colors"):
        include = [{"class": pick(SHAPES), "count": 1}]
        if kind == "colors":
            include[0]["color"] = pick(COLORS)
    elif kind == "counting":
        include = [{"class": pick(SHAPES), "count": int(rng.integers(2, MAX_OBJECTS + 1))}]
        if (color := maybe_color()) is not None:
            include[0]["color"] = color
    elif kind in ("two_object", "color_attr", "position"):
        a, b = rng.choice(len(SHAPES), size=2, replace=False)
        include = [{"class": SHAPES[b], "count": 1}, {"class": SHAPES[a], "count": 1}]
        if kind == "color_attr" or (kind == "position" and rng.random() < 0.7):
            ca, cb = rng.choice(len(COLORS), size=2, replace=False)
            include[0]["color"], include[1]["color"] = COLORS[cb], COLORS[ca]
        if kind == "position":
            include[1]["position"] = [pick(RELATIONS), 0]
    else:  # mixed: a counted group plus one or two other objects, "two red circles and a blue square"
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
        first = int(rng.integers(2, MAX_OBJECTS))
        include = [{"class": shapes[0], "count": first}]
        for shape in shapes[1 : 1 + int(rng.integers(1, MAX_OBJECTS - first + 1))]:
            include.append({"class": shape, "count": 1})
        for clause in include:
            if (color := maybe_color()) is not None:
                clause["color"] = color
    for clause in include:
        if clause["count"] >= 2:  # a stated number is exact, as in ShapesBench's counting task
            exclude.append({"class": clause["class"], "count": clause["count"] + 1})

    said = [object_phrase(c["class"], c.get("color"), c["count"], numerals) for c in include]
    if kind == "position" and rng.random() < clause_share:
        subject, target = include[1], include[0]
        body = clause_caption([(subject["class"], subject.get("color")), (target["class"], target.get("color"))],
                              [(0, subject["position"][0], 1)])
    elif kind == "position":
        relation = include[1]["position"][0]
        body = f"{said[1]} {pick(RELATION_PHRASES[relation])} {said[0]}"
    else:
        body = join_list(said)
    return _record(kind, include, pick(_TRAINING_WRAPPERS).format(x=body), exclude)


def check_training_kinds(kinds: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The kinds to draw (all for None or none given), or InvalidInput naming the unknown ones."""
    kinds = tuple(kinds) if kinds else TRAINING_KINDS
    unknown = sorted(set(kinds) - set(TRAINING_KINDS))
    if unknown:
        raise InvalidInput(f"Unknown kind of training prompt {', '.join(unknown)}; use {', '.join(TRAINING_KINDS)}.")
    return kinds


def training_prompts(n: int, seed: int = 0, kinds: tuple[str, ...] | list[str] | None = None,
                     clause_share: float = CLAUSE_POSITION_SHARE) -> list[dict]:
    """n training records (ShapesBench's format; tag "mixed" for several groups) whose prompts are
    never a ShapesBench prompt (compared ignoring case, spacing and punctuation) and whose requests
    never repeat one of ShapesBench's color_attr pairs (held out to test generalisation).

    `kinds` (default: all of TRAINING_KINDS, equally often) are the kinds of request drawn, each
    equally often; name one twice to draw it twice as often. Prompts are distinct while the space
    allows; beyond that they repeat. `clause_share` is the share of position requests said as a
    caption clause (CLAUSE_POSITION_SHARE).
    """
    kinds = check_training_kinds(kinds)
    bench = shapesbench_prompts()
    bench_prompts = {normalize_prompt(r["prompt"]) for r in bench}
    held_out = {_spec_key(r["include"]) for r in bench if r["tag"] == "color_attr"}
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(records) < n:
        record = _training_record(rng, kinds, clause_share)
        key = normalize_prompt(record["prompt"])
        if key in bench_prompts or _spec_key(record["include"]) in held_out:
            continue
        if key in seen and misses < 50 * max(n, 1):
            misses += 1
            continue
        seen.add(key)
        records.append(record)
    return records


def vocabulary() -> list[str]:
    """Every word ShapesBench, training prompts and the caption writers use (for a word tokenizer)."""
    words = set(caption_words())
    templates = _SINGLE_TEMPLATES + _COLOR_TEMPLATES + _COUNT_TEMPLATES + _TWO_TEMPLATES + _TRAINING_WRAPPERS
    for text in templates + tuple(p for phrases in RELATION_PHRASES.values() for p in phrases):
        words |= set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)


def write_prompts(records: list[dict], path: Path) -> Path:
    """A prompt file (one GenEval record a line), written atomically; returns its path."""
    from workbench.store import write_jsonl

    write_jsonl(Path(path), records)
    return Path(path)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write ShapesBench (default) or its held-out wordings.")
    parser.add_argument("--heldout", type=Path, nargs="?", const=HELDOUT_PATH, metavar="PATH",
                        help=f"write the held-out prompts instead (default: {HELDOUT_PATH.name} beside ShapesBench)")
    args = parser.parse_args()
    written = write_prompts(heldout_prompts(), args.heldout) if args.heldout else write_shapesbench()
    print(f"wrote {sum(1 for _ in written.open())} prompts to {written}")
