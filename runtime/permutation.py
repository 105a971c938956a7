"""Puzzle-AE's permutation scores on the runtime (the unet family).

For each of the K permutations P_k of a tile's 2x2 grid recorded in the bundle
(``manifest["permutation"]``, from the model's calibration), the U-Net restores
P_k(x); the per-permutation score S_k = ||U(P_k(x)) - x||^2 is divided by its mean
on normal validation images (Eq. 6), and

- the puzzle score (Eq. 7) is the mean over k of the normalised S_k, (N,);
- the permutation map is the mean over k of the normalised squared errors,
  averaged over channels, (N, S, S); its sum times C is the score.

The K permuted copies of a batch of N tiles go through the network as one batch of
K * N (``max_batch`` splits it for engines built for smaller batches). The
reference is ``eproj.train.puzzle.permutation_maps``; the tests hold this module to
it. The backends run the bundle's step graph (a unet bundle has no other graph) and
its reconstruction output is used; the gradient it also computes is discarded.

NumPy only at import; the backend loads what it needs when built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eproj.bundle import BundleError
from eproj.errors import ArrayError, ConfigError
from eproj.runtime.bundle import Bundle

TILES = 4


def permuted_copies(x0: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """The K permuted copies of (N, C, S, S) tiles, (K * N, C, S, S), copy k of tile i at row k * N + i:
    its output tile t (row-major 2x2: 0 top-left, 3 bottom-right) is input tile ``orders[k, t]``."""
    n, c, s, _ = x0.shape
    h = s // 2
    grid = x0.reshape(n, c, 2, h, 2, h).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, TILES, h, h)
    moved = grid[:, :, orders]  # (N, C, K, 4, h, h)
    moved = moved.reshape(n, c, len(orders), 2, 2, h, h).transpose(2, 0, 1, 3, 5, 4, 6)
    return np.ascontiguousarray(moved.reshape(len(orders) * n, c, s, s))


@dataclass
class PermutationResult:
    """``scores`` (N,) the puzzle scores; ``maps`` (N, S, S) the permutation maps;
    ``per_permutation`` (K, N) the normalised S_k; float32."""

    scores: np.ndarray
    maps: np.ndarray
    per_permutation: np.ndarray


def _calibration(bundle: Bundle) -> tuple[np.ndarray, np.ndarray, str]:
    """The bundle's permutation orders (K, 4) int64, normalisers (K,) float64 and set name."""
    where = f"{bundle.folder}/manifest.json"
    if bundle.family != "unet":
        raise ConfigError(f"permutation scores are the unet family's; {bundle.folder} holds a {bundle.family} model")
    entry = bundle.manifest.get("permutation")
    if not isinstance(entry, dict):
        raise BundleError(f"{where} has no permutation entry: export the bundle again from a model.pt calibrated "
                          f"by this eproj (eproj calibrate, then eproj export)")
    try:
        orders = np.array(entry["orders"], dtype=np.int64)
        normaliser = np.array(entry["normaliser"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{where}: permutation needs orders (K lists of 4 ints) and normaliser (K numbers); "
                          f"{type(error).__name__}: {error}") from None
    if orders.ndim != 2 or orders.shape[1] != TILES or len(orders) == 0 \
            or any(sorted(o) != list(range(TILES)) for o in orders.tolist()):
        raise BundleError(f"{where}: permutation orders must be K >= 1 permutations of 0..3, got {entry['orders']!r}")
    if normaliser.shape != (len(orders),) or not all(math.isfinite(v) and v > 0 for v in normaliser):
        raise BundleError(f"{where}: permutation normaliser must hold {len(orders)} positive finite numbers "
                          f"(one per order), got {entry['normaliser']!r}")
    return orders, normaliser, str(entry.get("kind", "?"))


class PermutationScorer:
    """Puzzle scores and permutation maps of (N, C, S, S) float32 tiles for one unet bundle.

    Example::

        scorer = PermutationScorer("bundles/grass-unet", backend="onnxruntime")
        result = scorer(tiles)            # tiles: (N, 1, 128, 128) float32 in [0, 1]
        result.scores, result.maps        # (N,), (N, 128, 128)
    """

    def __init__(self, bundle: str | Path | Bundle, backend: str = "auto", device: str | None = None,
                 max_batch: int | None = None, **options: Any) -> None:
        from eproj.runtime.backends import create_backend

        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.orders, self.normaliser, self.kind = _calibration(self.bundle)
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1 (or None: no limit), got {max_batch}")
        self.max_batch = max_batch
        self.backend, self.backend_note = create_backend(self.bundle, backend, device, **options)

    @property
    def K(self) -> int:  # noqa: N802  # the paper's name
        return len(self.orders)

    def close(self) -> None:
        """Release the backend. Idempotent."""
        self.backend.close()

    def _restore(self, copies: np.ndarray) -> np.ndarray:
        """U(copies) through the step graph: (M, C, S, S) -> (M, C, S, S) float32."""
        b = self.backend
        x = b.empty(copies.shape, "float32")
        reconstruction = b.empty(copies.shape, "float32")
        loss = b.empty((copies.shape[0],), "float32")
        grad = b.empty(copies.shape, "float32")
        b.upload(x, copies)
        b.prepare_step(x, reconstruction, loss, grad)()
        return b.download(reconstruction)

    def __call__(self, x0: np.ndarray) -> PermutationResult:
        """Scores and maps of (N, C, S, S) float32 tiles in [0, 1], C and S the bundle's."""
        c, s = self.bundle.channels, self.bundle.size
        if not isinstance(x0, np.ndarray) or x0.dtype != np.float32 or x0.ndim != 4 or x0.shape[1:] != (c, s, s):
            got = (f"{type(x0).__name__} {getattr(x0, 'dtype', '')} {tuple(getattr(x0, 'shape', ()))}")
            raise ArrayError(f"permutation scores need float32 tiles of shape (N, {c}, {s}, {s}); got {got}")
        n, k = len(x0), self.K
        if n == 0:
            return PermutationResult(np.zeros(0, np.float32), np.zeros((0, s, s), np.float32), np.zeros((k, 0), np.float32))
        per_pass = n if self.max_batch is None else max(1, self.max_batch // k)
        sums, maps = [], []
        for start in range(0, n, per_pass):
            part = np.ascontiguousarray(x0[start:start + per_pass])
            restored = self._restore(permuted_copies(part, self.orders)).reshape((k,) + part.shape)
            errors = (restored - part[None]) ** 2  # (K, n, C, S, S)
            weights = (1.0 / self.normaliser).astype(np.float32)
            sums.append(errors.reshape(k, len(part), -1).sum(axis=2, dtype=np.float64) / self.normaliser[:, None])
            maps.append(np.einsum("k,knchw->nhw", weights, errors) / (k * c))
        per_permutation = np.concatenate(sums, axis=1)
        return PermutationResult(per_permutation.mean(axis=0).astype(np.float32),
                                 np.concatenate(maps).astype(np.float32), per_permutation.astype(np.float32))
