"""Grounded-SAM: a detector finds the named objects, a segmenter cuts out each one from its box."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from workbench.perception.base import Detection, Detector, Segmenter


@dataclass(frozen=True)
class SegmentedDetection:
    detection: Detection
    mask: np.ndarray  # bool, the image's H x W


class GroundedSam:
    """Any Detector plus any Segmenter (GroundingDINO + SAM, or the shapes pair)."""

    def __init__(self, detector: Detector, segmenter: Segmenter):
        self.detector = detector
        self.segmenter = segmenter

    def detect_and_segment(self, image: Image.Image, labels: list[str] | None = None) -> list[SegmentedDetection]:
        """The detector's detections, best first, each with the mask of the object in its box."""
        detections = self.detector.detect(image, labels)
        masks = self.segmenter.segment(image, [d.box for d in detections])
        return [SegmentedDetection(d, m) for d, m in zip(detections, masks, strict=True)]
