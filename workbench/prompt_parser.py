"""Prompts to scene specs (GenEval's metadata form) and back, for the shapes world and COCO's classes.

    parse_prompt("a photo of two red dogs to the left of a cat")
    -> {"include": [{"class": "cat", "count": 1},
                    {"class": "dog", "count": 2, "color": "red", "position": ["left of", 0]}],
        "exclude": [{"class": "dog", "count": 3}]}

How a prompt is read (rules, no model):
* lower-case words, digits and punctuation; words the vocabulary does not know are skipped, so
  wrappers ("a photo of"), adjectives and verbs ("a kite flying over a boat") do no harm;
* an object is a class name (longest match first: "hot dog" before "dog"), its plural or an alias
  ("sofa" is a couch); the colour and number said before it in the same noun phrase belong to it.
  A noun phrase ends at its object, at "and", "with", "of", punctuation, a relation...;
  "orange" is the colour when an object follows it ("an orange car"), else the fruit;
* counts: a singular noun is 1, "one".."twelve", digits, "a pair of" (2), "a couple of" (2); a
  plural with no number ("dogs") means at least 2, as do "at least N" and "N or more";
* a stated number is exact, as in GenEval's counting task: a class said N >= 2 times in all (and
  never "at least") gets an exclude clause of count N+1; a singular object gets none, as in GenEval;
* "A <relation> B" (left of, right of, above, below and their phrasings): B becomes a clause
  before A and A points at it, GenEval's order ({"class": A, ..., "position": [relation, index of B]});
  "next to", "beside", "near", "and", "with" name two objects with no relation;
* "the X" names the X said before, if there is one: "a dog and a cat; the dog is left of the cat"
  is one dog left of one cat, as the shapes world's captions state relations (a relation that would
  contradict one already read is ignored);
* "no X" / "without X" excludes X (an exclude clause of count 1);
* the same class and colour said twice with no relation is merged ("a dog and a dog": two dogs).

describe(spec) writes the canonical English of a spec; parse_prompt(describe(spec)) == spec for specs
in canonical form (one clause per class and colour, each relation target just before its subject).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterable, Mapping

from workbench.errors import InvalidInput
from workbench.perception.coco import COCO_CLASSES, GENEVAL_COLORS  # shared with the detectors
from workbench.shapes.world import COLORS as SHAPE_COLORS
from workbench.shapes.world import SHAPES, article

MAX_PROMPT_CHARS = 1000


# Everyday names for COCO classes (singular; plurals are derived).
COCO_ALIASES: dict[str, str] = {
    "people": "person", "man": "person", "woman": "person", "boy": "person", "girl": "person",
    "child": "person", "kid": "person", "bike": "bicycle", "motorbike": "motorcycle",
    "plane": "airplane", "aeroplane": "airplane", "hydrant": "fire hydrant", "purse": "handbag",
    "ball": "sports ball", "racket": "tennis racket", "racquet": "tennis racket",
    "glass": "wine glass", "mug": "cup", "hotdog": "hot dog", "doughnut": "donut", "sofa": "couch",
    "plant": "potted plant", "houseplant": "potted plant", "table": "dining table",
    "television": "tv", "mouse": "computer mouse", "remote": "tv remote",
    "remote control": "tv remote", "keyboard": "computer keyboard", "phone": "cell phone",
    "cellphone": "cell phone", "mobile phone": "cell phone", "smartphone": "cell phone",
    "fridge": "refrigerator", "teddy": "teddy bear", "hair dryer": "hair drier",
    "hairdryer": "hair drier",
}

# Plurals English does not form with -s/-es (by last word), and nouns that do not change.
_IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "knife": "knives", "leaf": "leaves",
    "wolf": "wolves", "shelf": "shelves", "loaf": "loaves", "half": "halves", "life": "lives",
    "wife": "wives", "calf": "calves", "scarf": "scarves", "potato": "potatoes", "tomato": "tomatoes",
}
_UNCHANGING = {"sheep", "deer", "fish", "skis", "scissors", "series", "species", "people"}
# Said as "a pair of": one object, not two.
_PAIR_NOUNS = {"skis", "scissors"}

RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of", "on the left side of", "to the left side of",
                "at the left of", "on the left hand side of"),
    "right of": ("right of", "to the right of", "on the right of", "on the right side of", "to the right side of",
                 "at the right of", "on the right hand side of"),
    "above": ("above", "over", "on top of", "atop"),
    "below": ("below", "under", "beneath", "underneath"),
}
_NUMBER_WORDS = {
    "one": 1, "single": 1, "lone": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
    "dozen": 12, "hundred": 100, "thousand": 1000,
    "pair of": 2, "a pair of": 2, "couple of": 2, "a couple of": 2,
}
# "two dozen", "one hundred", "a thousand": the number before them multiplies them.
_MULTIPLIERS = {"dozen", "hundred", "thousand"}
_SAID_NUMBERS = {n: w for w, n in _NUMBER_WORDS.items() if w in ("one two three four five six seven eight nine ten").split()}
_AT_LEAST = ("at least", "or more")
_NEGATIONS = ("no", "without", "zero")
# Words that end a noun phrase: a colour or number before them does not reach past them.
_BREAKS = (
    "and", "with", "of", "on", "in", "at", "by", "from", "for", "to", "near", "beside", "besides",
    "behind", "alongside", "plus", "or", "but", "while", "is", "are", "that", "which", "as",
    "against", "into", "onto", "inside", "across", "around", "along", "between", "among",
    "next to", "in front of", "together with", "as well as", ",", ".", ";", ":", "!", "?", "(", ")",
)

_TOKEN = re.compile(r"[a-z]+|\d+|[,.;:!?()]")


def tokenize(text: str) -> tuple[str, ...]:
    return tuple(_TOKEN.findall(text.lower()))


def _clean_name(name: str) -> str:
    return " ".join(tokenize(str(name)))


def pluralize(name: str) -> str:
    """English plural of a (possibly multi-word) noun: its last word changes ("wine glasses")."""
    *head, last = name.split(" ")
    if last in _UNCHANGING:
        plural = last
    elif last in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        plural = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return " ".join(head + [plural])


def _geneval_plural(name: str) -> str:
    """GenEval's own plural (prompts/create_prompts.py: "benchs", "skises"), so its prompts parse."""
    return name + "es" if name.endswith("s") else name + "s"


