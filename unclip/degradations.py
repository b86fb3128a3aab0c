"""How an upsampler's low-resolution condition is made and corrupted during training.

unCLIP (App. A/§2.1) trains its two upsamplers on corrupted conditioning images so that they tolerate the
artifacts of the stage before them: Gaussian blur for the first (64 -> 256), a lighter variant of BSR
degradation (Zhang et al. 2021, "BSRGAN": blur, noise and JPEG in random order) for the second
(256 -> 1024). Noise augmentation (Imagen §2.5, "conditioning augmentation") lives with the upsampler
module, since it uses the module's own diffusion process.

Every op maps (B, 3, h, w) images in [-1, 1] to the same shape and range, draws its randomness per sample
from torch's generator (seeded every training step, so a resumed run repeats the same corruptions) and is
a plain callable built from a ``_target_`` config.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


RESIZE_MODES = ("bicubic", "bilinear", "area", "nearest", "bicubic_aa")


def resize(images: torch.Tensor, size: int | tuple[int, int], mode: str = "bicubic", clamp: bool = True) -> torch.Tensor:
    """Resize (B, C, H, W) images to ``size`` (an int: square). ``bicubic``/``bilinear`` are antialiased when
    shrinking (bicubic is the DataModule's ``image_lowres`` downsample); ``area`` is a box filter, which
    commutes with crops aligned to the scale factor. ``bicubic_aa`` is antialiased bicubic at every scale: when
    enlarging, torch's antialiased kernel is PIL's (a = -0.5, not -0.75), the upsampling diffusers'
    ``UnCLIPPipeline`` feeds karlo's super-resolution nets. ``clamp`` cuts bicubic overshoot back to [-1, 1]
    (off for noise-augmented inputs, which leave that range)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode in ("area", "nearest"):
        return F.interpolate(images, size=size, mode=mode)
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    antialias = shrinking or mode == "bicubic_aa"
    out = F.interpolate(images, size=size, mode=mode.removesuffix("_aa"), align_corners=False, antialias=antialias)
    return out.clamp(-1, 1) if clamp else out


def uniform(low_high: Sequence[float] | float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) draws from U[low, high] on the CPU (a single number is a fixed value)."""
    if isinstance(low_high, (int, float)):
        return torch.full((n,), float(low_high))
    low, high = (float(v) for v in low_high)
    return low + (high - low) * torch.rand(n, generator=generator)


def chosen(prob: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) bool: which samples an op with probability ``prob`` touches."""
    return torch.rand(n, generator=generator) < prob


class GaussianBlur:
    """Isotropic Gaussian blur with a per-sample sigma ~ U(sigma) (in low-res pixels), applied with ``prob``.

    One separable, grouped convolution for the whole batch; reflect padding, so borders keep their colour.
    """

    def __init__(self, sigma: Sequence[float] | float = (0.4, 0.6), prob: float = 0.5, truncate: float = 3.0):
        self.sigma, self.prob, self.truncate = sigma, prob, truncate

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, c, h, w = images.shape
        apply = chosen(self.prob, b, generator)
        sigma = uniform(self.sigma, b, generator)
        if not apply.any():
            return images
        sigma = sigma[apply]
        radius = max(1, min(math.ceil(self.truncate * float(sigma.max())), min(h, w) - 1))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
        kernel = (kernel / kernel.sum(-1, keepdim=True)).to(images)               # (n, k)
        kernel = kernel.repeat_interleave(c, dim=0)[:, None]                      # (n * C, 1, k)
        x = images[apply.to(images.device)].reshape(1, -1, h, w)                 # each (sample, channel) a group
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, kernel[:, :, None, :], groups=x.shape[1])                 # along width
        x = F.conv2d(x, kernel[:, :, :, None], groups=x.shape[1])                 # along height
        out = images.clone()
        out[apply.to(images.device)] = x.view(-1, c, h, w).to(out.dtype)  # autocast runs the convs in bf16
        return out


class GaussianNoise:
    """Additive white Gaussian noise, std ~ U(std) in [-1, 1] units (2/255 = one 8-bit level), with ``prob``."""

    def __init__(self, std: Sequence[float] | float = (0.01, 0.1), prob: float = 0.5):
        self.std, self.prob = std, prob

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = len(images)
        scale = (uniform(self.std, b, generator) * chosen(self.prob, b, generator)).to(images).view(b, 1, 1, 1)
        noise = torch.randn(images.shape, generator=generator).to(images)
        return (images + scale * noise).clamp(-1, 1)


class JPEG:
    """JPEG compression at a per-sample quality ~ U(quality) (torchvision's libjpeg, on the CPU), with ``prob``."""

    def __init__(self, quality: Sequence[float] | float = (30, 95), prob: float = 0.5):
        self.quality, self.prob = quality, prob

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        from torchvision.io import decode_jpeg, encode_jpeg

        b = len(images)
        apply = chosen(self.prob, b, generator)
        quality = uniform(self.quality, b, generator).round().clamp(1, 100).int()
        if not apply.any():
            return images
        out = images.clone()
        pixels = images.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()
        for i in apply.nonzero().flatten().tolist():
            decoded = decode_jpeg(encode_jpeg(pixels[i], quality=int(quality[i])))
            out[i] = decoded.to(images.device, images.dtype).div(127.5).sub(1)
        return out


class RandomOrder:
    """Applies ``ops`` in an order drawn per sample (BSR's shuffled degradation sequence); each op still
    decides with its own probability whether it touches a sample."""

    def __init__(self, ops: Sequence):
        self.ops = list(ops)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, n = len(images), len(self.ops)
        order = torch.argsort(torch.rand(b, n, generator=generator), dim=1)       # (B, n): op index at each position
        out = images
        for position in range(n):
            for k, op in enumerate(self.ops):
                rows = (order[:, position] == k).to(images.device)
                if rows.any():
                    out = out.clone()
                    out[rows] = op(out[rows], generator)
        return out


class BSRLite(RandomOrder):
    """The second upsampler's corruption: blur, noise and JPEG, each with its probability, in random order
    (a light BSR: no random rescaling, no camera-sensor noise model)."""

    def __init__(self, blur_sigma=(0.2, 2.0), blur_prob: float = 0.7, noise_std=(0.01, 0.1), noise_prob: float = 0.5,
                 jpeg_quality=(30, 95), jpeg_prob: float = 0.7):
        super().__init__([GaussianBlur(blur_sigma, blur_prob), GaussianNoise(noise_std, noise_prob),
                          JPEG(jpeg_quality, jpeg_prob)])
