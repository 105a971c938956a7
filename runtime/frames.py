"""Frames in, model batches out, and maps back to frame geometry.

Frames come as OpenCV and NumPy users hold them: one H x W or H x W x C image,
a list of them, or an N x H x W x C batch; uint8 (/255), uint16 (/65535) or
float in [0, 1]. Colour frames are taken as BGR (OpenCV's order) unless told
RGB. ``fit`` says how a frame meets the model size S:

- "none": the frame must be S x S;
- "resize": resized to S x S (area interpolation); maps are resized back;
- "tile": cut into S x S tiles (H and W multiples of S); maps are stitched back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from eproj.errors import DataError
from eproj.tiles import tile, untile

CHANNEL_ORDERS = ("bgr", "rgb")


@dataclass(frozen=True)
class Layout:
    """Where one frame's tiles sit in the model batch: ``start`` and ``count``
    rows, the frame's (H, W) and whether it was resized."""

    start: int
    count: int
    shape: tuple[int, int]


def as_frames(frames: Any) -> list[np.ndarray]:
    """Split the accepted inputs into a list of (H, W, C) frames (C = 1 for gray)."""
    if isinstance(frames, np.ndarray):
        if frames.ndim == 2:
            return [frames[:, :, None]]
        if frames.ndim == 3:
            if frames.shape[2] not in (1, 3, 4):
                raise DataError(f"a 3-D array is one H x W x C frame with C in (1, 3), got shape {frames.shape}; "
                                "pass a batch of gray frames as N x H x W x 1 or as a list")
            return [frames]
        if frames.ndim == 4:
            return [f for f in frames]
        raise DataError(f"frames must be H x W, H x W x C or N x H x W x C, got an array of shape {frames.shape}")
    if isinstance(frames, (list, tuple)):
        out = []
        for i, f in enumerate(frames):
            if not isinstance(f, np.ndarray) or f.ndim not in (2, 3):
                got = f"shape {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
                raise DataError(f"frame {i}: expected an H x W or H x W x C NumPy array, got {got}")
            out.append(f[:, :, None] if f.ndim == 2 else f)
        return out
    raise DataError(f"frames must be a NumPy array or a list of them, got {type(frames).__name__}")


def to_unit_float(frame: np.ndarray, index: int) -> np.ndarray:
    """uint8 / uint16 / float in [0, 1] -> float32 in [0, 1]; refuses NaN, Inf and out-of-range floats."""
    if frame.dtype == np.uint8:
        return frame.astype(np.float32) / 255.0
    if frame.dtype == np.uint16:
        return frame.astype(np.float32) / 65535.0
    if frame.dtype in (np.float32, np.float64, np.float16):
        f = frame.astype(np.float32)
        if not np.isfinite(f).all():
            raise DataError(f"frame {index}: has NaN or Inf pixels")
        lo, hi = float(f.min()), float(f.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"frame {index}: float pixels must lie in [0, 1], got [{lo:g}, {hi:g}]; "
                            "pass uint8 frames or divide by 255")
        return f
    raise DataError(f"frame {index}: dtype must be uint8, uint16 or float, got {frame.dtype}")


def _channels(frame: np.ndarray, channels: int, order: str, index: int) -> np.ndarray:
    c = frame.shape[2]
    if c != channels:
        want = "1 channel (gray)" if channels == 1 else f"{channels} channels"
        raise DataError(f"frame {index}: the model expects {want}, got {c} (shape {frame.shape})")
    if channels == 3 and order == "bgr":
        return frame[:, :, ::-1]
    return frame


def to_batch(frames: Any, size: int, channels: int, fit: str, order: str = "bgr",
             known_mask: Any = None) -> tuple[np.ndarray, list[Layout], np.ndarray | None]:
    """Frames -> (x0 (T, C, S, S) float32, one Layout per frame, mask (T, 1, S, S) or None).

    ``known_mask``: one (H, W) array per frame (1 where pixels may change), for the
    inpainting weighting; it follows the frames' geometry.
    """
    if order not in CHANNEL_ORDERS:
        raise DataError(f"channel_order must be one of {CHANNEL_ORDERS}, got {order!r}")
    items = as_frames(frames)
    if not items:
        raise DataError("no frames: the batch is empty")
    masks = None
    if known_mask is not None:
        masks = as_frames(known_mask)
        if len(masks) != len(items):
            raise DataError(f"known_mask: expected one mask per frame ({len(items)}), got {len(masks)}")
    tiles, mask_tiles, layouts = [], [], []
    for i, raw in enumerate(items):
        frame = _channels(to_unit_float(raw, i), channels, order, i)
        h, w = frame.shape[:2]
        mask = None
        if masks is not None:
            mask = masks[i][:, :, :1].astype(np.float32)
            if mask.shape[:2] != (h, w):
                raise DataError(f"known_mask {i}: expected shape ({h}, {w}), got {mask.shape[:2]}")
        if fit == "none":
            if (h, w) != (size, size):
                raise DataError(f"frame {i}: the model takes {size} x {size} frames, got {h} x {w}; "
                                "choose fit='resize' or fit='tile'")
            parts, mparts = [frame], [mask]
        elif fit == "resize":
            small = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA).reshape(size, size, channels)
            parts = [small]
            mparts = [None if mask is None else
                      cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST).reshape(size, size, 1)]
        elif fit == "tile":
            if h % size or w % size:
                raise DataError(f"frame {i}: {h} x {w} cannot be tiled by {size} x {size}; "
                                "its sides must be multiples of the model size (or choose fit='resize')")
            parts = tile(frame, size)
            mparts = tile(mask, size) if mask is not None else [None] * len(parts)
        else:
            raise DataError(f"fit must be one of none, resize, tile; got {fit!r}")
        layouts.append(Layout(len(tiles), len(parts), (h, w)))
        tiles += parts
        mask_tiles += mparts
    x0 = np.ascontiguousarray(np.stack(tiles).transpose(0, 3, 1, 2), dtype=np.float32)
    mask_batch = None
    if masks is not None:
        mask_batch = np.ascontiguousarray(np.stack(mask_tiles).transpose(0, 3, 1, 2), dtype=np.float32)
    return x0, layouts, mask_batch


def to_frame(batch: np.ndarray, layout: Layout, fit: str, nearest: bool = False) -> np.ndarray:
    """One frame's rows of a (T, S, S, ...) batch back at the frame's (H, W)."""
    rows = batch[layout.start:layout.start + layout.count]
    if fit == "tile":
        return untile(rows, layout.shape)
    single = rows[0]
    if fit == "resize" and single.shape[:2] != layout.shape:
        h, w = layout.shape
        interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        out = cv2.resize(single, (w, h), interpolation=interpolation)
        return out.reshape((h, w) + single.shape[2:])
    return single


def to_output_order(image: np.ndarray, channels: int, order: str) -> np.ndarray:
    """(H, W, C) model-order (RGB or gray) -> the caller's channel order."""
    if channels == 3 and order == "bgr":
        return np.ascontiguousarray(image[:, :, ::-1])
    return image
