"""The captioner's bank of the shapes model's own generations (pipelines.train_shapes_captioner)."""

from __future__ import annotations

import numpy as np

import pipelines.train_shapes_captioner as trainer
import workbench.generation as generation
from workbench.generation import GeneratedImage
from workbench.shapes.render import render
from workbench.shapes.scene import scene_from_spec


def test_generations_showing_nothing_that_was_asked_for_are_left_out(monkeypatch):
    asked = {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    other = {"include": [{"class": "square", "count": 1, "color": "blue"}]}
    rng = np.random.default_rng(0)
    drawn = [render(scene_from_spec(asked, rng)), render(scene_from_spec(other, rng))]  # seeds 0 and 1
    monkeypatch.setattr(trainer, "training_prompts", lambda n, seed: [{"prompt": "a red circle", **asked}])
    monkeypatch.setattr(generation, "generate_many",
                        lambda requests: [GeneratedImage(image, k, None, {}) for k, image in enumerate(drawn)])

    images, prompts = trainer.generated_bank(2, seed=0)
    # The circle keeps its prompt; the square shows nothing that was asked for, so it has no caption
    # (an empty one broke the contrastive term's hard negatives) and is not banked.
    assert prompts == ["a red circle"]
    assert images.shape == (1, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
