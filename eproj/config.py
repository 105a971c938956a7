"""The projection's parameters, shared by the reference (eproj.train), the
kernels (eproj.cpp_ext) and the runtime; standard library only, so the edge
install reads them without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from eproj.errors import ConfigError

WEIGHTINGS = ("hadamard", "mask", "none")
STEPS = ("plain", "adam")
STOP_REASONS = ("threshold", "converged", "max_iters")
# the stop reason of each code the stop check writes (0: still running, or stopped at the cap)
STOP_REASON_CODES = ("max_iters", "threshold", "converged")


@dataclass(frozen=True)
class ProjectionConfig:
    """Parameters of the projection; the defaults are the paper's.

    ``energy_tol``: a sample stops when |E_prev - E| <= energy_tol * |E_prev|
    (0 disables). ``stop_threshold``: a sample stops when Lr <= it (None disables).
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
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.step not in STEPS:
            raise ConfigError(f"step must be one of {STEPS}, got {self.step!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.lam < 0:
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")
        if self.max_iters < 0:
            raise ConfigError(f"max_iters must be >= 0, got {self.max_iters}")
        if self.energy_tol < 0:
            raise ConfigError(f"energy_tol must be >= 0, got {self.energy_tol}")
        if not self.value_min < self.value_max:
            raise ConfigError(f"value range must satisfy min < max, got [{self.value_min}, {self.value_max}]")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "ProjectionConfig":
        return replace(self, **changes)