# --- vocabulary ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lexicon:
    """Every phrase the parser knows: words tuple -> list of (kind, value)."""

    phrases: dict[tuple[str, ...], list[tuple[str, object]]]
    longest: int

    @cached_property
    def spatial_words(self) -> frozenset[str]:
        """Words of the relation phrases that place objects even said on their own ("side by side",
        "to the left"), and words that say how many ("by itself", "both"): never a prompt's framing."""
        words = {word for phrase, entries in self.phrases.items() if any(kind == "relation" for kind, _ in entries)
                 for word in phrase}
        return frozenset((words - set(_BREAKS) - set(_ARTICLES)) | _COUNT_WORDS)


@dataclass(frozen=True)
class Vocabulary:
    """The classes and colours prompts may name; aliases map other names to a class
    ({"sofa": "couch"}); plurals override derived plurals ({"cactus": "cacti"})."""

    classes: tuple[str, ...]
    colors: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    plurals: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        def names(values, what):
            if isinstance(values, str):
                values = [values]
            cleaned = tuple(dict.fromkeys(_clean_name(v) for v in values))
            if any(not name for name in cleaned):
                raise InvalidInput(f"a vocabulary {what} must hold at least one letter or digit")
            return cleaned

        def pairs(values, what):
            items = list(values.items() if isinstance(values, Mapping) else values)
            cleaned = tuple((_clean_name(a), _clean_name(b)) for a, b in items)
            if any(not a or not b for a, b in cleaned):
                raise InvalidInput(f"a vocabulary {what} must map one name to another")
            return cleaned

        object.__setattr__(self, "classes", names(self.classes, "class"))
        object.__setattr__(self, "colors", names(self.colors, "colour"))
        object.__setattr__(self, "aliases", pairs(self.aliases, "alias"))
        object.__setattr__(self, "plurals", pairs(self.plurals, "plural"))
        unknown = [target for _, target in self.aliases if target not in self.classes]
        if unknown:
            raise InvalidInput(f"vocabulary aliases point at unknown classes: {', '.join(unknown)}")

    def extend(self, classes: Iterable[str] = (), colors: Iterable[str] = (),
               aliases: Mapping[str, str] | None = None, plurals: Mapping[str, str] | None = None) -> Vocabulary:
        """This vocabulary plus more classes, colours, aliases or plurals (a new object)."""
        classes = [classes] if isinstance(classes, str) else list(classes)
        colors = [colors] if isinstance(colors, str) else list(colors)
        return Vocabulary(
            classes=self.classes + tuple(classes),
            colors=self.colors + tuple(colors),
            aliases=self.aliases + tuple((aliases or {}).items()),
            plurals=self.plurals + tuple((plurals or {}).items()),
        )

    def plural(self, name: str) -> str:
        return dict(self.plurals).get(name) or pluralize(name)

    @cached_property
    def lexicon(self) -> _Lexicon:
        phrases: dict[tuple[str, ...], list[tuple[str, object]]] = {}

        def add(text: str, kind: str, value) -> None:
            entries = phrases.setdefault(tokenize(text), [])
            # A later entry of the same kind wins: class names over plurals over aliases.
            entries[:] = [e for e in entries if e[0] != kind] + [(kind, value)]

        def add_noun(name: str, cls: str) -> None:
            for plural in (_geneval_plural(name), pluralize(name)):
                add(plural, "object", (cls, plural != name))

        for alias, cls in self.aliases:
            add_noun(alias, cls)
            add(alias, "object", (cls, False))
        for cls in self.classes:
            add_noun(cls, cls)
        for cls, plural in self.plurals:
            add(plural, "object", (cls, True))
        for cls in self.classes:
            add(cls, "object", (cls, False))
        for color in self.colors:
            add(color, "color", color)
        for words, number in _NUMBER_WORDS.items():
            add(words, "number", number)
        for relation, said in _RELATION_PHRASES.items():
            for words in said:
                add(words, "relation", relation)
        for words in _AT_LEAST:
            add(words, "at_least", True)
        for words in _NEGATIONS:
            add(words, "negation", True)
        for words in _BREAKS:
            add(words, "break", None)
        return _Lexicon(phrases, max(len(words) for words in phrases))


