"""Frames in, model batches out, and maps back to frame geometry.

Frames come as OpenCV and NumPy users hold them: one H x W or H x W x C image,
a list of them, or an N x H x W x C batch; uint8 (/255), uint16 (/65535) or
float in [0, 1]. Colour frames are taken as BGR (OpenCV's order) unless told
RGB. ``fit`` says how a frame meets the model size S:

- "none": the frame must be S x S;
- "resize": resized to S x S (area interpolation); maps are resized back;
- "tile": brought to the working scale first (resized by ``scale``, the factor training
  resized its images by before cropping; the bundle records it), then cut into S x S
  tiles every ``stride`` pixels (default S/2, so tiles overlap by half; the last tile of
  a row or column ends at the border, so any frame at least S x S at the working scale is
  covered without padding). Maps of overlapping tiles are blended
  (``eproj.tiles.untile``) and resized back to the frame's own size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from eproj.errors import ConfigError, DataError
from eproj.tiles import tile, untile

CHANNEL_ORDERS = ("bgr", "rgb")


@dataclass(frozen=True)
class Layout:
    """Where one frame's tiles sit in the model batch: ``start`` and ``count``
    rows, the frame's (H, W); for fit "tile", its (h, w) at the working scale and the
    tiles' stride."""

    start: int
    count: int
    shape: tuple[int, int]
    working: tuple[int, int] | None = None
    stride: int | None = None


def recorded_scale(bundle_input: dict[str, Any]) -> Any:
    """The working scale in a manifest's ``input``: the factor training resized its images
    by before cropping (``scale``). Bundles exported before eproj recorded it have none (or
    null, for models that resize): 1.0, frames tiled at their own size as those versions
    did. The value is returned as stored; ``check_tiling`` refuses one that is no number > 0."""
    value = bundle_input.get("scale")
    return 1.0 if value is None else value


