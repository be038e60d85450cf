"""SELMA's skills: what each LoRA expert learns, told to the LLM as a description and a few examples.

    skills = resolve_skills(None, world="shapes")       # the world's default skills
    save_user_skill(Skill("animals", "Prompts about animals doing things.", ("a cat ...", ...)))

A skill is a name (also the name of its expert's folder), a description of the prompts it wants and
seed examples the LLM imitates; the authors' code shows the LLM three examples per request
(llm/prompt_generation.py, `num_prompt_instructions = 3`), drawn from the seeds and the prompts
written so far.

* Real models: the paper's five prompt sources (Sec. 3.1), one skill each, with descriptions after
  the authors' per-dataset instructions and three seed prompts written for this workbench.
* The shapes world: its own five skills (counting, spatial relations, colour binding, several
  objects, long descriptions), which the embedded "shapes" LLM backend writes prompts for.
* User skills: kept in `<data folder>/skills.json`, added and removed with `save_user_skill` and
  `delete_user_skill`; they cannot reuse a built-in skill's name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from workbench.config import get_settings
from workbench.errors import InvalidInput

MAX_NAME = 40
MAX_DESCRIPTION = 600
MAX_EXAMPLES = 20
MAX_EXAMPLE_CHARS = 500
USER_SKILLS_FILE = "skills.json"
WORLDS = ("shapes", "real")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Skill:
    name: str  # lowercase letters, digits and "_": it names the expert's folder and adapter
    description: str  # what prompts of this skill look like, told to the LLM
    examples: tuple[str, ...] = field(default_factory=tuple)  # seed prompts the LLM imitates

    def checked(self) -> "Skill":
        """The skill with its texts trimmed, or InvalidInput saying what is wrong."""
        name = self.name.strip() if isinstance(self.name, str) else self.name
        if not isinstance(name, str) or not name:
            raise InvalidInput("A skill needs a name, such as \"counting\".")
        if len(name) > MAX_NAME or not _NAME.match(name):
            raise InvalidInput(f"The skill name '{name}' must start with a lowercase letter and hold only lowercase "
                               f"letters, digits and \"_\" (at most {MAX_NAME} characters): it names a folder.")
        if not isinstance(self.description, str) or not self.description.strip():
            raise InvalidInput(f"The skill '{name}' needs a description of the prompts it wants.")
        if len(self.description) > MAX_DESCRIPTION:
            raise InvalidInput(f"The description of the skill '{name}' is {len(self.description)} characters long; "
                               f"keep it under {MAX_DESCRIPTION}.")
        examples = self.examples
        if isinstance(examples, str) or not isinstance(examples, (list, tuple)):
            raise InvalidInput(f"The examples of the skill '{name}' must be a list of prompts.")
        if not 1 <= len(examples) <= MAX_EXAMPLES:
            raise InvalidInput(f"The skill '{name}' needs between 1 and {MAX_EXAMPLES} example prompts (SELMA shows "
                               f"the LLM three); it has {len(examples)}.")
        cleaned = []
        for example in examples:
            if not isinstance(example, str) or not example.strip():
                raise InvalidInput(f"Every example of the skill '{name}' must be a non-empty prompt.")
            if len(example) > MAX_EXAMPLE_CHARS:
                raise InvalidInput(f"An example of the skill '{name}' is {len(example)} characters long; keep each "
                                   f"under {MAX_EXAMPLE_CHARS}.")
            cleaned.append(" ".join(example.split()))
        if len({e.lower() for e in cleaned}) != len(cleaned):
            raise InvalidInput(f"The skill '{name}' lists the same example twice.")
        return Skill(name, " ".join(self.description.split()), tuple(cleaned))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, data) -> "Skill":
        if not isinstance(data, dict):
            raise InvalidInput(f"A skill must be an object {{\"name\", \"description\", \"examples\"}}, got "
                               f"{type(data).__name__}.")
        examples = data.get("examples", [])
        return cls(data.get("name", ""), data.get("description", ""),
                   tuple(examples) if isinstance(examples, list) else examples).checked()


# --- built-in skills -----------------------------------------------------------------------------

# The paper's five prompt sources (Sec. 3.1, Table 1). Descriptions follow the rules the authors'
# prompt generation gives the LLM for each dataset (length, style, what the prompt must exercise).
REAL_SKILLS: tuple[Skill, ...] = (
    Skill("long_description",
          "Paragraph-style captions of a whole photo, as in Localized Narratives: several everyday objects, "
          "people or animals, what they do and where they are in the picture, at most 50 words.",
          ("In this picture we can see a man riding a bicycle on a wet road. Behind him there are shops with "
           "glass doors, a few parked cars and some trees, and at the top we can see the cloudy sky.",
           "This image shows a kitchen counter with a cutting board, a knife, two tomatoes and a bowl of "
           "lettuce. On the left side there is a window and a plant in a pot.",
           "Here we can see a girl sitting on a bench and reading a book. Beside her there is a bag, and in the "
           "background we can see grass, a fence and some buildings.")),
    Skill("counting",
          "Prompts that state exactly how many of an everyday object the image shows (two to four), as in "
          "CountBench, at most 30 words.",
          ("three ceramic mugs lined up on a wooden shelf",
           "Two golden retrievers lying on a rug in front of a fireplace.",
           "a plate with four chocolate chip cookies, seen from above")),
    Skill("user_style",
          "Prompts written the way people type them into image generators, as in DiffusionDB: a subject "
          "followed by style, medium, artist, lighting and rendering keywords, at most 50 words.",
          ("a cozy cabin in a snowy pine forest at dusk, warm light in the windows, highly detailed digital "
           "painting, volumetric lighting, 8k",
           "portrait of an old fisherman with a grey beard, dramatic rim lighting, oil on canvas, intricate "
           "details, muted colors",
           "isometric view of a tiny futuristic city on a floating island, octane render, pastel colors, "
           "trending on artstation")),
    Skill("counter_commonsense",
          "Everyday objects, people or animals in combinations that defy common sense, as in Whoops!, "
          "described plainly, at most 30 words.",
          ("A penguin sunbathing on a beach chair in the middle of a desert.",
           "A candle burning underwater inside a fish tank.",
           "A toddler lifting a grand piano over his head.")),
    Skill("everyday_scene",
          "Short captions of everyday scenes with common objects, people and animals, as in COCO captions, "
          "at most 30 words.",
          ("A cat sleeping on top of a laptop keyboard.",
           "Two people waiting at a bus stop in the rain.",
           "A plate with a sandwich and a pickle next to a glass of milk.")),
)

# The shapes world's skills (workbench.llm.SHAPES_SKILLS). Seeds are shapes-world prompts that are
# not ShapesBench prompts (tests/test_skills.py checks it), in the style the shapes backend writes.
SHAPES_SKILLS: tuple[Skill, ...] = (
    Skill("counting", "Prompts that ask for an exact number (two to four) of one kind of shape.",
          ("exactly three green triangles", "a photo of four red squares", "two purple circles on a plain background")),
    Skill("spatial", "Two shapes and where one is relative to the other (left of, right of, above, below).",
          ("a blue circle to the left of a yellow square", "a red circle and a triangle; the triangle is above "
           "the red circle", "an orange square under a green triangle")),
    Skill("color_binding", "Two shapes of different colours, each colour bound to its own shape.",
          ("a purple triangle next to an orange circle", "a green square with a red triangle",
           "a yellow circle together with a blue triangle")),
    Skill("multiple_objects", "Several kinds of shapes in one image, some of them in groups.",
          ("two circles, a square and a triangle", "a red square, a triangle and a blue circle",
           "three triangles and a green square")),
    Skill("long_description", "A list of the scene's shapes, then where each group lies relative to another.",
          ("a red circle, a blue square and a yellow triangle; the blue square is to the right of the red circle; "
           "the yellow triangle is below the blue square",
           "two green triangles and an orange circle; the orange circle is above the green triangles",
           "a purple square, a red triangle and a blue circle; the red triangle is to the left of the purple "
           "square; the blue circle is above the red triangle")),
)


def builtin_skills(world: str) -> dict[str, Skill]:
    if world not in WORLDS:
        raise InvalidInput(f"Unknown world '{world}'; use one of {', '.join(WORLDS)}.")
    return {skill.name: skill for skill in (SHAPES_SKILLS if world == "shapes" else REAL_SKILLS)}


def world_of(model: str) -> str:
    """'shapes' for the embedded shapes model and its full fine-tunes, 'real' for every other model."""
    from workbench.registry import resolve

    return resolve(model).world


# --- user skills ---------------------------------------------------------------------------------


def user_skills_path() -> Path:
    return get_settings().data_dir / USER_SKILLS_FILE


def load_user_skills() -> dict[str, Skill]:
    """The skills saved in the data folder (none when the file does not exist yet)."""
    path = user_skills_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidInput(f"{path} is not a readable skills file ({error}); fix or remove it.") from None
    entries = data.get("skills") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InvalidInput(f"{path} must hold {{\"skills\": [{{\"name\", \"description\", \"examples\"}}, ...]}}.")
    skills: dict[str, Skill] = {}
    for entry in entries:
        try:
            skill = Skill.from_dict(entry)
        except InvalidInput as error:
            raise InvalidInput(f"{path}: {error}") from None
        skills[skill.name] = skill
    return skills


def _write_user_skills(skills: dict[str, Skill]) -> Path:
    path = user_skills_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"skills": [s.to_dict() for s in skills.values()]}, indent=2))
    os.replace(tmp, path)
    return path


def save_user_skill(skill: Skill) -> Skill:
    """Add a skill to the data folder's skills file, or replace the user skill of that name."""
    skill = skill.checked()
    clash = [world for world in WORLDS if skill.name in builtin_skills(world)]
    if clash:
        raise InvalidInput(f"'{skill.name}' is a built-in skill ({clash[0]} world); give yours another name.")
    skills = load_user_skills()
    skills[skill.name] = skill
    _write_user_skills(skills)
    return skill


def delete_user_skill(name: str) -> None:
    skills = load_user_skills()
    if name not in skills:
        raise InvalidInput(f"No user skill named '{name}' (user skills: {', '.join(skills) or 'none'}).")
    del skills[name]
    _write_user_skills(skills)


def available_skills(world: str) -> dict[str, Skill]:
    """The world's built-in skills, then the user's."""
    return {**builtin_skills(world), **load_user_skills()}


def resolve_skills(names: list[str] | None, world: str) -> list[Skill]:
    """Skills by name (None: the world's built-in skills), or InvalidInput naming what is available."""
    if names is None:
        return list(builtin_skills(world).values())
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise InvalidInput("Give at least one skill (a list of skill names).")
    available = available_skills(world)
    skills = []
    for name in names:
        if name not in available:
            raise InvalidInput(f"Unknown skill '{name}' for the {world} world. Available: {', '.join(available)} "
                               f"(add your own with a description and examples).")
        skills.append(available[name])
    if len({s.name for s in skills}) != len(skills):
        raise InvalidInput(f"A skill is listed twice: {', '.join(names)}.")
    return skills
