"""Perception interfaces (detector, segmenter, tagger, captioner) and their data types."""

from workbench.perception.base import Box, Captioner, Detection, Detector, Segmenter, Tag, Tagger

__all__ = ["Box", "Captioner", "Detection", "Detector", "Segmenter", "Tag", "Tagger"]
