"""One projection step as an ordinary inference graph: x -> f(x), Lr(x), grad_x Lr(x).

No exporter can export autograd, so the input gradient is written out layer by
layer with forward operators only:

- a convolution's input gradient is a transposed convolution with the same
  weights (and a transposed convolution's is a convolution). A stride-1
  transposed convolution is written as the equivalent convolution (kernel
  flipped, channel axes swapped), which ONNX Runtime's CPU provider runs 1.5 to
  2.6 times as fast;
- LeakyReLU's and the sigmoid's are elementwise factors of their outputs;
- the DSAE's DSSIM loss is differentiated through its Gaussian moments. The
  Gaussian filter with symmetric borders is linear along each axis, so it is
  written as two banded matrices, filter(X) = A_h X A_w^T, whose adjoint is
  A_h^T G A_w: matrix products only;
- the gamma-VAE's Lr scales the squared residual by 1/(2 gamma^2), applied after the
  network's backward pass so that a small gamma cannot overflow a float16 graph;
- the U-Net (``unet``): ReLU's is the factor (output > 0), 1 or 0 exactly (autograd's
  derivative at 0 is 0 too); a concatenation's is a split. Bilinear x2 upsampling
  with align_corners=True is linear along each axis: up(X) = B X B^T with a fixed
  (2n, n) matrix B (``upsampling_matrix``), so the step computes it so and its
  adjoint is B^T G B: matrix products only (no Resize operator). 2x2 max-pooling is
  the elementwise Max of the four strided slices a, b, c, d of each window (top-left,
  top-right, bottom-left, bottom-right); its adjoint routes each window's gradient
  to one element that equals the max, chosen as autograd chooses it: the first in
  that order (PyTorch's CPU kernel keeps the first maximum, a later equal value does
  not replace it). Equality is 1 - (v < max), exact since v <= max; the routed
  slices are interleaved back by Unsqueeze/Concat/Reshape (no MaxPool indices).

For the variational families the KL term and its input gradient are extra
outputs. ``StepModule`` is checked against autograd on the reference
definitions (``eproj.train.losses``) in ``tests/export/test_step.py``.

``StepModule(model, gradient=False)`` is the forward graph: the same code up to
Lr, x -> f(x), Lr(x), without the gradient half (about a third of the step's
work). The runtime runs it where no step follows: the zero-iteration gate's
first pass and the reconstruction baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eproj.train.losses import SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW, gaussian_taps
from eproj.train.models import UNET_LEVELS, Autoencoder, Model, UNet


def gaussian_matrix(n: int, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(n, n) float64 matrix A with (A v)_i = the Gaussian filter of v at i, symmetric borders.

    Symmetric ("half-sample") borders mirror including the edge sample:
    index -1 reads 0, -2 reads 1, n reads n - 1.
    """
    taps = gaussian_taps(window, sigma)
    r = window // 2
    if n < r:
        raise ValueError(f"an axis of length {n} is shorter than the window radius {r}")
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for t in range(window):
            j = i + t - r
            if j < 0:
                j = -j - 1
            elif j >= n:
                j = 2 * n - j - 1
            a[i, j] += taps[t]
    return a


