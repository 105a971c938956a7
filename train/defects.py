"""A seeded generator of realistic surface defects with exact ground-truth masks.

Each defect kind changes the pixels inside one shape and nothing outside it, so
the returned mask is exactly the set of pixels the defect may have altered:

- ``scratch``: a thin curved line, darker or brighter than the surface;
- ``stain``: a blob whose intensity is shifted by a smooth field;
- ``hole``: a dark elliptical cavity with a little texture noise;
- ``patch``: a region filled with content from a foreign texture.

Images are (H, W, C) float32 in [0, 1]; masks are (H, W) bool.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFECT_KINDS = ("scratch", "stain", "hole", "patch")


def _blob_mask(rng: np.random.Generator, h: int, w: int, min_r: float, max_r: float) -> np.ndarray:
    """An irregular filled blob (a wobbly polygon) somewhere inside an h x w image."""
    cy = rng.uniform(max_r * 0.6, h - max_r * 0.6)
    cx = rng.uniform(max_r * 0.6, w - max_r * 0.6)
    n = 14
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    base = rng.uniform(min_r, max_r)
    aspect = rng.uniform(0.5, 1.0)
    theta = rng.uniform(0, np.pi)
    radii = base * rng.uniform(0.7, 1.15, n)
    pts_x = radii * np.cos(angles)
    pts_y = radii * np.sin(angles) * aspect
    rx = cx + pts_x * np.cos(theta) - pts_y * np.sin(theta)
    ry = cy + pts_x * np.sin(theta) + pts_y * np.cos(theta)
    poly = np.stack([rx, ry], axis=1).round().astype(np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [poly], 1)
    return mask.astype(bool)


def _scratch(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    p0 = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h])
    length = rng.uniform(0.3, 0.7) * min(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    p2 = p0 + length * np.array([np.cos(angle), np.sin(angle)])
    bend = rng.normal(0, 0.15 * length, 2)
    t = np.linspace(0, 1, 40)[:, None]
    p1 = (p0 + p2) / 2 + bend
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    mask = np.zeros((h, w), np.uint8)
    cv2.polylines(mask, [curve.round().astype(np.int32)], False, 1, int(rng.integers(2, 4)))
    m = mask.astype(bool)
    out = image.copy()
    level = rng.uniform(0.0, 0.15) if rng.random() < 0.5 else rng.uniform(0.85, 1.0)
    out[m] = level + rng.normal(0, 0.02, (int(m.sum()), image.shape[2]))
    return out, m


def _stain(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    m = _blob_mask(rng, h, w, 0.06 * min(h, w), 0.16 * min(h, w))
    field = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 6)
    field = field / (np.abs(field).max() + 1e-6)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.4) * (0.8 + 0.2 * field)
    out = image.copy()
    out[m] = image[m] + shift[m][:, None]
    return out, m


def _hole(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    m = _blob_mask(rng, h, w, 0.04 * min(h, w), 0.1 * min(h, w))
    out = image.copy()
    darkness = rng.uniform(0.02, 0.12)
    out[m] = darkness + 0.15 * (image[m] - image[m].mean()) + rng.normal(0, 0.01, (int(m.sum()), image.shape[2]))
    return out, m


def _patch(rng: np.random.Generator, image: np.ndarray, foreign: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    m = _blob_mask(rng, h, w, 0.08 * min(h, w), 0.2 * min(h, w))
    src = foreign[int(rng.integers(len(foreign)))]
    sy = int(rng.integers(0, src.shape[0] - h + 1))
    sx = int(rng.integers(0, src.shape[1] - w + 1))
    piece = src[sy:sy + h, sx:sx + w]
    if piece.shape[2] != image.shape[2]:
        piece = np.repeat(piece.mean(axis=2, keepdims=True), image.shape[2], axis=2)
    out = image.copy()
    out[m] = piece[m]
    return out, m


def add_defect(rng: np.random.Generator, image: np.ndarray, foreign: list[np.ndarray],
               kind: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Add one defect to ``image``.

    Args:
        rng: the seeded generator that decides everything random.
        image: (H, W, C) float32 in [0, 1], left unchanged.
        foreign: other textures, (h, w, C') float32 with h >= H and w >= W, for ``patch``.
        kind: one of ``DEFECT_KINDS``, or None to draw one.
    Returns:
        (defective image (H, W, C) float32 in [0, 1], mask (H, W) bool, kind).
    """
    if kind is None:
        kind = str(rng.choice(DEFECT_KINDS if foreign else DEFECT_KINDS[:3]))
    if kind == "scratch":
        out, m = _scratch(rng, image)
    elif kind == "stain":
        out, m = _stain(rng, image)
    elif kind == "hole":
        out, m = _hole(rng, image)
    elif kind == "patch":
        if not foreign:
            raise ValueError("the patch defect needs at least one foreign texture")
        out, m = _patch(rng, image, foreign)
    else:
        raise ValueError(f"defect kind must be one of {DEFECT_KINDS}, got {kind!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32), m, kind