def default_stride(size: int) -> int:
    """The runtime's tile stride: half a tile, so each pixel lies in two tiles per axis
    and every tile border runs through the middle of other tiles."""
    return max(1, size // 2)


def check_tiling(size: int, scale: Any, stride: Any) -> tuple[float, int]:
    """(scale, stride) for fit "tile" at model size ``size``, stride None -> ``default_stride``;
    ConfigError unless scale is a finite number > 0 and stride an integer in [1, size]."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale must be a finite number > 0, got {scale!r}")
    if stride is None:
        return float(scale), default_stride(size)
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride <= size:
        raise ConfigError(f"tile_stride must be an integer in [1, {size}] (the model size), got {stride!r}")
    return float(scale), int(stride)


def working_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) of a frame -> its (h, w) at the working scale (rounded, at least 1)."""
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _to_working_scale(image: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(H, W, C) -> (h, w, C) by area interpolation (as training resized its images), or nearest."""
    if image.shape[:2] == shape:
        return image
    h, w = shape
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
    return out.reshape((h, w) + image.shape[2:])


def _plain_array(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as a plain ndarray; DataError for the subclasses whose values are not what they show.

    A masked array hides values (its NaN or out-of-range pixels sit under the mask, and
    NumPy's functions skip them), and ``np.matrix`` is always 2-D. Other subclasses
    (e.g. ``np.memmap``) are viewed as plain arrays.
    """
    if isinstance(array, np.ma.MaskedArray):
        raise DataError(f"{what}: expected a plain NumPy array, got a masked array (np.ma.MaskedArray), whose "
                        "masked values would be inspected unseen; pass frame.filled(value) or np.asarray(frame)")
    if isinstance(array, np.matrix):
        raise DataError(f"{what}: expected a plain NumPy array, got np.matrix; pass np.asarray(frame)")
    return np.asarray(array)


def _check_frame(frame: np.ndarray, index: int) -> np.ndarray:
    """One (H, W, C) frame: refuses empty frames (0 x N) and channel counts other than 1, 3, 4."""
    h, w, c = frame.shape
    if h == 0 or w == 0 or c == 0:
        raise DataError(f"frame {index}: is empty ({h} x {w} x {c}); a frame needs at least one pixel")
    return frame


def as_frames(frames: Any) -> list[np.ndarray]:
    """Split the accepted inputs into a list of (H, W, C) frames (C = 1 for gray).

    Refuses, with a DataError, masked arrays, ``np.matrix``, empty frames and arrays of
    another rank.
    """
    if isinstance(frames, np.ndarray):
        frames = _plain_array(frames, "frames")
        if frames.ndim == 2:
            return [_check_frame(frames[:, :, None], 0)]
        if frames.ndim == 3:
            if frames.shape[2] not in (1, 3, 4):
                raise DataError(f"a 3-D array is one H x W x C frame with C in (1, 3), got shape {frames.shape}; "
                                "pass a batch of gray frames as N x H x W x 1 or as a list")
            return [_check_frame(frames, 0)]
        if frames.ndim == 4:
            return [_check_frame(f, i) for i, f in enumerate(frames)]
        raise DataError(f"frames must be H x W, H x W x C or N x H x W x C, got an array of shape {frames.shape}")
    if isinstance(frames, (list, tuple)):
        out = []
        for i, f in enumerate(frames):
            if not isinstance(f, np.ndarray) or f.ndim not in (2, 3):
                got = f"shape {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
                raise DataError(f"frame {i}: expected an H x W or H x W x C NumPy array, got {got}")
            f = _plain_array(f, f"frame {i}")
            out.append(_check_frame(f[:, :, None] if f.ndim == 2 else f, i))
        return out
    raise DataError(f"frames must be a NumPy array or a list of them, got {type(frames).__name__}")


def to_unit_float(frame: np.ndarray, index: int) -> np.ndarray:
    """uint8 / uint16 / float in [0, 1] -> float32 in [0, 1]; refuses NaN, Inf and out-of-range floats."""
    if frame.dtype == np.uint8:
        return frame.astype(np.float32) / 255.0
    if frame.dtype == np.uint16:
        return frame.astype(np.float32) / 65535.0
    if frame.dtype in (np.float32, np.float64, np.float16):
        finite = np.isfinite(frame)
        if not finite.all():
            raise DataError(f"frame {index}: has NaN or Inf pixels ({int(finite.size - finite.sum())} of "
                            f"{finite.size} values); float pixels must be finite and lie in [0, 1]")
        lo, hi = float(frame.min()), float(frame.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"frame {index}: float pixels must lie in [0, 1], got [{lo:g}, {hi:g}]; "
                            "pass uint8 frames or divide by 255")
        return frame.astype(np.float32)
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
             known_mask: Any = None, scale: float = 1.0,
             stride: int | None = None) -> tuple[np.ndarray, list[Layout], np.ndarray | None]:
    """Frames -> (x0 (T, C, S, S) float32, one Layout per frame, mask (T, 1, S, S) or None).

    ``known_mask``: one (H, W) array per frame (1 where pixels may change), for the
    inpainting weighting; it follows the frames' geometry. ``scale`` (> 0) and ``stride``
    (1..S, default ``default_stride(S)``) apply to fit "tile".
    """
    scale, stride = check_tiling(size, scale, stride)
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
            if not np.isfinite(mask).all():
                raise DataError(f"known_mask {i}: has NaN or Inf values; expected 1 where pixels may change, "
                                "0 elsewhere")
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
            working = working_shape((h, w), scale)
            if min(working) < size:
                raise DataError(f"frame {i}: {h} x {w} is {working[0]} x {working[1]} at the working scale "
                                f"{scale:g}, smaller than the model's {size} x {size} tiles "
                                "(choose fit='resize')")
            parts = tile(_to_working_scale(frame, working), size, stride)
            mparts = ([None] * len(parts) if mask is None
                      else tile(_to_working_scale(mask, working, nearest=True), size, stride))
        else:
            raise DataError(f"fit must be one of none, resize, tile; got {fit!r}")
        if fit == "tile":
            layouts.append(Layout(len(tiles), len(parts), (h, w), working, stride))
        else:
            layouts.append(Layout(len(tiles), len(parts), (h, w)))
        tiles += parts
        mask_tiles += mparts
    x0 = np.ascontiguousarray(np.stack(tiles).transpose(0, 3, 1, 2), dtype=np.float32)
    mask_batch = None
    if masks is not None:
        mask_batch = np.ascontiguousarray(np.stack(mask_tiles).transpose(0, 3, 1, 2), dtype=np.float32)
    return x0, layouts, mask_batch


def stitch(batch: np.ndarray, layout: Layout) -> np.ndarray:
    """One tiled frame's rows of a (T, S, S, ...) batch blended into its (h, w, ...) map at
    the working scale (``eproj.tiles.untile``)."""
    rows = batch[layout.start:layout.start + layout.count]
    return untile(rows, layout.working or layout.shape, layout.stride)


def at_frame_size(image: np.ndarray, layout: Layout, nearest: bool = False) -> np.ndarray:
    """(h, w, ...) at the working scale -> the frame's (H, W, ...) (linear, or nearest)."""
    if image.shape[:2] == layout.shape:
        return image
    h, w = layout.shape
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    return out.reshape((h, w) + image.shape[2:])


def to_frame(batch: np.ndarray, layout: Layout, fit: str, nearest: bool = False) -> np.ndarray:
    """One frame's rows of a (T, S, S, ...) batch back at the frame's (H, W)."""
    rows = batch[layout.start:layout.start + layout.count]
    if fit == "tile":
        return at_frame_size(stitch(batch, layout), layout, nearest)
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