def upsampling_matrix(n: int) -> torch.Tensor:
    """(2n, n) float64 matrix B of bilinear x2 upsampling with align_corners=True along one axis.

    Output sample i reads the input at s = i (n - 1) / (2n - 1): (1 - t) v[floor s] + t v[floor s + 1],
    t = s - floor s; for n = 1 every output is the one input. For (N, C, n, n) X,
    ``F.interpolate(X, scale_factor=2, mode="bilinear", align_corners=True) = B X B^T``.
    """
    if n < 1:
        raise ValueError(f"an axis must have at least one sample, got {n}")
    b = torch.zeros(2 * n, n, dtype=torch.float64)
    for i in range(2 * n):
        s = i * (n - 1) / (2 * n - 1)
        lo = min(int(s), n - 1)
        t = s - lo
        b[i, lo] += 1.0 - t
        if t > 0:
            b[i, lo + 1] += t
    return b


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling of (N, C, 2h, 2w) as the elementwise max of the windows' four slices."""
    a, b, c, d = _window_slices(x)
    return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def _window_slices(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The top-left, top-right, bottom-left and bottom-right elements of every 2x2 window."""
    return x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]


def max_pool_adjoint(x: torch.Tensor, pooled: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient at the input x (N, C, 2h, 2w) of 2x2 max-pooling from the gradient at its output
    ``pooled`` (N, C, h, w): each window's gradient goes to its first element (top-left, top-right,
    bottom-left, bottom-right) equal to the max, as autograd routes it; the others get 0."""
    taken = torch.zeros_like(pooled)
    routed = []
    for value in _window_slices(x)[:3]:
        share = (1.0 - taken) * (1.0 - (value < pooled).to(grad.dtype))
        routed.append(grad * share)
        taken = taken + share
    routed.append(grad * (1.0 - taken))  # no earlier element was the max: the last one is
    n_c, h, w = grad.shape[1], grad.shape[2], grad.shape[3]
    top = torch.stack(routed[:2], dim=-1).reshape(-1, n_c, h, 2 * w)
    bottom = torch.stack(routed[2:], dim=-1).reshape(-1, n_c, h, 2 * w)
    return torch.stack([top, bottom], dim=-2).reshape(-1, n_c, 2 * h, 2 * w)


def transposed_conv(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                    output_padding: tuple[int, int] = (0, 0), bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv_transpose2d``; at stride 1 as the convolution it equals."""
    k = weight.shape[-1]
    if tuple(stride) == (1, 1) and tuple(output_padding) == (0, 0) and weight.shape[-2] == k \
            and padding[0] == padding[1] and padding[0] <= k - 1:
        return F.conv2d(x, weight.flip(-1, -2).transpose(0, 1), bias, padding=k - 1 - padding[0])
    return F.conv_transpose2d(x, weight, bias, stride=stride, padding=padding, output_padding=output_padding)


def _layer_input_grad(layer: nn.Module, grad_out: torch.Tensor, output: torch.Tensor,
                      input_shape: torch.Size) -> torch.Tensor:
    """Gradient at a layer's input from the gradient at its output (forward ops only)."""
    if isinstance(layer, nn.LeakyReLU):
        # the derivative is 1 where the output is positive and the slope elsewhere,
        # written as arithmetic (ONNX Runtime's CPU Where was half of the whole step at
        # batch 16)
        slope = layer.negative_slope
        if output.dtype in (torch.float32, torch.float64):
            # two operators: a positive normal float times the type's largest float is
            # >= 1 (or inf), zero and negatives stay <= 0, so the clip gives exactly 1 or
            # the slope; only denormal outputs (under 3e-39 in float32) would get the
            # slope. ONNX Runtime's CPU profile showed the elementwise share of the step
            # about halved against the five-operator form below.
            return grad_out * torch.clamp(output * torch.finfo(output.dtype).max, min=slope, max=1.0)
        # float16: its subnormals span too wide a range for the clip; exact for every value
        positive = (output > 0).to(grad_out.dtype)
        return grad_out * (positive + slope * (1.0 - positive))
    if isinstance(layer, nn.ReLU):
        return grad_out * (output > 0).to(grad_out.dtype)
    if isinstance(layer, nn.Sigmoid):
        return grad_out * output * (1.0 - output)
    if isinstance(layer, nn.Conv2d):
        s, p, k = layer.stride[0], layer.padding[0], layer.kernel_size[0]
        out_h, out_w = grad_out.shape[-2:]
        in_h, in_w = input_shape[-2:]
        extra = (in_h - ((out_h - 1) * s - 2 * p + k), in_w - ((out_w - 1) * s - 2 * p + k))
        return transposed_conv(grad_out, layer.weight, layer.stride, layer.padding, extra)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv2d(grad_out, layer.weight, stride=layer.stride, padding=layer.padding)
    raise TypeError(f"no analytic input gradient for layer {type(layer).__name__}")


def _run(layers: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every layer, with the input first."""
    values = [x]
    for layer in layers:
        if isinstance(layer, nn.ConvTranspose2d):
            values.append(transposed_conv(values[-1], layer.weight, layer.stride, layer.padding,
                                          layer.output_padding, layer.bias))
        else:
            values.append(layer(values[-1]))
    return values


def _backward(layers: nn.Sequential, values: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    for i in range(len(layers) - 1, -1, -1):
        grad = _layer_input_grad(layers[i], grad, values[i + 1], values[i].shape)
    return grad


class StepModule(nn.Module):
    """x -> (reconstruction, loss, grad[, kl, kl_grad]) without autograd; with
    ``gradient=False``, x -> (reconstruction, loss) alone (the forward graph).

    Args of forward:
        x: (N, C, H, W) float images, H and W the model's input size.
    Returns:
        reconstruction f(x) (N, C, H, W); loss Lr(x) (N,); grad d Lr / dx (N, C, H, W);
        for vae/gvae also kl (N,) and d kl / dx (N, C, H, W). With ``gradient=False``
        the first two only, computed by the same code as the step's.
    """

    def __init__(self, model: Model, loss_dtype: torch.dtype | None = None, gradient: bool = True) -> None:
        super().__init__()
        self.model = model
        self.gradient = gradient
        self.family = model.config.family
        self.network_dtype = next(model.parameters()).dtype
        # the loss terms (DSSIM moments, residual, KL) may run in a wider type than the
        # network: in float16 the DSSIM variances E[x^2] - E[x]^2 cancel catastrophically
        self.loss_dtype = loss_dtype or self.network_dtype
        if self.family == "dsae":
            self.register_buffer("filter_matrix", gaussian_matrix(model.config.size).to(self.loss_dtype))
        if self.family == "unet":
            # one upsampling matrix per level below the top, in the network's type
            for level in range(1, UNET_LEVELS):
                n = model.config.size >> level
                self.register_buffer(f"upsampling_{level}", upsampling_matrix(n).to(self.network_dtype))

    def _upsampling(self, level: int) -> torch.Tensor:
        """B of the upsampling from level ``level`` (1/2^level of the input) to the level above."""
        matrix = getattr(self, f"upsampling_{level}")
        assert isinstance(matrix, torch.Tensor)
        return matrix

    def _unet_forward(self, x: torch.Tensor) -> tuple[list, list, list]:
        """The U-Net's values: per level, its down block's layer outputs (input first) and its pooled
        input; per up level, its up block's layer outputs (the concatenation first); the output block's."""
        model = self.model
        assert isinstance(model, UNet)
        down = [_run(model.down[0], x)]
        pooled: list[torch.Tensor | None] = [None]  # level 0 takes x itself, unpooled
        for level in range(1, UNET_LEVELS):
            level_input = max_pool(down[-1][-1])
            pooled.append(level_input)
            down.append(_run(model.down[level], level_input))
        up: list = [None] * (UNET_LEVELS - 1)
        h = down[-1][-1]
        for level in range(UNET_LEVELS - 2, -1, -1):
            b = self._upsampling(level + 1)
            upsampled = torch.matmul(torch.matmul(b, h), b.transpose(0, 1))
            up[level] = _run(model.up[level], torch.cat([down[level][-1], upsampled], dim=1))
            h = up[level][-1]
        return down, pooled, up + [_run(model.out, h)]

    def _unet_backward(self, down: list, pooled: list, up: list, grad: torch.Tensor) -> torch.Tensor:
        """Gradient at the U-Net's input from the gradient at its output (forward operators only)."""
        model = self.model
        assert isinstance(model, UNet)
        grad = _backward(model.out, up[-1], grad)
        skip_grads = []
        for level in range(UNET_LEVELS - 1):
            grad_cat = _backward(model.up[level], up[level], grad)
            skip = down[level][-1].shape[1]
            skip_grads.append(grad_cat[:, :skip])
            b = self._upsampling(level + 1)
            grad = torch.matmul(torch.matmul(b.transpose(0, 1), grad_cat[:, skip:]), b)
        for level in range(UNET_LEVELS - 1, -1, -1):
            grad = _backward(model.down[level], down[level], grad)
            if level == 0:
                return grad
            grad = max_pool_adjoint(down[level - 1][-1], pooled[level], grad) + skip_grads[level - 1]
        raise AssertionError("unreachable")

    def _gaussian(self, x: torch.Tensor) -> torch.Tensor:
        a = self.filter_matrix
        return torch.matmul(torch.matmul(a, x), a.transpose(0, 1))

    def _gaussian_adjoint(self, g: torch.Tensor) -> torch.Tensor:
        a = self.filter_matrix
        return torch.matmul(torch.matmul(a.transpose(0, 1), g), a)

    def _dssim_loss(self, x: torch.Tensor, y: torch.Tensor, gradient: bool = True):
        """Sum over pixels of the channel-mean DSSIM, and its gradients w.r.t. x and y
        (None, None without ``gradient``)."""
        c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
        ux, uy = self._gaussian(x), self._gaussian(y)
        sxx, syy, sxy = self._gaussian(x * x), self._gaussian(y * y), self._gaussian(x * y)
        a1 = 2 * ux * uy + c1
        a2 = 2 * (sxy - ux * uy) + c2
        b1 = ux * ux + uy * uy + c1
        b2 = (sxx - ux * ux) + (syy - uy * uy) + c2
        ssim = a1 * a2 / (b1 * b2)
        channels = x.shape[1]
        loss = ((1 - ssim) / 2).sum(dim=(1, 2, 3)) / channels
        if not gradient:
            return loss, None, None
        d_ssim = -0.5 / channels
        d_a1 = d_ssim * a2 / (b1 * b2)
        d_a2 = d_ssim * a1 / (b1 * b2)
        d_b1 = -d_ssim * ssim / b1
        d_b2 = -d_ssim * ssim / b2
        d_ux = 2 * uy * d_a1 - 2 * uy * d_a2 + 2 * ux * d_b1 - 2 * ux * d_b2
        d_uy = 2 * ux * d_a1 - 2 * ux * d_a2 + 2 * uy * d_b1 - 2 * uy * d_b2
        g_sxx = self._gaussian_adjoint(d_b2)
        g_sxy = self._gaussian_adjoint(2 * d_a2)
        grad_x = self._gaussian_adjoint(d_ux) + 2 * x * g_sxx + y * g_sxy
        grad_y = self._gaussian_adjoint(d_uy) + 2 * y * g_sxx + x * g_sxy
        return loss, grad_x, grad_y

    def forward(self, x: torch.Tensor):
        model, cfg = self.model, self.model.config
        net, wide = self.network_dtype, self.loss_dtype
        if isinstance(model, UNet):
            down, pooled, up = self._unet_forward(x.to(net))
            reconstruction = up[-1][-1].to(wide)
            x = x.to(wide)
            residual = x - reconstruction
            loss = (residual * residual).sum(dim=(1, 2, 3))
            if not self.gradient:
                return reconstruction, loss
            grad_network = self._unet_backward(down, pooled, up, (-2.0 * residual).to(net)).to(wide)
            return reconstruction, loss, 2.0 * residual + grad_network
        encoded = _run(model.encoder, x.to(net))
        h = encoded[-1]
        mu = h[:, :cfg.latent] if cfg.variational else h
        decoded = _run(model.decoder, mu)
        reconstruction = decoded[-1].to(wide)
        x = x.to(wide)
        scale = None
        if self.family == "dsae":
            loss, grad_direct, grad_reconstruction = self._dssim_loss(x, reconstruction, self.gradient)
        else:
            residual = x - reconstruction
            if self.family == "gvae":
                log_gamma = model.log_gamma.to(wide)
                scale = 0.5 * torch.exp(-2.0 * log_gamma)
                loss = scale * (residual * residual).sum(dim=(1, 2, 3)) + x[0].numel() * log_gamma
            else:
                loss = (residual * residual).sum(dim=(1, 2, 3))
        if not self.gradient:
            return reconstruction, loss
        if self.family != "dsae":
            grad_direct = 2.0 * residual if scale is None else 2.0 * scale * residual
            # the network's backward pass carries the gradient of the *unscaled* squared error;
            # the gamma-VAE's 1/(2 gamma^2) multiplies its result in the wide type, so a small
            # gamma cannot overflow a float16 backward pass (the pass is linear in its input)
            grad_reconstruction = -2.0 * residual
        grad_latent = _backward(model.decoder, decoded, grad_reconstruction.to(net))
        if cfg.variational:
            grad_latent = torch.cat([grad_latent, torch.zeros_like(grad_latent)], dim=1)
        grad_network = _backward(model.encoder, encoded, grad_latent).to(wide)
        grad = grad_direct + (grad_network if scale is None else scale * grad_network)
        if not cfg.variational:
            return reconstruction, loss, grad
        mu_w, logvar_w = mu.to(wide), h[:, cfg.latent:].to(wide)
        kl = 0.5 * (mu_w * mu_w + torch.exp(logvar_w) - 1.0 - logvar_w).sum(dim=(1, 2, 3))
        grad_h = torch.cat([mu_w, 0.5 * (torch.exp(logvar_w) - 1.0)], dim=1).to(net)
        kl_grad = _backward(model.encoder, encoded, grad_h).to(wide)
        return reconstruction, loss, grad, kl, kl_grad
