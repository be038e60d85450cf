"""The embedded shapes world: vocabulary, scenes, renderer, caption writers and ShapesBench."""

from workbench.shapes.world import (
    BACKGROUND_RGB,
    COLOR_RGB,
    COLORS,
    COUNT_WORDS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
)

__all__ = ["BACKGROUND_RGB", "COLOR_RGB", "COLORS", "COUNT_WORDS", "IMAGE_SIZE", "RELATIONS", "SHAPES"]