def shapes_vocabulary() -> Vocabulary:
    """The shapes world alone: circle, square, triangle and its six colours."""
    return Vocabulary(classes=SHAPES, colors=SHAPE_COLORS)


@lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The shapes world, GenEval's 80 COCO classes (with everyday aliases) and GenEval's colours."""
    colors = GENEVAL_COLORS + tuple(c for c in SHAPE_COLORS if c not in GENEVAL_COLORS)
    return Vocabulary(classes=SHAPES + COCO_CLASSES, colors=colors, aliases=tuple(COCO_ALIASES.items()))


# --- reading ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Mention:
    """One object phrase of the prompt."""

    cls: str
    count: int
    exact: bool  # the count is a stated number, not "at least"
    color: str | None = None
    target: _Mention | None = None  # the object this one is placed relative to
    relation: str | None = None
    is_target: bool = False


@dataclass
class _NounPhrase:
    """What has been said so far about the object still to come."""

    number: int | None = None
    pair: bool = False
    color: str | None = None
    at_least: bool = False
    negated: bool = False
    definite: bool = False  # "the circle": may name an object said before


def _match(tokens: tuple[str, ...], start: int, lexicon: _Lexicon) -> tuple[int, list[tuple[str, object]]]:
    """Longest known phrase at `start`: (its length, its entries); (1, []) for an unknown word."""
    for length in range(min(lexicon.longest, len(tokens) - start), 0, -1):
        entries = lexicon.phrases.get(tokens[start : start + length])
        if entries:
            return length, entries
    return 1, []


def _object_follows(tokens: tuple[str, ...], start: int, lexicon: _Lexicon) -> bool:
    """Whether an object (or another colour) comes next in this noun phrase, unknown words skipped."""
    while start < len(tokens):
        length, entries = _match(tokens, start, lexicon)
        kinds = {kind for kind, _ in entries}
        if kinds & {"object", "color"}:
            return True
        if kinds:
            return False
        start += length
    return False


def _choose(entries: list[tuple[str, object]], tokens, end: int, lexicon: _Lexicon) -> tuple[str, object]:
    kinds = dict(entries)
    if "object" in kinds and "color" in kinds:  # "orange": a colour before an object, else the fruit
        return ("color", kinds["color"]) if _object_follows(tokens, end, lexicon) else ("object", kinds["object"])
    for kind in ("relation", "number", "at_least", "negation", "object", "color", "break"):
        if kind in kinds:
            return kind, kinds[kind]
    return entries[0]


def _mention(phrase: _NounPhrase, cls: str, plural: bool) -> _Mention:
    if phrase.number is not None:
        count = 1 if phrase.pair and cls in _PAIR_NOUNS else phrase.number
        return _Mention(cls, count, exact=not phrase.at_least, color=phrase.color)
    if plural:  # "dogs": some dogs, at least two
        return _Mention(cls, 2, exact=False, color=phrase.color)
    return _Mention(cls, 1, exact=not phrase.at_least, color=phrase.color)


def _words(tokens: tuple[str, ...], lexicon: _Lexicon):
    """Each known phrase or unknown word in order: (first token, number of tokens, kind, value); an
    unknown word (digits included) has kind None."""
    i = 0
    while i < len(tokens):
        length, entries = _match(tokens, i, lexicon)
        kind, value = _choose(entries, tokens, i + length, lexicon) if entries else (None, None)
        yield i, length, kind, value
        i += length


def _read(tokens: tuple[str, ...], lexicon: _Lexicon) -> tuple[list[_Mention], list[str]]:
    """Object mentions in prompt order (relations linked) and the classes said with "no"."""
    mentions: list[_Mention] = []
    negated: list[str] = []
    phrase = _NounPhrase()
    pending: tuple[str, _Mention] | None = None  # (relation, subject) waiting for its target
    last: _Mention | None = None  # the object said last (None after a negated one)
    previous_was_number = False
    for i, length, kind, value in _words(tokens, lexicon):
        if kind is not None:
            if kind == "object":
                cls, plural = value
                if phrase.negated or phrase.number == 0:
                    negated.append(cls)
                    last = None
                else:
                    earlier = _referent(mentions, cls, phrase.color) if phrase.definite else None
                    last = earlier or _mention(phrase, cls, plural)
                    if pending is not None and pending[1].target is None and not _reaches(last, pending[1]):
                        relation, subject = pending
                        subject.relation, subject.target, last.is_target = relation, last, True
                    if earlier is None:
                        mentions.append(last)
                phrase, pending = _NounPhrase(), None
            elif kind == "color":
                phrase.color = value
            elif kind == "number":
                phrase.number = _compose(phrase.number, value, tokens[i], previous_was_number)
                phrase.pair = tokens[i + length - 1] == "of"
            elif kind == "at_least":
                phrase.at_least = True
            elif kind == "negation":
                phrase = _NounPhrase(negated=True)
            elif kind == "relation":
                phrase = _NounPhrase()
                pending = (value, last) if last is not None else None
            else:  # a break
                phrase, pending = _NounPhrase(), None
        elif tokens[i].isdigit():
            phrase.number = int(tokens[i])
        elif tokens[i] == "the":
            phrase.definite = True
        previous_was_number = kind == "number" or tokens[i].isdigit()
    return mentions, negated


def _compose(before: int | None, value: int, word: str, adjacent: bool) -> int:
    """A number word read after another one right before it: "twenty three" is 23, "two dozen" 24,
    "one hundred" 100; otherwise the later number stands."""
    if adjacent and before is not None:
        if word in _MULTIPLIERS:
            return before * value
        tens_then_unit = before >= 20 and before % 10 == 0 and value < 10  # twenty three, a hundred twenty three
        hundreds_then_less = before >= 100 and before % 100 == 0 and value < 100  # one hundred twenty
        if tens_then_unit or hundreds_then_less:
            return before + value
    return value


def _referent(mentions: list[_Mention], cls: str, color: str | None) -> _Mention | None:
    """The object an earlier phrase introduced that "the <color> <cls>" points back to (the latest
    one of that class, and of that colour when one is said), or None: then it is a new object."""
    for mention in reversed(mentions):
        if mention.cls == cls and (color is None or mention.color == color):
            return mention
    return None


def _reaches(start: _Mention | None, goal: _Mention) -> bool:
    """Whether following targets from `start` arrives at `goal` (placing goal against start would
    make a cycle: "the circle is above the square; the square is above the circle")."""
    while start is not None:
        if start is goal:
            return True
        start = start.target
    return False


def _merge_repeats(mentions: list[_Mention]) -> list[_Mention]:
    """'a dog and a dog' is two dogs: GenEval checks each clause on the same top detections, so two
    identical clauses would both be met by one dog."""
    merged: list[_Mention] = []
    free: dict[tuple[str, str | None], _Mention] = {}
    for mention in mentions:
        key = (mention.cls, mention.color)
        if mention.target is None and not mention.is_target:
            if key in free:
                free[key].count += mention.count
                free[key].exact = free[key].exact and mention.exact
                continue
            free[key] = mention
        merged.append(mention)
    return merged


def _targets_first(mentions: list[_Mention]) -> list[_Mention]:
    """GenEval's clause order: every relation target comes before the object placed against it."""
    ordered: list[_Mention] = []
    placed: set[int] = set()
    for mention in mentions:
        chain = []
        while mention is not None and id(mention) not in placed:
            chain.append(mention)
            mention = mention.target
        for link in reversed(chain):
            placed.add(id(link))
            ordered.append(link)
    return ordered


