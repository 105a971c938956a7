"""Puzzle-solving self-supervised training (Puzzle-AE, Salehi et al., §3.1) and its scores (§3.2).

Each training image is cut into a 2x2 grid of tiles (row-major: 0 top-left,
1 top-right, 2 bottom-left, 3 bottom-right). One tile, drawn at random, is
corrupted (set to black for grayscale images, converted to gray for colour
images), then the tiles are permuted by a permutation drawn from the K allowed
ones; the network must output the original image. The allowed set is:

- ``all``: the 23 permutations of the four tiles other than the identity (objects);
- ``swaps``: the 6 permutations that exchange exactly two tiles (textures, whose
  tiles look alike, so that the puzzle stays solvable).

The permutation and the corrupted tile are drawn per sample (the authors' code
draws one permutation per batch; per sample gives every batch the whole set).

Adversarially robust training (Eq. 1, FGSM as in Wong et al.): delta ~ U(-eps, eps)
on the puzzled input p, one step delta += alpha * sign(grad_delta L(U(p + delta), x)),
delta clipped to [-eps, eps], and the step trains on U(p + delta). L is the
training loss against the original x (Eq. 1 as printed measures the output against
the puzzled input p, which the network is trained away from; the attack here
ascends the loss the step descends, as Wong et al. do). alpha = 1.25 eps (Wong et
al.'s choice; the paper gives none). eps = 0 disables it.

Scores (Eqs. 5-7): for each of the K permutations P_i (no corruption, no FGSM),
S_i(x) = ||U(P_i(x)) - x||^2, divided by its mean on normal validation images;
the image score is the mean over i. ``permutation_errors`` gives the per-pixel
squared errors the pixel map averages.
"""

from __future__ import annotations

from itertools import permutations as _all_orders
from typing import Any

import numpy as np
import torch

from eproj.errors import ConfigError

PERMUTATION_SETS = ("all", "swaps")
FGSM_ALPHA = 1.25  # the FGSM step, in units of eps
TILES = 4
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, the gray of a colour tile


def permutation_set(kind: str) -> np.ndarray:
    """The allowed permutations, (K, 4) int: row k maps output tile t to input tile ``row[t]``.

    ``all``: K = 23, every order of the four tiles but the identity; ``swaps``: K = 6,
    the orders with exactly two tiles exchanged. Rows in lexicographic order.
    """
    if kind not in PERMUTATION_SETS:
        raise ConfigError(f"puzzle permutation set must be one of {PERMUTATION_SETS}, got {kind!r}")
    orders = [p for p in _all_orders(range(TILES)) if p != tuple(range(TILES))]
    if kind == "swaps":
        orders = [p for p in orders if sum(i != t for i, t in enumerate(p)) == 2]
    return np.array(orders, dtype=np.int64)


def permutation_kind(fit: str) -> str:
    """The set for data of training fit ``fit``: ``swaps`` for textures (tiled), ``all`` otherwise."""
    return "swaps" if fit == "tile" else "all"


def puzzle_record(kind: str, fgsm_eps: float) -> dict[str, Any]:
    """What a checkpoint stores about the puzzle regime."""
    return {"permutations": kind, "K": int(len(permutation_set(kind))), "draw": "per sample",
            "grid": "2x2", "corruption": "one tile: black (gray images) or gray (colour images)",
            "fgsm_eps": float(fgsm_eps), "fgsm_alpha": FGSM_ALPHA * float(fgsm_eps),
            "fgsm_target": "the original image (the training loss)"}


def _tile_slices(size: int, tile: int) -> tuple[slice, slice]:
    half = size // 2
    row, col = divmod(tile, 2)
    return slice(row * half, (row + 1) * half), slice(col * half, (col + 1) * half)


def permute_tiles(images: np.ndarray | torch.Tensor, order) -> np.ndarray | torch.Tensor:
    """Tiles of (N, C, S, S) rearranged: output tile t is input tile ``order[t]``. S must be even.

    ``order`` is one permutation (4,) for the whole batch, or (N, 4), one per sample.
    NumPy or torch in, the same type out; the input is left unchanged.
    """
    size = images.shape[-1]
    if size % 2 or images.shape[-2] != size:
        raise ValueError(f"puzzles need square images of even size, got {tuple(images.shape[-2:])}")
    order = np.asarray(order)
    orders = np.broadcast_to(order, (images.shape[0], TILES)) if order.ndim == 1 else order
    out = images.clone() if isinstance(images, torch.Tensor) else images.copy()
    for i, row in enumerate(orders):
        for t, source in enumerate(row):
            ys, xs = _tile_slices(size, t)
            ysrc, xsrc = _tile_slices(size, int(source))
            out[i, :, ys, xs] = images[i, :, ysrc, xsrc]  # type: ignore[assignment]  # same array type
    return out


