"""The stop-check kernel against the reference eproj.train.projection.stop_check:
decisions, reasons and recorded values equal, over a run of checks in which
samples stop by threshold, by convergence and not at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eproj.cpp_ext as kernels
from eproj.config import ProjectionConfig
from eproj.errors import ArrayError
from eproj.train.projection import StopState, stop_check


@pytest.mark.parametrize("threshold,tol", [(None, 0.0), (2.0, 0.0), (None, 0.05), (2.0, 0.05)])
def test_stop_check_matches_the_reference(arrays, threshold, tol):
    n = 9
    config = ProjectionConfig(stop_threshold=threshold, energy_tol=tol, lam=0.05)
    rng = np.random.default_rng(5)
    state = StopState.start(n)
    dev = {"active": arrays.put(np.ones(n, np.uint8)), "previous": arrays.put(np.full(n, np.inf, np.float32)),
           "reason": arrays.put(np.zeros(n, np.int32)), "final_loss": arrays.put(np.zeros(n, np.float32)),
           "final_energy": arrays.put(np.zeros(n, np.float32))}
    iterations = np.zeros(n, np.int32)
    loss = (5 + rng.random(n) * 3).astype(np.float32)
    for _ in range(8):
        # losses fall at different rates: some cross the threshold, some flatten out
        loss = (loss * (0.6 + 0.4 * np.linspace(0, 1, n)) + rng.random(n) * 0.01).astype(np.float32)
        distance = (rng.random(n) * 40).astype(np.float32)
        ref = stop_check(torch.from_numpy(loss), torch.from_numpy(distance), torch.from_numpy(iterations).long(),
                         state, config)
        kernels.stop_check(arrays.put(loss), arrays.put(distance), arrays.put(iterations), dev["active"],
                           dev["previous"], dev["reason"], dev["final_loss"], dev["final_energy"], config=config)
        np.testing.assert_array_equal(arrays.get(dev["active"]).astype(bool), ref.active.numpy())
        np.testing.assert_array_equal(arrays.get(dev["reason"]), ref.reason.numpy())
        for name in ("previous", "final_loss", "final_energy"):
            np.testing.assert_allclose(arrays.get(dev[name]), getattr(ref, name).numpy(), rtol=1e-6)
        iterations = iterations + ref.active.numpy().astype(np.int32)  # what the update would count
        state = ref
    if threshold is not None or tol > 0:
        assert 0 < int(ref.active.sum()) < n  # the sequence exercised both outcomes


def test_stop_check_checks_its_arrays():
    a = np.zeros(4, np.float32)
    good = dict(loss=a, distance=a, iterations=np.zeros(4, np.int32), active=np.ones(4, np.uint8),
                previous=a.copy(), reason=np.zeros(4, np.int32), final_loss=a.copy(), final_energy=a.copy())
    with pytest.raises(ArrayError, match=r"reason: expected dtype int32, got int64"):
        kernels.stop_check(**{**good, "reason": np.zeros(4, np.int64)})
    with pytest.raises(ArrayError, match=r"distance: expected shape \(4,\), got \(3,\)"):
        kernels.stop_check(**{**good, "distance": a[:3]})
