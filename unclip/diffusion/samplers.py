"""Samplers as small functions ``(model_fn, diffusion, x_T, ...) -> x_0`` (k-diffusion style).

``model_fn(x_t, t)`` returns the net's raw output, ``t`` being the *training* step; the samplers walk a
(possibly respaced) :class:`GaussianDiffusion` and map its steps through ``timestep_map``. Classifier-free
guidance is a wrapper around a model function, written once; clipping and dynamic thresholding are
``denoise_fn``s applied to the predicted x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from unclip.diffusion.schedule import GaussianDiffusion, Prediction

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DenoiseFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------- x0 corrections
def clip_x0(x0: torch.Tensor) -> torch.Tensor:
    """Static clipping of the predicted image to the data range [-1, 1] (pixel models)."""
    return x0.clamp(-1, 1)


def dynamic_threshold(percentile: float = 0.995) -> DenoiseFn:
    """Imagen §2.3: s = the ``percentile`` of |x0| per sample (at least 1); clamp to [-s, s], divide by s."""
    def threshold(x0: torch.Tensor) -> torch.Tensor:
        s = torch.quantile(x0.detach().abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
        s = s.view(-1, *([1] * (x0.dim() - 1)))
        return x0.clamp(-s, s) / s
    return threshold


# ------------------------------------------------------------------------------------ guidance
def classifier_free_guidance(paired_fn: ModelFn, scale: float, learned_variance: bool = False) -> ModelFn:
    """Ho & Salimans 2022, eq. 6: out = out_uncond + scale (out_cond - out_uncond), in one batched call.

    ``paired_fn(x2, t2)`` must evaluate the conditional model on the first half of its batch and the
    unconditional one on the second half. Guiding the raw output is the same as guiding eps for any
    parameterisation (x0, eps and v are affine in each other at fixed x_t). A learned variance is not
    guided: the conditional half is kept (GLIDE).
    """
    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_cond, out_uncond = paired_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        if learned_variance:
            (mean_c, var_c), (mean_u, _) = out_cond.chunk(2, dim=1), out_uncond.chunk(2, dim=1)
            return torch.cat([mean_u + scale * (mean_c - mean_u), var_c], dim=1)
        return out_uncond + scale * (out_cond - out_uncond)
    return guided


# --------------------------------------------------------------------------------------- steps
def step_t(diffusion: GaussianDiffusion, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into ``diffusion``'s tables, training step the model sees) for step ``i`` of a batch."""
    index = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    return index, diffusion.timestep_map.to(x.device)[index]


def ddpm_step(diffusion: GaussianDiffusion, output: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
              noise: torch.Tensor, denoise_fn: DenoiseFn | None = None) -> tuple[torch.Tensor, Prediction]:
    """Ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (DDPM Alg. 2 via the posterior of eq. 7)."""
    mean, _, log_var, pred = diffusion.p_mean_variance(output, x, index, denoise_fn)
    nonzero = (index != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # no noise on the last step
    return mean + nonzero * (0.5 * log_var).exp() * noise, pred


def ddim_step(diffusion: GaussianDiffusion, output: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
              eta: float = 0.0, noise: torch.Tensor | None = None, denoise_fn: DenoiseFn | None = None
              ) -> tuple[torch.Tensor, Prediction]:
    """DDIM eq. 12: x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}) (eq. 16)."""
    pred = diffusion.predict(output, x, index, denoise_fn)
    abar = diffusion.take("alphas_cumprod", index, x)
    abar_prev = diffusion.take("alphas_cumprod_prev", index, x)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    x_prev = abar_prev.sqrt() * pred.x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * pred.eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, pred


# -------------------------------------------------------------------------------------- loops
def _steps(diffusion: GaussianDiffusion, progress: bool, desc: str):
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    return tqdm(steps, desc=desc, leave=False) if progress else steps


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ddpm_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor,
                generator: torch.Generator | None = None, denoise_fn: DenoiseFn | None = None,
                progress: bool = False) -> torch.Tensor:
    """Ancestral sampling over every step of ``diffusion`` (respace it for fewer steps)."""
    x = x_T
    for i in _steps(diffusion, progress, "ddpm"):
        index, t = step_t(diffusion, i, x)
        x, _ = ddpm_step(diffusion, model_fn(x, t), x, index, _noise_like(x, generator), denoise_fn)
    return x


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor, eta: float = 0.0,
                generator: torch.Generator | None = None, denoise_fn: DenoiseFn | None = None,
                progress: bool = False) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021); ``eta=0`` is deterministic given x_T, ``eta=1`` is DDPM-like."""
    x = x_T
    for i in _steps(diffusion, progress, "ddim"):
        index, t = step_t(diffusion, i, x)
        noise = _noise_like(x, generator) if eta > 0 else None
        x, _ = ddim_step(diffusion, model_fn(x, t), x, index, eta, noise, denoise_fn)
    return x


@torch.no_grad()
def ddim_invert(model_fn: ModelFn, diffusion: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM encoder (DDIM §4.3): eq. 12 with eta=0 run from x_0 towards x_T. Step i
    moves x from the level of step i-1 to that of step i with the model evaluated where x is (step i-1;
    step 0 starts from the data itself). ``ddim_sample`` of the result returns (approximately) ``x0``."""
    x = x0
    for i in range(diffusion.num_timesteps):
        index, t = step_t(diffusion, max(i - 1, 0), x)
        pred = diffusion.predict(model_fn(x, t), x, index)
        abar = diffusion.take("alphas_cumprod", index + (1 if i else 0), x)
        x = abar.sqrt() * pred.x0 + (1 - abar).sqrt() * pred.eps
    return x


# ------------------------------------------------------------------------------ configured sampler
@dataclass
class Sampler:
    """What ``sampler=`` configures: which loop, how many steps (a respacing spec), eta, guidance scale,
    and the optional x0 correction for pixel models."""

    kind: str = "ddim"                       # ddim | ddpm
    steps: int | str = 64                    # see space_timesteps: 64, "ddim50", "27,5,5"
    eta: float = 0.0                         # DDIM only: 0 deterministic, 1 ancestral-like
    guidance_scale: float = 1.0              # classifier-free guidance; 1 = conditional model only
    clip_denoised: bool = False              # clamp x0 to [-1, 1] (pixels)
    dynamic_threshold: float | None = None   # Imagen's percentile (e.g. 0.995), pixels
    progress: bool = False

    def __post_init__(self):
        if self.kind not in ("ddim", "ddpm"):
            raise ValueError(f"sampler.kind must be 'ddim' or 'ddpm', got {self.kind!r}")
        self._respaced: dict = {}

    def denoise_fn(self) -> DenoiseFn | None:
        if self.dynamic_threshold:
            return dynamic_threshold(self.dynamic_threshold)
        return clip_x0 if self.clip_denoised else None

    def process(self, diffusion: GaussianDiffusion, steps: int | str | None = None) -> GaussianDiffusion:
        spec = self.steps if steps is None else steps
        key = (id(diffusion), str(spec))
        if key not in self._respaced:
            self._respaced[key] = diffusion.respace(spec)
        return self._respaced[key]

    def __call__(self, model_fn: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor,
                 generator: torch.Generator | None = None, steps: int | str | None = None,
                 eta: float | None = None) -> torch.Tensor:
        process = self.process(diffusion, steps)
        if self.kind == "ddpm":
            return ddpm_sample(model_fn, process, x_T, generator, self.denoise_fn(), self.progress)
        return ddim_sample(model_fn, process, x_T, self.eta if eta is None else eta, generator, self.denoise_fn(),
                           self.progress)
