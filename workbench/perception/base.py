"""What every perception backend returns, and the interfaces they implement.

The embedded shapes backends and the real ones (GroundingDINO, SAM, RAM, BLIP) share these, so the
pipelines and the scorer never know which one they are talking to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class Detection:
    label: str
    box: Box
    score: float  # confidence in [0, 1]
    color: str | None = None

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "box": [float(v) for v in self.box],
            "score": float(self.score),
            "color": self.color,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Detection:
        return cls(
            label=str(data["label"]),
            box=tuple(float(v) for v in data["box"]),
            score=float(data["score"]),
            color=data.get("color"),
        )


@dataclass(frozen=True)
class Tag:
    name: str
    score: float


@runtime_checkable
class Detector(Protocol):
    # A detector may also say, as `confident_score`, the score from which its detections are
    # unambiguous objects (IPR leaves out images with a detection below it); none: every score counts.

    def detect(self, image: Image.Image, labels: list[str] | None = None) -> list[Detection]:
        """Objects in the image, best first; with `labels`, only those matching one of them."""
        ...


@runtime_checkable
class Segmenter(Protocol):
    def segment(self, image: Image.Image, boxes: list[Box]) -> list[np.ndarray]:
        """One boolean HxW mask per box, for the object that box holds."""
        ...


@runtime_checkable
class Tagger(Protocol):
    def tag(self, image: Image.Image) -> list[Tag]:
        """Tags that describe the image, best first."""
        ...


@runtime_checkable
class Captioner(Protocol):
    def caption(self, image: Image.Image, mode: str = "short") -> str:
        """A caption; mode "short" (objects) or "long" (objects and their layout)."""
        ...
