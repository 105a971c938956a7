"""ProjectionConfig: every parameter is checked for type, finiteness and range where it enters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eproj.config import MAX_ITERS_LIMIT, ProjectionConfig
from eproj.errors import ConfigError

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("changes,message", [
    (dict(lam=NAN), "lam must be a finite number, got nan"),
    (dict(lam=INF), "lam must be a finite number, got inf"),
    (dict(alpha=INF), "alpha must be a finite number, got inf"),
    (dict(alpha=NAN), "alpha must be a finite number, got nan"),
    (dict(alpha=-INF), "alpha must be a finite number, got -inf"),
    (dict(step="adam", adam_eps=0.0, adam_beta2=1.0), r"adam_beta2 must lie in \[0, 1\), got 1.0"),
    (dict(step="adam", adam_eps=0.0), "adam_eps must be > 0, got 0.0"),
    (dict(adam_eps=NAN), "adam_eps must be a finite number"),
    (dict(adam_beta1=-0.1), r"adam_beta1 must lie in \[0, 1\), got -0.1"),
    (dict(energy_tol=NAN), "energy_tol must be a finite number"),
    (dict(energy_tol=-1e-3), "energy_tol must be >= 0"),
    (dict(stop_threshold=NAN), "stop_threshold must be a finite number or -inf, got nan"),
    (dict(stop_threshold=INF), "stop_threshold must be a finite number or -inf, got inf"),
    (dict(value_max=INF), "value_max must be a finite number, got inf"),
    (dict(value_min=1.0, value_max=0.0), r"min < max, got \[1.0, 0.0\]"),
    (dict(max_iters=10 ** 12), rf"max_iters must lie in \[0, {MAX_ITERS_LIMIT}\], got 1000000000000"),
    (dict(max_iters=-1), r"max_iters must lie in \[0, 100000\], got -1"),
    (dict(max_iters=2.5), r"max_iters must be an integer, got 2.5 \(float\)"),
    (dict(max_iters=100.0), r"max_iters must be an integer, got 100.0 \(float\)"),
    (dict(max_iters=True), r"max_iters must be an integer, got True \(bool\)"),
    (dict(max_iters="100"), r"max_iters must be an integer, got '100' \(str\)"),
    (dict(alpha="0.5"), r"alpha must be a number, got '0.5' \(str\)"),
    (dict(alpha=True), r"alpha must be a number, got True \(bool\)"),
    (dict(lam=None), r"lam must be a number, got None \(NoneType\)"),
    (dict(alpha=np.array([0.5])), r"alpha must be a number, got array"),
    (dict(step="ADAM"), r"step must be one of \('plain', 'adam'\), got 'ADAM'"),
    (dict(weighting=1), r"weighting must be one of .*, got 1 \(int\)"),
])
def test_bad_parameters_are_refused_with_their_name(changes, message):
    with pytest.raises(ConfigError, match=message):
        ProjectionConfig(**changes)


def test_numbers_are_normalised_and_never_infinite_but_the_open_stop_threshold():
    config = ProjectionConfig(alpha=np.float32(0.25), lam=np.float64(0.1), max_iters=np.int64(7), adam_eps=1,
                              stop_threshold=-INF)
    assert type(config.alpha) is float and config.alpha == 0.25 and type(config.adam_eps) is float
    assert type(config.max_iters) is int and config.max_iters == 7
    assert config.stop_threshold == -INF  # never reached: the same as None
    assert ProjectionConfig(max_iters=MAX_ITERS_LIMIT).max_iters == MAX_ITERS_LIMIT
    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        config.with_(alpha=NAN)
