"""Data sources named by a spec string.

- ``textures:NAME`` (NAME in ``brick``, ``grass``: the 512x512 textures
  scikit-image ships) or ``textures:PATH`` (any texture image): disjoint train,
  validation and test regions (top half; bottom-left and bottom-right quarters,
  see ``TextureSource``); test crops get seeded synthetic defects with exact
  masks (``eproj.train.defects``).
- ``mvtec:PATH/CATEGORY``: the MVTec AD layout (``train/good``,
  ``test/<defect>``, ``ground_truth/<defect>/<stem>_mask.png``).
- ``folder:PATH``: a user's own images in the same layout with the masks
  optional (``train/`` or ``train/good/`` for good images, ``test/good/`` and
  ``test/<defect>/``, ``ground_truth/<defect>/<stem>_mask.png`` or
  ``<stem>.png`` where a mask exists).

The fit says how images meet the model size S: "tile" (textures: subsampled to a
512-pixel working side, cut into random S x S crops for training, tiled for testing)
or "resize" (objects: resized to S x S). ``fit_of`` gives a spec's default:
``textures:`` and the MVTec texture categories tile, everything else resizes;
``load_source(..., fit="tile")`` tiles a ``folder:`` or another MVTec category.
A tiled source's ``scale`` is the factor its images were resized by (working side /
native shorter side), which the checkpoint and the bundle record for the runtime.

Images everywhere are float32 in [0, 1]; batches handed to models are
(N, C, S, S), single images (H, W, C); masks (H, W) bool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from eproj.errors import DataError
from eproj.tiles import tile, untile  # noqa: F401  (part of this module's interface)
from eproj.train.defects import add_defect

EMBEDDED_TEXTURES = ("brick", "grass")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
TRAINING_FITS = ("tile", "resize")
TEXTURE_SIDE = 512  # textures are subsampled to this side, as in the paper


@dataclass
class TestSample:
    """One test image with its ground truth.

    ``image``: (H, W, C) float32 in [0, 1]; ``mask``: (H, W) bool, or None when
    the pixel ground truth is unknown; ``label``: 0 good, 1 defective.
    """

    __test__ = False  # not a pytest test class

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    label: int
    defect: str


def read_image(path: Path, channels: int | None = None) -> np.ndarray:
    """Read an image file to (H, W, C) float32 in [0, 1], RGB order for colour.

    Raises DataError if it cannot be read or its channel count is not ``channels``.
    """
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise DataError(f"cannot read image {path}: missing, truncated or not an image")
    if data.ndim == 2:
        data = data[:, :, None]
    if data.shape[2] == 4:
        data = data[:, :, :3]
    if data.shape[2] == 3:
        data = data[:, :, ::-1]
    if data.dtype == np.uint8:
        image = data.astype(np.float32) / 255.0
    elif data.dtype == np.uint16:
        image = data.astype(np.float32) / 65535.0
    else:
        raise DataError(f"image {path} has pixel type {data.dtype}; expected 8- or 16-bit")
    if channels is not None and image.shape[2] != channels:
        raise DataError(f"image {path} has {image.shape[2]} channel(s); expected {channels}")
    return np.ascontiguousarray(image)


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"cannot read mask {path}: missing, truncated or not an image")
    if mask.shape != shape:
        raise DataError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}; "
                        f"expected {shape[1]}x{shape[0]} like its image")
    return mask > 127


def resize(image: np.ndarray, size: int | tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize (H, W, C) or (H, W) to size (square int or (h, w)), keeping the layout."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    if image.dtype == bool:
        out = cv2.resize(image.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    else:
        out = cv2.resize(image, (w, h), interpolation=interp)
    if image.ndim == 3 and out.ndim == 2:
        out = out[:, :, None]
    return out


def to_batch(images: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N, H, W, C) images -> (N, C, H, W) contiguous float32 batch."""
    arr = np.asarray(images, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def _random_crops(rng: np.random.Generator, images: list[np.ndarray], count: int, size: int) -> np.ndarray:
    out = []
    for _ in range(count):
        img = images[int(rng.integers(len(images)))]
        y = int(rng.integers(0, img.shape[0] - size + 1))
        x = int(rng.integers(0, img.shape[1] - size + 1))
        out.append(img[y:y + size, x:x + size])
    return to_batch(out)


class DataSource:
    """Train, validation and test data of one spec, at one model input size.

    ``kind`` is ``texture`` (random crops, test images tiled by the model size)
    or ``object`` (whole images resized to the model size, augmented by rotation
    and translation).
    """

    spec: str
    kind: str
    channels: int
    size: int
    scale: float | None = None  # tiled sources: working side / native shorter side

    @property
    def fit(self) -> str:
        """How images meet the model size: "tile" for textures, "resize" for objects."""
        return "tile" if self.kind == "texture" else "resize"

    def input_record(self) -> dict:
        """What checkpoints and bundles record of the input geometry: the fit and, when
        tiled, the working scale (the factor images were resized by before cropping)."""
        return {"fit": self.fit, "scale": self.scale if self.fit == "tile" else None}

    def train_batch(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """A batch of augmented training inputs, (batch, C, S, S) float32."""
        raise NotImplementedError

    def train_sample(self, count: int, seed: int = 0) -> np.ndarray:
        """A fixed set of training inputs (no augmentation for objects), (count, C, S, S)."""
        raise NotImplementedError

    def validation(self) -> np.ndarray:
        """Normal images held out of training, (N, C, S, S); thresholds are chosen on them."""
        raise NotImplementedError

    def test(self) -> list[TestSample]:
        """The test set; texture images may be larger than S (multiples of S) and are tiled."""
        raise NotImplementedError


class TextureSource(DataSource):
    """A texture image split into disjoint regions: the top half for training, the
    bottom half's left half for validation and its right half for testing.

    Validation and test regions sit side by side at the same height so that they see
    the texture alike: a photographed texture changes with the row (the embedded brick
    wall is seen in perspective; its brick columns are about 33 pixels apart in the top
    half and 40 in the bottom quarter, 38 in both bottom-half quadrants), and thresholds
    calibrated on a strip above the test strip would judge the test crops at another
    scale. The texture is subsampled to 512 on its shorter side first. Training crops are
    flipped at random (textures look alike mirrored; validation adds mirrored copies, so
    the left and right quadrants' leaning columns are both seen); test crops get seeded
    synthetic defects.
    """

    kind = "texture"

    def __init__(self, spec: str, texture: np.ndarray, foreign: list[np.ndarray], size: int,
                 n_test: int = 48, n_validation: int = 24, defect_rate: float = 0.75, seed: int = 0,
                 scale: float = 1.0):
        self.spec, self.size, self.channels, self.scale = spec, size, texture.shape[2], scale
        h, w = texture.shape[:2]
        half_h, half_w = h // 2, w // 2
        if min(h - half_h, half_w) < size:
            raise DataError(f"texture {spec} is {w}x{h}; its validation and test regions (the bottom half's "
                            f"left and right halves, {half_w}x{h - half_h}) must be at least the model size {size}")
        self.train_region = texture[:half_h]
        self.validation_region = texture[half_h:, :half_w]
        self.test_region = texture[half_h:, half_w:]
        self.foreign = foreign
        self.n_test, self.n_validation = n_test, n_validation
        self.defect_rate, self.seed = defect_rate, seed

    def train_batch(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        crops = _random_crops(rng, [self.train_region], batch, self.size)
        flips = rng.random((batch, 2)) < 0.5
        for i, (horizontal, vertical) in enumerate(flips):
            if horizontal:
                crops[i] = crops[i, :, :, ::-1]
            if vertical:
                crops[i] = crops[i, :, ::-1, :]
        return crops

    def train_sample(self, count: int, seed: int = 0) -> np.ndarray:
        return _random_crops(np.random.default_rng(seed), [self.train_region], count, self.size)

    def validation(self) -> np.ndarray:
        return _random_crops(np.random.default_rng(self.seed + 1), [self.validation_region],
                             self.n_validation, self.size)

    def test(self) -> list[TestSample]:
        rng = np.random.default_rng(self.seed + 2)
        crops = _random_crops(rng, [self.test_region], self.n_test, self.size).transpose(0, 2, 3, 1)
        samples = []
        for i, crop in enumerate(crops):
            if rng.random() < self.defect_rate:
                image, mask, kind = add_defect(rng, crop, self.foreign)
                samples.append(TestSample(f"{i:03d}_{kind}", image, mask, 1, kind))
            else:
                mask = np.zeros(crop.shape[:2], bool)
                samples.append(TestSample(f"{i:03d}_good", np.ascontiguousarray(crop), mask, 0, "good"))
        return samples


def _embedded_texture(name: str) -> np.ndarray:
    from skimage import data as skdata

    return (getattr(skdata, name)().astype(np.float32) / 255.0)[:, :, None]


def _subsample(image: np.ndarray, side: int = TEXTURE_SIDE) -> tuple[np.ndarray, float]:
    """(image subsampled to ``side`` on its shorter side, the factor); smaller images stay."""
    h, w = image.shape[:2]
    if min(h, w) <= side:
        return image, 1.0
    scale = side / min(h, w)
    return resize(image, (round(h * scale), round(w * scale))), scale


def texture_source(arg: str, size: int, **kwargs) -> TextureSource:
    """``textures:NAME`` or ``textures:PATH``; foreign patches come from the other textures."""
    if arg in EMBEDDED_TEXTURES:
        texture = _embedded_texture(arg)
        foreign_names = [n for n in ("brick", "grass", "gravel") if n != arg]
    else:
        path = Path(arg)
        if not path.is_file():
            raise DataError(f"textures:{arg}: expected one of {EMBEDDED_TEXTURES} or an image file; "
                            f"no such file")
        texture, scale = _subsample(read_image(path))
        kwargs.setdefault("scale", scale)
        foreign_names = ["brick", "grass", "gravel"]
    foreign = [_embedded_texture(n) for n in foreign_names]
    foreign = [resize(f, max(f.shape[0], texture.shape[0])) for f in foreign]
    if texture.shape[2] == 3:
        foreign = [np.repeat(f, 3, axis=2) for f in foreign]
    return TextureSource(f"textures:{arg}", texture, foreign, size, **kwargs)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class FolderSource(DataSource):
    """Images on disk in the MVTec AD layout (``strict``) or its relaxed ``folder:`` form."""

    def __init__(self, spec: str, root: Path, size: int, kind: str, strict: bool,
                 validation_fraction: float = 0.1, seed: int = 0):
        self.spec, self.root, self.size, self.kind, self.strict = spec, root, size, kind, strict
        if not root.is_dir():
            raise DataError(f"{spec}: folder {root} does not exist")
        train_dir = root / "train" / "good"
        if not train_dir.is_dir() and not strict:
            train_dir = root / "train"
        if not train_dir.is_dir():
            raise DataError(f"{spec}: expected good training images in {train_dir}")
        files = _images_in(train_dir)
        if not files:
            raise DataError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) in {train_dir}")
        first = read_image(files[0])
        self.channels, self.native_shape = first.shape[2], first.shape[:2]
        if kind == "texture":  # the shorter side to 512 (at most the image's), a multiple of S
            side = min(TEXTURE_SIDE, *self.native_shape)
            side = max(size, side - side % size)
            self.scale = side / min(self.native_shape)
            self.working_shape = (round(self.native_shape[0] * self.scale), round(self.native_shape[1] * self.scale))
        order = np.random.default_rng(seed).permutation(len(files))
        n_val = max(1, int(round(validation_fraction * len(files)))) if len(files) > 1 else 0
        self.validation_files = [files[i] for i in sorted(order[:n_val])]
        self.train_files = [files[i] for i in sorted(order[n_val:])]
        self._train_cache: list[np.ndarray] | None = None

    def _load(self, path: Path) -> np.ndarray:
        image = read_image(path, self.channels)
        if image.shape[:2] != self.native_shape:
            raise DataError(f"image {path} is {image.shape[1]}x{image.shape[0]}; expected "
                            f"{self.native_shape[1]}x{self.native_shape[0]} like the other images of {self.spec}")
        return self._working(image)

    def _working(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """Native image -> working resolution: textures by ``scale`` (512 on the shorter side,
        a multiple of S; tiled later), objects to S x S."""
        if self.kind == "texture":
            return resize(image, self.working_shape, nearest)
        return resize(image, self.size, nearest)

    def _train_images(self) -> list[np.ndarray]:
        if self._train_cache is None:
            self._train_cache = [self._load(p) for p in self.train_files]
        return self._train_cache

    def train_batch(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        images = self._train_images()
        if self.kind == "texture":
            return _random_crops(rng, images, batch, self.size)
        out = []
        s = self.size
        for _ in range(batch):
            img = images[int(rng.integers(len(images)))]
            angle = rng.uniform(-10, 10)
            tx, ty = rng.uniform(-0.05, 0.05, 2) * s
            m = cv2.getRotationMatrix2D((s / 2, s / 2), angle, 1.0)
            m[:, 2] += (tx, ty)
            warped = cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            out.append(warped.reshape(s, s, self.channels))
        return to_batch(out)

    def train_sample(self, count: int, seed: int = 0) -> np.ndarray:
        images = self._train_images()
        if self.kind == "texture":
            return _random_crops(np.random.default_rng(seed), images, count, self.size)
        return to_batch(images[:count])

    def validation(self) -> np.ndarray:
        if not self.validation_files:
            raise DataError(f"{self.spec}: at least 2 good training images are needed "
                            f"(one is held out for validation)")
        images = [self._load(p) for p in self.validation_files]
        if self.kind == "texture":
            tiles = [t for img in images for t in tile(img, self.size)]
            return to_batch(tiles)
        return to_batch(images)

    def _mask_for(self, defect: str, stem: str, shape: tuple[int, int]) -> np.ndarray | None:
        gt = self.root / "ground_truth" / defect
        for candidate in (gt / f"{stem}_mask.png", gt / f"{stem}.png"):
            if candidate.is_file():
                return read_mask(candidate, shape)
        if self.strict:
            raise DataError(f"{self.spec}: defective test image {defect}/{stem} has no mask; "
                            f"expected {gt / (stem + '_mask.png')}")
        return None

    def test(self) -> list[TestSample]:
        test_dir = self.root / "test"
        if not test_dir.is_dir():
            raise DataError(f"{self.spec}: expected test images in {test_dir}")
        samples = []
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for path in _images_in(defect_dir):
                image = read_image(path, self.channels)
                if image.shape[:2] != self.native_shape:
                    raise DataError(f"image {path} is {image.shape[1]}x{image.shape[0]}; expected "
                                    f"{self.native_shape[1]}x{self.native_shape[0]} like the training images")
                if defect == "good":
                    mask: np.ndarray | None = np.zeros(image.shape[:2], bool)
                else:
                    mask = self._mask_for(defect, path.stem, image.shape[:2])
                working = self._working(image)
                working_mask = None if mask is None else resize(mask, working.shape[:2], nearest=True)
                samples.append(TestSample(f"{defect}_{path.stem}", working, working_mask,
                                          0 if defect == "good" else 1, defect))
        if not samples:
            raise DataError(f"{self.spec}: the test set in {test_dir} is empty")
        return samples


def fit_of(spec: str, fit: str | None = None) -> str:
    """How images of a data spec meet the model size: "tile" (textures are cut into tiles
    of the model size) or "resize" (objects are resized to it).

    ``fit`` None: the spec's default (``textures:`` and the MVTec texture categories tile,
    the rest resize); "tile" or "resize": that fit, where the spec allows it
    (``textures:`` specs always tile)."""
    scheme, _, arg = spec.partition(":")
    default = "tile" if scheme == "textures" or (scheme == "mvtec" and Path(arg).name in MVTEC_TEXTURES) \
        else "resize"
    if fit is None:
        return default
    if fit not in TRAINING_FITS:
        raise DataError(f"fit must be one of {TRAINING_FITS}, got {fit!r}")
    if scheme == "textures" and fit != "tile":
        raise DataError(f"{spec}: a texture image is cut into crops, so its fit is tile; got fit {fit!r}")
    return fit


def recorded_fit(train: dict) -> str | None:
    """The fit a checkpoint's ``train`` record says the model was trained with (its
    ``input`` geometry, else the ``fit`` option); None for a record from before fits
    were recorded (the data's default applies)."""
    return (train.get("input") or {}).get("fit") or train.get("fit")


def load_source(spec: str, size: int = 128, fit: str | None = None, **kwargs) -> DataSource:
    """Parse a data spec (see the module docstring) into a DataSource at model size ``size``;
    ``fit`` (None: the spec's default, see ``fit_of``) "tile" makes a folder a texture source."""
    scheme, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise DataError(f"data spec must look like textures:NAME, mvtec:PATH/CATEGORY or folder:PATH; got {spec!r}")
    if scheme not in ("textures", "mvtec", "folder"):
        raise DataError(f"unknown data scheme {scheme!r} in {spec!r}; expected textures, mvtec or folder")
    kind = "texture" if fit_of(spec, fit) == "tile" else "object"
    if scheme == "textures":
        return texture_source(arg, size, **kwargs)
    return FolderSource(spec, Path(arg), size, kind, strict=scheme == "mvtec", **kwargs)
