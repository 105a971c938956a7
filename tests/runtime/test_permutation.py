"""Puzzle-AE's permutation scores on the runtime (eproj.runtime.permutation) against the
torch reference (eproj.train.puzzle.permutation_maps)."""

import numpy as np
import pytest
import torch

from conftest import make_mvtec
from eproj.bundle import BundleError
from eproj.errors import ArrayError, ConfigError
from eproj.runtime.permutation import PermutationScorer, permuted_copies
from eproj.train.puzzle import permutation_maps, permutation_set, permute_tiles


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory):
    from eproj.export.onnx_graphs import export_bundle
    from eproj.train.checkpoint import load_model
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("unet")
    folder = make_mvtec(root / "mvtec" / "nut", size=32, n_train=4)
    path = train(root / "run", ModelConfig(family="unet", size=32, width=4),
                 TrainConfig(data=f"mvtec:{folder}", steps=2, batch=2, lr=1e-3, regime="puzzle"), progress=False)
    export_bundle(path, root / "bundle")
    return load_model(path), root / "bundle"


def test_permuted_copies_are_the_references_puzzles():
    x = np.random.default_rng(0).random((3, 2, 8, 8)).astype(np.float32)
    orders = permutation_set("all")
    copies = permuted_copies(x, orders)
    assert copies.shape == (23 * 3, 2, 8, 8)
    for k, order in enumerate(orders):
        np.testing.assert_array_equal(copies[k * 3:(k + 1) * 3], permute_tiles(x, order))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_scores_and_maps_match_the_reference(unet_bundle, backend):
    trained, folder = unet_bundle
    entry = trained.calibration["permutation"]
    x = np.random.default_rng(1).random((5, 1, 32, 32)).astype(np.float32)
    scorer = PermutationScorer(folder, backend=backend, device="cpu", max_batch=2 * len(entry["orders"]))
    try:
        got = scorer(x)
    finally:
        scorer.close()
    scores, maps = permutation_maps(trained.model.float().eval(), torch.from_numpy(x), entry["kind"],
                                    torch.tensor(entry["normaliser"], dtype=torch.float64))
    assert scorer.K == 23 and got.per_permutation.shape == (23, 5)
    for ours, ref in ((got.scores, scores.numpy()), (got.maps, maps.numpy())):
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4
    np.testing.assert_allclose(got.per_permutation.mean(axis=0), got.scores, rtol=1e-6)


def test_inputs_and_bundles_are_checked(unet_bundle):
    from eproj.runtime.bundle import Bundle

    _, folder = unet_bundle
    scorer = PermutationScorer(folder, backend="onnxruntime")
    try:
        with pytest.raises(ArrayError, match=r"float32 tiles of shape \(N, 1, 32, 32\); got ndarray float64"):
            scorer(np.zeros((1, 1, 32, 32)))
        empty = scorer(np.zeros((0, 1, 32, 32), np.float32))
        assert empty.scores.shape == (0,) and empty.maps.shape == (0, 32, 32)
    finally:
        scorer.close()
    manifest = Bundle.load(folder).manifest
    with pytest.raises(ConfigError, match="unet family's; .* holds a l2ae model"):
        PermutationScorer(Bundle(folder, {**manifest, "family": "l2ae"}))
    with pytest.raises(BundleError, match="23 positive finite numbers"):
        entry = {**manifest["permutation"], "normaliser": [-1.0] + manifest["permutation"]["normaliser"][1:]}
        PermutationScorer(Bundle(folder, {**manifest, "permutation": entry}))
    with pytest.raises(BundleError, match="permutations of 0..3"):
        entry = {**manifest["permutation"], "orders": [[0, 0, 1, 2]] * 23}
        PermutationScorer(Bundle(folder, {**manifest, "permutation": entry}))
    with pytest.raises(BundleError, match="no permutation entry"):
        PermutationScorer(Bundle(folder, {k: v for k, v in manifest.items() if k != "permutation"}))