def _spec(mentions: list[_Mention], negated: list[str]) -> dict:
    index = {id(m): k for k, m in enumerate(mentions)}
    include = []
    for mention in mentions:
        clause = {"class": mention.cls, "count": mention.count}
        if mention.color:
            clause["color"] = mention.color
        if mention.target is not None:
            clause["position"] = [mention.relation, index[id(mention.target)]]
        include.append(clause)
    exclude = []
    for cls in dict.fromkeys(m.cls for m in mentions):
        said = [m for m in mentions if m.cls == cls]
        total = sum(m.count for m in said)
        if total >= 2 and all(m.exact for m in said):
            exclude.append({"class": cls, "count": total + 1})
    for cls in dict.fromkeys(negated):
        if cls not in _classes_of(include):
            exclude.append({"class": cls, "count": 1})
    spec = {"include": include}
    if exclude:
        spec["exclude"] = exclude
    return spec


def _classes_of(clauses: list[dict]) -> set[str]:
    return {clause["class"] for clause in clauses}


def check_prompt(prompt) -> str:
    """The prompt, or InvalidInput saying why it cannot be parsed."""
    if not isinstance(prompt, str):
        raise InvalidInput(f"a prompt must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidInput("the prompt is empty: give a text such as \"a red circle left of a blue square\"")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(too_long(prompt))
    return prompt


