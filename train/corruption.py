"""Partial corruptions for self-supervised training (Bauer, Nakajima & Müller; the
context-encoding VAE of Zimmerer et al.).

The model sees a normal image with regions replaced and learns to output the
clean image, so it learns a projection onto the normal manifold rather than
the identity. This generator is separate from the defect generator used for
evaluation (``eproj.train.defects``). Its regions are smooth random star shapes
(or squares); its content comes from the training batch itself and from
noise, never from the evaluation's foreign textures:

- ``noise``: uniform noise;
- ``foreign``: the same region of another image of the batch, rotated by a
  multiple of 90 degrees and flipped;
- ``shuffle``: the region's own pixels in random order;
- ``deform``: the image under a smooth random displacement field, inside the region.

Presets: ``patches`` (every kind, random shapes) and ``cevae`` (noise squares,
the context-encoding VAE's corruption, trained beside the plain VAE loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from eproj.errors import ConfigError

CORRUPTIONS = ("noise", "foreign", "shuffle", "deform")
SHAPES = ("star", "square")


@dataclass(frozen=True)
class CorruptionConfig:
    """``probability``: the chance a sample is corrupted; each corrupted sample gets
    1 to ``max_regions`` regions of ``min_area`` to ``max_area`` of the image each."""

    kinds: tuple[str, ...] = CORRUPTIONS
    shape: str = "star"
    probability: float = 0.8
    max_regions: int = 2
    min_area: float = 0.02
    max_area: float = 0.12

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in CORRUPTIONS]
        if unknown or not self.kinds:
            raise ConfigError(f"corruption kinds must be a non-empty subset of {CORRUPTIONS}, got {self.kinds}")
        if self.shape not in SHAPES:
            raise ConfigError(f"corruption shape must be one of {SHAPES}, got {self.shape!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"corruption probability must lie in [0, 1], got {self.probability}")
        if self.max_regions < 1:
            raise ConfigError(f"max_regions must be >= 1, got {self.max_regions}")
        if not 0.0 < self.min_area <= self.max_area < 1.0:
            raise ConfigError(f"region areas must satisfy 0 < min <= max < 1, got [{self.min_area}, {self.max_area}]")

    def to_dict(self) -> dict:
        return {**asdict(self), "kinds": list(self.kinds)}


PRESETS = {
    "patches": CorruptionConfig(),
    "cevae": CorruptionConfig(kinds=("noise",), shape="square", probability=1.0, max_regions=3,
                              min_area=0.01, max_area=0.06),
}


def region(rng: np.random.Generator, size: int, area: float, shape: str) -> np.ndarray:
    """A (size, size) bool mask covering about ``area`` of the image."""
    if shape == "square":
        side = max(2, int(round(np.sqrt(area) * size)))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        mask = np.zeros((size, size), bool)
        mask[y:y + side, x:x + side] = True
        return mask
    # a star-shaped region whose radius varies smoothly with the angle
    r0 = np.sqrt(area / np.pi) * size
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(1, 5):
        radius += rng.uniform(0, 0.3 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius *= r0 / np.sqrt(np.mean(radius ** 2))
    cy, cx = rng.uniform(r0, size - r0, 2) if size > 2 * r0 else (size / 2, size / 2)
    points = np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [points.round().astype(np.int32)], 1)
    return mask.astype(bool)


def _content(rng: np.random.Generator, batch: np.ndarray, i: int, kind: str, mask: np.ndarray) -> np.ndarray:
    """(C, S, S) replacement content for sample i; only its pixels under ``mask`` are used."""
    image = batch[i]
    if kind == "noise":
        return rng.random(image.shape, dtype=np.float32)
    if kind == "foreign":
        j = int(rng.integers(len(batch) - 1)) if len(batch) > 1 else 0
        j = j + 1 if len(batch) > 1 and j >= i else j
        other = np.rot90(batch[j], k=int(rng.integers(4)), axes=(1, 2))
        return np.ascontiguousarray(other[:, :, ::-1] if rng.random() < 0.5 else other)
    if kind == "shuffle":
        out = image.copy()
        ys, xs = np.nonzero(mask)
        order = rng.permutation(len(ys))
        out[:, ys, xs] = image[:, ys[order], xs[order]]
        return out
    # deform: a smooth displacement of up to ~6 % of the size
    size = image.shape[-1]
    field = rng.normal(0, 1, (2, size, size)).astype(np.float32)
    field = np.stack([cv2.GaussianBlur(f, (0, 0), size / 12) for f in field])
    field *= 0.06 * size / (np.abs(field).max() + 1e-6)
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.stack([cv2.remap(c, gx + field[1], gy + field[0], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
                     for c in image])


def corrupt(rng: np.random.Generator, batch: np.ndarray, config: CorruptionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt a training batch.

    Args:
        batch: (N, C, S, S) float32 in [0, 1], left unchanged.
    Returns:
        (corrupted batch (N, C, S, S) float32 in [0, 1], masks (N, S, S) bool of the replaced pixels).
    """
    n, _, size, _ = batch.shape
    out = batch.copy()
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        if rng.random() >= config.probability:
            continue
        for _ in range(int(rng.integers(1, config.max_regions + 1))):
            mask = region(rng, size, float(rng.uniform(config.min_area, config.max_area)), config.shape)
            kind = str(rng.choice(config.kinds))
            content = _content(rng, batch, i, kind, mask)
            out[i][:, mask] = content[:, mask]
            masks[i] |= mask
    return np.clip(out, 0.0, 1.0), masks
