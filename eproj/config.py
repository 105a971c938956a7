"""The projection's parameters, shared by the reference (eproj.train), the
kernels (eproj.cpp_ext) and the runtime; standard library only, so the edge
install reads them without torch.

Every parameter is checked where it enters (``ProjectionConfig.__post_init__``):
its type (a bool is not a number, ``max_iters`` is an integer), that it is finite,
and its range. A NaN or infinite parameter would otherwise pass into the kernels
and come out as a map of NaN, which no threshold flags.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any

from eproj.errors import ConfigError

WEIGHTINGS = ("hadamard", "mask", "none")
STEPS = ("plain", "adam")
STOP_REASONS = ("threshold", "converged", "max_iters")
# the stop reason of each code the stop check writes (0: still running, or stopped at the cap)
STOP_REASON_CODES = ("max_iters", "threshold", "converged")
# the iteration cap's bound: the paper's projections converge in about 100 steps, and a cap
# of 10**12 would keep an inspection line busy for days
MAX_ITERS_LIMIT = 100_000


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def real_number(name: str, value: Any, *, allow_neg_inf: bool = False) -> float:
    """``value`` as a Python float; ConfigError unless it is a finite real number (not a bool).

    ``allow_neg_inf``: -inf is accepted too (a threshold that is never reached).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {_describe(value)}")
    number = float(value)
    if math.isfinite(number) or (allow_neg_inf and number == -math.inf):
        return number
    allowed = "a finite number or -inf" if allow_neg_inf else "a finite number"
    raise ConfigError(f"{name} must be {allowed}, got {number}")


def integer(name: str, value: Any) -> int:
    """``value`` as a Python int; ConfigError unless it is an integer (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {_describe(value)}")
    return int(value)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {_describe(value)}")
    return value


@dataclass(frozen=True)
class ProjectionConfig:
    """Parameters of the projection; the defaults are the paper's.

    - ``alpha``: step size, finite and > 0; ``lam``: the weight of ||x - x0||_1, finite and >= 0;
    - ``weighting``: "hadamard", "mask" or "none"; ``step``: "plain" or "adam";
    - ``max_iters``: an integer in [0, MAX_ITERS_LIMIT];
    - ``energy_tol``: a sample stops when |E_prev - E| <= energy_tol * |E_prev| (0 disables), finite, >= 0;
    - ``stop_threshold``: a sample stops when Lr <= it; None or -inf disable it (+inf and NaN are refused:
      every sample would stop before its first step, or never compare);
    - ``adam_beta1``, ``adam_beta2`` in [0, 1); ``adam_eps`` finite and > 0;
    - ``value_min`` < ``value_max``, both finite: the range the iterate is clamped to.

    Numbers are stored as Python floats (ints for ``max_iters``); any bad value is a ConfigError
    that names the parameter, what it must be and what came.
    """

    alpha: float = 0.5
    lam: float = 0.05
    weighting: str = "hadamard"
    step: str = "plain"
    max_iters: int = 100
    energy_tol: float = 0.0
    stop_threshold: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    value_min: float = 0.0
    value_max: float = 1.0

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        choice("weighting", self.weighting, WEIGHTINGS)
        choice("step", self.step, STEPS)
        for name in ("alpha", "lam", "energy_tol", "adam_beta1", "adam_beta2", "adam_eps", "value_min",
                     "value_max"):
            store(name, real_number(name, getattr(self, name)))
        if self.stop_threshold is not None:
            store("stop_threshold", real_number("stop_threshold", self.stop_threshold, allow_neg_inf=True))
        store("max_iters", integer("max_iters", self.max_iters))
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.lam < 0:
            raise ConfigError(f"lam (lambda) must be >= 0, got {self.lam}")
        if not 0 <= self.max_iters <= MAX_ITERS_LIMIT:
            raise ConfigError(f"max_iters must lie in [0, {MAX_ITERS_LIMIT}], got {self.max_iters}")
        if self.energy_tol < 0:
            raise ConfigError(f"energy_tol must be >= 0, got {self.energy_tol}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps must be > 0, got {self.adam_eps}")
        if not self.value_min < self.value_max:
            raise ConfigError(f"value range must satisfy min < max, got [{self.value_min}, {self.value_max}]")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "ProjectionConfig":
        return replace(self, **changes)
