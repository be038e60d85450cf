"""SELMA's skills: the built-in sets, user skills in the data folder, and their validation."""

import json

import pytest

from workbench.errors import InvalidInput
from workbench.llm import SHAPES_SKILLS as SHAPES_LLM_SKILLS
from workbench.shapes.bench_prompts import normalize_prompt, shapesbench_prompts
from workbench.skills import (REAL_SKILLS, SHAPES_SKILLS, Skill, available_skills, delete_user_skill,
                              load_user_skills, resolve_skills, save_user_skill, user_skills_path, world_of)


def test_real_models_get_the_papers_five_prompt_sources_with_three_seeds_each():
    assert [s.name for s in REAL_SKILLS] == ["long_description", "counting", "user_style", "counter_commonsense",
                                             "everyday_scene"]
    for skill in REAL_SKILLS:
        assert skill.checked() == skill  # the shipped skills pass their own validation
        assert len(skill.examples) == 3 and skill.description
    assert [s.name for s in resolve_skills(None, "real")] == [s.name for s in REAL_SKILLS]


def test_shapes_skills_are_the_shapes_llms_and_stay_out_of_shapesbench():
    assert tuple(s.name for s in SHAPES_SKILLS) == SHAPES_LLM_SKILLS
    bench = {normalize_prompt(r["prompt"]) for r in shapesbench_prompts()}
    for skill in SHAPES_SKILLS:
        assert skill.checked() == skill and len(skill.examples) == 3
        assert not {normalize_prompt(e) for e in skill.examples} & bench, skill.name


def test_world_of_a_model():
    assert world_of("shapes") == "shapes"
    assert world_of("sd15") == "real"


def test_user_skills_are_saved_in_the_data_folder_and_resolved(data_dir):
    assert load_user_skills() == {}
    save_user_skill(Skill("  animals ", "  Animals   doing everyday things. ",
                          ["a dog riding a bike ", "a cat  reading"]))
    assert user_skills_path() == data_dir / "skills.json"
    saved = json.loads(user_skills_path().read_text())["skills"]
    assert saved == [{"name": "animals", "description": "Animals doing everyday things.",
                      "examples": ["a dog riding a bike", "a cat reading"]}]
    assert list(available_skills("real"))[-1] == "animals"
    assert [s.name for s in resolve_skills(["counting", "animals"], "real")] == ["counting", "animals"]

    save_user_skill(Skill("animals", "Animals at work.", ("a horse typing",)))  # replaces, keeps one entry
    assert load_user_skills()["animals"].examples == ("a horse typing",)
    delete_user_skill("animals")
    assert load_user_skills() == {}
    with pytest.raises(InvalidInput, match="No user skill named 'animals'"):
        delete_user_skill("animals")


def test_a_user_skill_cannot_take_a_builtin_name():
    with pytest.raises(InvalidInput, match="'spatial' is a built-in skill"):
        save_user_skill(Skill("spatial", "Where things are.", ("a cup left of a plate",)))


@pytest.mark.parametrize("skill, message", [
    (Skill("Counting!", "x", ("a",)), "must start with a lowercase letter"),
    (Skill("", "x", ("a",)), "needs a name"),
    (Skill("colours", "  ", ("a",)), "needs a description"),
    (Skill("colours", "x", ()), "needs between 1 and 20 example prompts"),
    (Skill("colours", "x", "a red car"), "must be a list of prompts"),
    (Skill("colours", "x", ("a red car", " ")), "must be a non-empty prompt"),
    (Skill("colours", "x", ("a red car", "A red  car")), "the same example twice"),
    (Skill("colours", "x" * 601, ("a",)), "keep it under 600"),
])
def test_bad_skills_get_clear_messages(skill, message):
    with pytest.raises(InvalidInput, match=message):
        save_user_skill(skill)


def test_unknown_or_repeated_skill_names():
    with pytest.raises(InvalidInput, match="Unknown skill 'humour' for the shapes world. Available: counting, spatial"):
        resolve_skills(["humour"], "shapes")
    with pytest.raises(InvalidInput, match="listed twice"):
        resolve_skills(["counting", "counting"], "shapes")
    with pytest.raises(InvalidInput, match="at least one skill"):
        resolve_skills([], "shapes")


def test_a_broken_skills_file_says_where(data_dir):
    data_dir.mkdir(parents=True, exist_ok=True)
    user_skills_path().write_text('{"skills": [{"name": "bad name", "description": "x", "examples": ["a"]}]}')
    with pytest.raises(InvalidInput, match="skills.json: The skill name 'bad name'"):
        load_user_skills()
    user_skills_path().write_text("not json")
    with pytest.raises(InvalidInput, match="not a readable skills file"):
        resolve_skills(["animals"], "real")