def corrupt_tile(images: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """A copy of (N, C, S, S) float images with tile ``tiles[i]`` of sample i corrupted:
    set to 0 for C = 1, replaced by its gray (BT.601 luma, in every channel) for C = 3."""
    out = images.copy()
    size = images.shape[-1]
    for i, tile in enumerate(tiles):
        ys, xs = _tile_slices(size, int(tile))
        if images.shape[1] == 1:
            out[i, :, ys, xs] = 0.0
        else:
            gray = np.tensordot(LUMA, images[i, :, ys, xs], axes=(0, 0))
            out[i, :, ys, xs] = gray[None]
    return out


def make_puzzles(rng: np.random.Generator, images: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Puzzled training inputs of a batch.

    Args:
        images: (N, C, S, S) float32 in [0, 1], S even; left unchanged.
        kind: the permutation set (``permutation_set``).
    Returns:
        (puzzled (N, C, S, S) float32, the permutation of each sample (N, 4) int,
        the corrupted tile of each sample before permutation (N,) int).
    """
    allowed = permutation_set(kind)
    n = images.shape[0]
    orders = allowed[rng.integers(0, len(allowed), size=n)]
    tiles = np.asarray(rng.integers(0, TILES, size=n))
    puzzled = permute_tiles(corrupt_tile(images, tiles), orders)
    return np.ascontiguousarray(puzzled, dtype=np.float32), orders, tiles


def fgsm(model: torch.nn.Module, puzzled: torch.Tensor, target: torch.Tensor, eps: float,
         loss_fn) -> torch.Tensor:
    """The adversarial input p + delta of Eq. 1 (see the module docstring); ``puzzled`` itself for eps = 0.

    ``loss_fn(model, input, target)`` is the scalar training loss; its gradient w.r.t. delta
    only is taken (the weights' gradients are untouched). Returns a detached tensor.
    """
    if eps == 0:
        return puzzled
    delta = (torch.rand_like(puzzled) * 2 - 1) * eps
    delta.requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model, puzzled + delta, target)
        grad, = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + FGSM_ALPHA * eps * grad.sign()).clamp(-eps, eps)
    return (puzzled + delta).detach()


def puzzle_input(model: torch.nn.Module, clean: np.ndarray, rng: np.random.Generator, kind: str, eps: float,
                 kl_scale: float = 1.0) -> torch.Tensor:
    """The input of one puzzle step: the puzzles of ``clean`` (N, C, S, S) float32 in [0, 1]
    under FGSM (detached, (N, C, S, S)); the step's target is ``clean`` itself."""
    from eproj.train.losses import training_loss

    puzzled, _, _ = make_puzzles(rng, clean, kind)

    def loss_fn(m, inputs, target):
        return training_loss(m, inputs, kl_scale, target=target)[0]

    return fgsm(model, torch.from_numpy(puzzled), torch.from_numpy(clean), eps, loss_fn)


def puzzle_loss(model: torch.nn.Module, clean: np.ndarray, rng: np.random.Generator, kind: str, eps: float,
                kl_scale: float = 1.0):
    """The training loss of one puzzle step: (scalar loss, values to log).

    ``clean``: the batch (N, C, S, S) float32 in [0, 1]; the target is ``clean`` itself.
    """
    from eproj.train.losses import training_loss

    adversarial = puzzle_input(model, clean, rng, kind, eps, kl_scale)
    return training_loss(model, adversarial, kl_scale, target=torch.from_numpy(clean))


def permutation_errors(model: torch.nn.Module, images: torch.Tensor, kind: str) -> torch.Tensor:
    """Squared errors of the restorations of every allowed puzzle of each image (Eq. 5, per pixel).

    Args:
        images: (N, C, S, S) float in [0, 1], S even.
    Returns:
        (K, N, C, S, S): (U(P_k(x)) - x)^2, for the K permutations of ``permutation_set(kind)``.
    """
    out = []
    with torch.no_grad():
        for order in permutation_set(kind):
            out.append((model(permute_tiles(images, order)) - images) ** 2)
    return torch.stack(out)


def permutation_scores(errors: torch.Tensor, normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """Per-permutation scores S_i (Eq. 5, squared L2) from ``permutation_errors``' output: (K, N).

    With ``normaliser`` (K,), each S_i is divided by it: the mean of S_i on normal validation
    images (Eq. 6). The image score of Eq. 7 (mean) is ``permutation_scores(...).mean(0)``.
    """
    scores = errors.flatten(2).sum(dim=2)
    if normaliser is None:
        return scores
    if normaliser.shape != (errors.shape[0],) or not bool((normaliser > 0).all()):
        raise ValueError(f"the normaliser must hold one positive mean per permutation, shape "
                         f"({errors.shape[0]},); got shape {tuple(normaliser.shape)}")
    return scores / normaliser[:, None]


def permutation_normaliser(model: torch.nn.Module, validation: np.ndarray, kind: str,
                           batch: int = 16) -> torch.Tensor:
    """The mean of each permutation's score S_i on normal validation images (the denominator of Eq. 6).

    Args:
        validation: (M, C, S, S) float32 in [0, 1], normal images held out of training.
    Returns:
        (K,) float64, positive (a score of exactly 0 on every image is refused: nothing to divide by).
    """
    if len(validation) == 0:
        raise ValueError("the permutation normaliser needs at least one validation image")
    totals = torch.zeros(len(permutation_set(kind)), dtype=torch.float64)
    for start in range(0, len(validation), batch):
        x = torch.from_numpy(np.ascontiguousarray(validation[start:start + batch]))
        totals += permutation_scores(permutation_errors(model, x, kind)).double().sum(dim=1)
    mean = totals / len(validation)
    if not bool((mean > 0).all()):
        raise ValueError(f"a permutation's mean validation score is not positive: {mean.tolist()}")
    return mean


def permutation_maps(model: torch.nn.Module, images: torch.Tensor, kind: str,
                     normaliser: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The puzzle score of Eq. 7 (the mean over permutations of the normalised Eq. 6 scores) and
    its pixel map (the mean over permutations of the normalised squared errors, channel-averaged).

    Args:
        images: (N, C, S, S) float in [0, 1]; normaliser: (K,) from ``permutation_normaliser``.
    Returns:
        (scores (N,), maps (N, S, S)); the sum of a map times C equals its score.
    """
    errors = permutation_errors(model, images, kind)
    weights = (1.0 / normaliser.to(errors.dtype))[:, None, None, None, None]
    scores = permutation_scores(errors, normaliser.to(errors.dtype)).mean(dim=0)
    maps = (errors * weights).mean(dim=0).mean(dim=1)
    return scores, maps


def permutation_calibration(model: torch.nn.Module, normal: np.ndarray, fit: str, quantile: float,
                            batch: int = 16) -> dict[str, Any]:
    """What ``model.pt`` (and the bundle) carry for the permutation scores of the unet family.

    Args:
        normal: (M, C, S, S) float32 in [0, 1], normal validation images (never test images).
        fit: the training fit, which picks the permutation set (``permutation_kind``).
        quantile: of the normal images' scores and map pixels, for the thresholds.
    Returns:
        ``kind``, ``orders`` (K lists of 4 ints, ``permute_tiles``' convention), ``normaliser`` (K means
        of S_i on ``normal``, Eq. 6), ``score_threshold`` and ``map_threshold`` (the ``quantile`` of the
        puzzle scores and of the permutation maps' pixels on ``normal``), ``validation_images``.
    """
    kind = permutation_kind(fit)
    normaliser = permutation_normaliser(model, normal, kind, batch)
    scores, maps = [], []
    for start in range(0, len(normal), batch):
        s, m = permutation_maps(model, torch.from_numpy(np.ascontiguousarray(normal[start:start + batch])), kind,
                                normaliser)
        scores.append(s.numpy())
        maps.append(m.numpy())
    return {"kind": kind, "orders": permutation_set(kind).tolist(), "normaliser": normaliser.tolist(),
            "score_threshold": float(np.quantile(np.concatenate(scores), quantile)),
            "map_threshold": float(np.quantile(np.concatenate(maps), quantile)),
            "quantile": float(quantile), "validation_images": int(len(normal))}
