"""Hard negatives of a prompt: the same sentence with one fact changed (a colour, an object, a count,
a relation), for contrastive caption rewards.

    hard_negatives("a red circle above a blue square", k=3, rng=np.random.default_rng(0))
    -> ["a red square above a blue circle", "a red circle below a blue square", "a blue circle above a red square"]

Why: a captioner's likelihood of the prompt, log p(prompt | image), also rises for images that only
get part of the prompt right. Pushed hard, reward feedback learning finds that (on the shapes world it
painted every object in one of the prompt's colours: `colors` up, `color_attr` down). Asking instead
how much more likely the prompt is than the same sentence with the colours swapped, the relation
flipped or a count changed rewards exactly the facts the image must get right. Each negative differs
from the prompt in words only, so the wording the captioner likes or dislikes cancels out.

Edits work on words, so they apply to any prompt: class and colour names come from a prompt parser
vocabulary (by default the shapes world, COCO's 80 classes and GenEval's colours; give a model's
own, e.g. `shapes_vocabulary()`, so that no negative names what its captioner has never seen).
"""

from __future__ import annotations

import re

import numpy as np

from workbench.prompt_parser import Vocabulary, default_vocabulary, parse_prompt

NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
FLIPPED_WORDS = {"above": "below", "below": "above", "over": "under", "under": "over",
                 "left": "right", "right": "left"}
_WORD = re.compile(r"[A-Za-z]+|\d+")


def _edits(prompt: str, vocabulary: Vocabulary, max_count: int) -> list[tuple[str, str]]:
    """(kind, text) for every one-fact edit of the prompt; kind "swap", "flip", "replace" or "count".
    Words are replaced in place, so case, punctuation and spacing stay the prompt's own."""
    words = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(prompt)]
    word = [w[2] for w in words]
    # Single-word names only: a word-level edit of "potted plant" would leave half a name behind.
    classes = [c for c in vocabulary.classes if " " not in c]
    singular = {c: c for c in classes} | {vocabulary.plural(c): c for c in classes}
    colors = [c for c in vocabulary.colors if " " not in c]

    def inflect(cls: str, like: str) -> str:
        return cls if like == singular[like] else vocabulary.plural(cls)

    def text(changes: dict[int, str]) -> str:
        # "a orange" would tell the captioner which sentence is the edit: fix the article too.
        for k, new in list(changes.items()):
            if k > 0 and word[k - 1] in ("a", "an") and (k - 1) not in changes:
                article = "an" if new[0] in "aeiou" else "a"
                changes[k - 1] = article.capitalize() if prompt[words[k - 1][0]].isupper() else article
        out, last = [], 0
        for k in sorted(changes):
            start, end, _ = words[k]
            out += [prompt[last:start], changes[k]]
            last = end
        return "".join(out + [prompt[last:]])

    color_at = [k for k, w in enumerate(words) if w[2] in colors]
    class_at = [k for k, w in enumerate(words) if w[2] in singular]
    number_at = [k for k, w in enumerate(words) if w[2] in NUMBER_WORDS or w[2].isdigit()]
    edits: list[tuple[str, str]] = []
    # Binding: two different colours, or two different objects, trade places.
    for a, i in enumerate(color_at):
        edits += [("swap", text({i: word[j], j: word[i]})) for j in color_at[a + 1:] if word[i] != word[j]]
    for a, i in enumerate(class_at):
        edits += [("swap", text({i: inflect(singular[word[j]], word[i]), j: inflect(singular[word[i]], word[j])}))
                  for j in class_at[a + 1:] if singular[word[i]] != singular[word[j]]]
    # Relations: the same objects the other way round.
    edits += [("flip", text({i: FLIPPED_WORDS[w]})) for i, w in enumerate(word) if w in FLIPPED_WORDS]
    # Attribute and object: one colour or one object replaced by another of the vocabulary.
    for i in color_at:
        edits += [("replace", text({i: c})) for c in colors if c != word[i]]
    for i in class_at:
        edits += [("replace", text({i: inflect(c, word[i])})) for c in classes if c != singular[word[i]]]
    # Counts: another number ("two" <-> "three"), same plural noun.
    for i in number_at:
        numbers = [str(n) for n in range(2, max_count + 1)] if word[i].isdigit() else list(NUMBER_WORDS[:max_count - 1])
        edits += [("count", text({i: n})) for n in numbers if n != word[i]]
    # An edit must describe another scene: "a triangle and a circle" is "a circle and a triangle" again.
    seen = {scene_key(prompt, vocabulary)}
    unique = []
    for kind, edited in edits:
        key = scene_key(edited, vocabulary)
        if key not in seen:
            seen.add(key)
            unique.append((kind, edited))
    return unique


def scene_key(prompt: str, vocabulary: Vocabulary) -> tuple:
    """What the prompt asks for, independent of the order it names things in (for telling edits apart)."""
    spec = parse_prompt(prompt, vocabulary)
    include = spec["include"]

    def clause(c: dict) -> tuple:
        where = None
        if "position" in c:
            target = include[c["position"][1]]
            where = (c["position"][0], target["class"], target.get("color"), target["count"])
        return c["class"], c.get("color"), c["count"], where

    excluded = sorted((c["class"], c["count"]) for c in spec.get("exclude", []))
    return tuple(sorted(map(clause, include), key=repr)), tuple(excluded), prompt.lower() if not include else None


def candidate_negatives(prompt: str, vocabulary: Vocabulary | None = None, max_count: int = 6) -> list[str]:
    """Every one-fact edit of the prompt, deduplicated, in a fixed order; never the prompt itself.
    Counts are changed within 2..max_count (the shapes world draws at most 4 objects)."""
    return [edited for _, edited in _edits(prompt, vocabulary or default_vocabulary(), max_count)]


def hard_negatives(prompt: str, k: int, rng: np.random.Generator, vocabulary: Vocabulary | None = None,
                   max_count: int = 6) -> list[str]:
    """k one-fact edits of the prompt, drawn at random: swapped colours or objects and flipped
    relations (what a model most often gets wrong) before replacements and count changes. A prompt
    with fewer than k edits repeats them, so every prompt gets k and batches stay rectangular; one
    with none (no colour, object, number or relation word the vocabulary knows) gets []."""
    edits = _edits(prompt, vocabulary or default_vocabulary(), max_count)
    if not edits or k < 1:
        return []
    first = [e for kind, e in edits if kind in ("swap", "flip")]
    rest = [e for kind, e in edits if kind not in ("swap", "flip")]
    picked = [first[i] for i in rng.permutation(len(first))][:k]
    picked += [rest[i] for i in rng.permutation(len(rest))][:k - len(picked)]
    return [picked[i % len(picked)] for i in range(k)]