def too_long(text: str, what: str = "prompt") -> str:
    """The one message for a prompt over MAX_PROMPT_CHARS, wherever it is refused (generation, parsing,
    a hand edit), so a tab never names two limits."""
    return (f"The {what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS} (text encoders read "
            f"at most 77 tokens anyway).")


def parse_prompt(prompt: str, vocabulary: Vocabulary | None = None) -> dict:
    """The scene a prompt asks for, as GenEval metadata: {"include": [...], "exclude"?: [...]}.

    A prompt that names no known class gives {"include": []}.
    """
    lexicon = (vocabulary or default_vocabulary()).lexicon
    mentions, negated = _read(tokenize(check_prompt(prompt)), lexicon)
    return _spec(_targets_first(_merge_repeats(mentions)), negated)


_ARTICLES = ("a", "an", "the")
_CONTENT = {"object", "relation", "number", "at_least", "negation"}  # what a framing word may not be
_COUNT_WORDS = {"itself", "themselves", "alone", "lone", "only", "single", "solo", "together", "both", "each", "all",
                "several", "many", "few", "some", "multiple", "various", "group", "pile", "row"}


def framing(prompt: str, vocabulary: Vocabulary | None = None) -> tuple[str, str]:
    """The words around a prompt's scene, as written: ("a photo of", "on a white background") for
    "a photo of two circles on a white background"; ("", "") when there are none.

    The scene runs from the first object's noun phrase (its article, number, colours and adjectives)
    to the last object said. Words before and after it that say no object, number or relation are the
    framing: true of any image drawn for the prompt, so IPR's relabel can keep them around its rewrite.
    """
    lexicon = (vocabulary or default_vocabulary()).lexicon
    lowered = check_prompt(prompt).lower()
    spans = [match.span() for match in _TOKEN.finditer(lowered)]
    tokens = tuple(lowered[start:end] for start, end in spans)
    # (first token, number of tokens, kind or None); digits are numbers, as _read reads them
    words = [(i, length, kind or ("number" if tokens[i].isdigit() else None))
             for i, length, kind, _ in _words(tokens, lexicon)]
    objects = [k for k, (_, _, kind) in enumerate(words) if kind == "object"]
    if not objects:
        return "", ""
    first = objects[0]
    while first > 0:  # back over the first noun phrase: its modifiers and unknown adjectives, up to its article
        index, _, kind = words[first - 1]
        if kind is None and tokens[index] in _ARTICLES:
            first -= 1
            break
        if kind not in (None, "color", "number", "at_least", "negation"):
            break
        first -= 1
    def frames(part: list[tuple[int, int, str | None]]) -> bool:
        return not any(kind in _CONTENT or (kind is None and tokens[index] in lexicon.spatial_words)
                       for index, _, kind in part)

    last_index, last_length, _ = words[objects[-1]]
    before, after = words[:first], words[objects[-1] + 1:]
    prefix = prompt[:spans[words[first][0]][0]].strip() if frames(before) else ""
    suffix = prompt[spans[last_index + last_length - 1][1]:].strip() if frames(after) else ""
    return prefix, suffix


