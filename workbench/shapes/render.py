"""Anti-aliased rendering of scenes.

Each shape is sampled on a `supersample` x `supersample` grid inside every pixel and the samples are
averaged: drawing at 4x and downsampling with a box filter, done only inside each object's box. The
result is an exact coverage (alpha) per pixel, so an edge pixel is a linear mix of the object colour
and the background: the detector relies on that to unmix colours, and uses the same `coverage`
function as its shape templates.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from workbench.shapes.scene import Scene
from workbench.shapes.world import BACKGROUND_RGB, COLOR_RGB


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, size: float) -> np.ndarray:
    """Whether points (x, y) lie inside the shape; geometry of the world's three shapes."""
    half = size / 2.0
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half * half
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "triangle":
        # Upright isosceles triangle: apex at the top centre, base along the bottom of the box.
        top, bottom = cy - half, cy + half
        return (y <= bottom) & (np.abs(x - cx) <= (y - top) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(
    shape: str,
    cx: float,
    cy: float,
    size: float,
    window: tuple[int, int, int, int],
    supersample: int = 4,
) -> np.ndarray:
    """Fraction of each pixel of `window` (x0, y0, x1, y1, exclusive ends) covered by the shape.

    Pixel (i, j) covers [i, i+1) x [j, j+1), so a box (x0, y0, x1, y1) in pixels is exact.
    """
    x0, y0, x1, y1 = window
    width, height = x1 - x0, y1 - y0
    if width <= 0 or height <= 0:
        return np.zeros((max(height, 0), max(width, 0)))
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).ravel()
    inside = _inside(shape, xs[None, :], ys[:, None], cx, cy, size)
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


def render_array(scene: Scene, supersample: int = 4) -> np.ndarray:
    """The scene as a float HxWx3 array in [0, 255] (before rounding to 8 bits)."""
    image = np.empty((scene.height, scene.width, 3), dtype=np.float64)
    image[:] = BACKGROUND_RGB
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        window = (
            max(int(np.floor(x0)), 0),
            max(int(np.floor(y0)), 0),
            min(int(np.ceil(x1)), scene.width),
            min(int(np.ceil(y1)), scene.height),
        )
        alpha = coverage(obj.shape, obj.cx, obj.cy, obj.size, window, supersample)[..., None]
        wx0, wy0, wx1, wy1 = window
        patch = image[wy0:wy1, wx0:wx1]
        # Objects never overlap, so blending over what is there equals blending over background.
        patch[:] = patch * (1.0 - alpha) + np.asarray(COLOR_RGB[obj.color], dtype=np.float64) * alpha
    return image


def render(scene: Scene, supersample: int = 4) -> Image.Image:
    """The scene as an anti-aliased RGB image of scene.width x scene.height pixels."""
    pixels = np.clip(np.rint(render_array(scene, supersample)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)