def infer_tag(spec: dict) -> str:
    """GenEval's task for a spec ("counting" is the one the scorer treats differently); specs no
    GenEval task holds (several groups, counted groups with others) are "mixed", as in training."""
    include = spec.get("include", [])
    if any("position" in clause for clause in include):
        return "position"
    if len(include) == 1:
        clause = include[0]
        if int(clause["count"]) >= 2:
            return "counting"
        return "colors" if "color" in clause else "single_object"
    if len(include) == 2 and all(int(clause["count"]) == 1 for clause in include):
        return "color_attr" if any("color" in clause for clause in include) else "two_object"
    return "mixed"


# --- writing ------------------------------------------------------------------------------------


def _exact_classes(spec: dict) -> set[str]:
    """Classes whose counts are exact: said once in all, or excluded from count total+1."""
    totals: dict[str, int] = {}
    for clause in spec.get("include", []):
        totals[clause["class"]] = totals.get(clause["class"], 0) + int(clause["count"])
    excluded = {(c["class"], int(c["count"])) for c in spec.get("exclude", [])}
    return {cls for cls, total in totals.items() if total == 1 or (cls, total + 1) in excluded}


def _object_phrase(clause: dict, vocabulary: Vocabulary, exact: bool) -> str:
    """ "a red dog", "an orange car", "a pair of skis", "three knives", "at least two tvs", "12 cups"."""
    count = int(clause["count"])
    noun = clause["class"] if count == 1 else vocabulary.plural(clause["class"])
    words = f"{clause['color']} {noun}" if clause.get("color") else noun
    if count == 1 and exact and clause["class"] in _PAIR_NOUNS:
        said = f"a pair of {words}"
    elif count == 1 and exact:
        said = f"{article(words)} {words}"
    else:
        said = f"{_SAID_NUMBERS.get(count, str(count))} {words}"
    return said if exact else f"at least {said}"


def join_list(phrases: list[str]) -> str:
    """"a, b and c" ("" for none)."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def said_with_relations(include: list[dict], said: list[str], relation_words: Mapping[str, str]) -> list[str]:
    """The parts of a sentence for a spec's include clauses, each already said (`said`): a positioned
    clause with its target ("a circle left of a square"), any other clause alone unless a positioned
    clause says it as its target."""
    targets = {clause["position"][1] for clause in include if "position" in clause}
    parts = []
    for k, clause in enumerate(include):
        if "position" in clause:
            relation, target = clause["position"]
            parts.append(f"{said[k]} {relation_words[relation]} {said[target]}")
        elif k not in targets:
            parts.append(said[k])
    return parts


def describe(spec: dict, vocabulary: Vocabulary | None = None) -> str:
    """Plain English for a spec: "two dogs and a red car", "a kite above a boat" ("" for no objects).

    A positioned clause is said with its target ("A to the left of B"); an exclude clause of count 1
    for a class not included is said "with no Xs"; other exclude clauses than count+1 cannot be said.
    """
    vocabulary = vocabulary or default_vocabulary()
    include = spec.get("include", [])
    exact = _exact_classes(spec)
    said = [_object_phrase(clause, vocabulary, clause["class"] in exact) for clause in include]
    parts = said_with_relations(include, said, RELATION_WORDS)
    included = _classes_of(include)
    absent = [f"no {vocabulary.plural(c['class'])}" for c in spec.get("exclude", [])
              if int(c["count"]) == 1 and c["class"] not in included]
    text = join_list(parts)
    if absent:  # each with its own "no": "with no dogs and cats" would include the cats
        text = f"{text} with {join_list(absent)}".strip()
    return text
