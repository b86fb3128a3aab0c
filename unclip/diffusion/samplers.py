"""Samplers as small functions ``(model_fn, diffusion, x_T, ...) -> x_0`` (k-diffusion style).

``model_fn(x_t, t)`` returns the net's raw output, ``t`` being the *training* step; the samplers walk a
(possibly respaced) :class:`GaussianDiffusion` and map its steps through ``timestep_map``. Classifier-free
guidance is a wrapper around a model function, written once; clipping and dynamic thresholding are
``denoise_fn``s applied to the predicted x0. ``dpmpp_2m_sample`` and ``unipc_sample`` are multistep ODE
solvers in the data prediction (one model call per step, second order): the fast samplers for 10-25 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from unclip.diffusion.schedule import GaussianDiffusion, Prediction

KINDS = ("ddim", "ddpm", "dpmpp_2m", "unipc")  # what Sampler.kind selects
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DenoiseFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------- x0 corrections
def clip_x0(x0: torch.Tensor) -> torch.Tensor:
    """Static clipping of the predicted image to the data range [-1, 1] (pixel models)."""
    return x0.clamp(-1, 1)


def dynamic_threshold(percentile: float = 0.995) -> DenoiseFn:
    """Imagen §2.3: s = the ``percentile`` of |x0| per sample (at least 1); clamp to [-s, s], divide by s."""
    def threshold(x0: torch.Tensor) -> torch.Tensor:
        a = x0.detach().abs().flatten(1)
        a = a if a.dtype in (torch.float32, torch.float64) else a.float()  # quantile needs float32 or float64
        s = torch.quantile(a, percentile, dim=1).clamp(min=1.0).to(x0.dtype)
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


def part_weights(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weights`` (K, B) or spatial (K, B, 1, h, w) as (K, B, 1, ..., 1) or (K, B, 1, H, W) for x (B, C, H, W):
    spatial maps are resized bilinearly, which keeps weights that sum to 1 at every pixel summing to 1."""
    k, b = weights.shape[:2]
    if weights.dim() == 2:
        return weights.view(k, b, *[1] * (x.dim() - 1))
    if weights.shape[-2:] != x.shape[-2:]:
        weights = F.interpolate(weights.flatten(0, 1).float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return weights.reshape(k, b, 1, *x.shape[-2:])


def composed_guidance(stacked_fn: ModelFn, weights: torch.Tensor, scale: float, learned_variance: bool = False) -> ModelFn:
    """Composable Diffusion's conjunction (Liu et al. 2022, eq. 12): out = out_uncond + scale Σ_k w_k (out_k - out_uncond)
    over K conditions, in one batched call. ``stacked_fn(xs, ts)`` evaluates condition k on rows [kB, (k+1)B) of its
    batch and the unconditional model on the last B rows; ``weights`` (K, B) weigh each condition per sample (0 leaves
    one out, so prompts with fewer parts share a batch). One condition of weight 1 is :func:`classifier_free_guidance`.
    Spatial weights (K, B, 1, h, w) weigh each condition per pixel as well (a layout: :func:`unclip.composition.layout_weights`).
    A learned variance is not guided: the first condition's is kept."""
    k = weights.shape[0]

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = stacked_fn(torch.cat([x] * (k + 1)), torch.cat([t] * (k + 1))).unflatten(0, (k + 1, len(x)))
        conds, uncond = out[:-1], out[-1]
        w = part_weights(weights, x).to(device=out.device, dtype=out.dtype)
        if learned_variance:
            (mean_c, var_c), mean_u = conds.chunk(2, dim=2), uncond.chunk(2, dim=1)[0]
            return torch.cat([mean_u + scale * (w * (mean_c - mean_u)).sum(0), var_c[0]], dim=1)
        return uncond + scale * (w * (conds - uncond)).sum(0)
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
        # the last step adds no noise: none is drawn for it (as diffusers' schedulers), so a generator shared by
        # several stages (prior, decoder, upsampler) is at the same place after each as in diffusers' pipelines
        noise = _noise_like(x, generator) if i > 0 else torch.zeros_like(x)
        x, _ = ddpm_step(diffusion, model_fn(x, t), x, index, noise, denoise_fn)
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


# ------------------------------------------------------------------------------ multistep solvers
def _levels(diffusion: GaussianDiffusion) -> tuple[list[float], list[float], list[float]]:
    """alpha_k = sqrt(abar), sigma_k = sqrt(1 - abar) and lambda_k = log(alpha_k / sigma_k) (float64) of the
    levels a solver visits, in sampling order: step k sits at index N-1-k of ``diffusion``, level N is the
    data itself (alpha 1, sigma 0, lambda inf), where DDIM's last step lands too."""
    abar = torch.cat([diffusion.alphas_cumprod.flip(0), torch.ones(1, dtype=torch.float64)])
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return alpha.tolist(), sigma.tolist(), (alpha.log() - sigma.log()).tolist()


def _data_prediction(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, i: int,
                     denoise_fn: DenoiseFn | None) -> torch.Tensor:
    """x_theta(x, t_i): the model's x0, corrected by ``denoise_fn`` (where DPM-Solver++ applies thresholding)."""
    index, t = step_t(diffusion, i, x)
    return diffusion.predict(model_fn(x, t), x, index, denoise_fn).x0


@torch.no_grad()
def dpmpp_2m_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor,
                    denoise_fn: DenoiseFn | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): the probability-flow ODE solved in
    lambda = log(alpha / sigma) with the data prediction, second order from the previous step's x0, one
    model call per step. The first step (no history) and the last (to sigma = 0, h = inf) are first order,
    i.e. DDIM, as diffusers' ``DPMSolverMultistepScheduler`` (``final_sigmas_type="zero"``) does."""
    alpha, sigma, lam = _levels(diffusion)
    n = diffusion.num_timesteps
    x, x0_prev = x_T, None
    for k, i in enumerate(_steps(diffusion, progress, "dpmpp_2m")):
        x0 = _data_prediction(model_fn, diffusion, x, i, denoise_fn)
        h = lam[k + 1] - lam[k]                                  # h_i = lambda_{t_i} - lambda_{t_{i-1}}
        d = x0
        if x0_prev is not None and k < n - 1:
            r = (lam[k] - lam[k - 1]) / h                        # Alg. 2: r_i = h_{i-1} / h_i
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev   # Alg. 2: D_i
        # Alg. 2: x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        x = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * math.expm1(-h) * d
        x0_prev = x0
    return x


def _unipc_update(x: torch.Tensor, k: int, x0s: list[torch.Tensor], alpha: list[float], sigma: list[float],
                  lam: list[float], order: int, x0_next: torch.Tensor | None = None) -> torch.Tensor:
    """One UniPC-bh2 move of x from level k to k + 1 (Zhao et al. 2023, "UniPC", §3), data prediction form:
    x = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m_s - alpha_t B sum_m a_m D_m, with B = e^{-h} - 1 (bh2,
    B(h) = e^h - 1 taken at -h in the data prediction).
    ``x0s`` holds the data predictions at levels ..., k-1, k (newest last). Without ``x0_next`` this is the
    predictor UniP-``order``; with it (the model's x0 at the predicted point) the corrector UniC-``order``,
    whose extra term D = x0_next - m_s raises the order by one at no extra model call."""
    s, t = k, k + 1
    h = lam[t] - lam[s]
    b_h = math.expm1(-h)                                         # bh2, = (-h) phi_1(-h)
    m0 = x0s[-1]
    out = sigma[t] / sigma[s] * x - alpha[t] * b_h * m0          # the first-order (DDIM) part
    if order == 2:
        r = (lam[s - 1] - lam[s]) / h                            # r_1 = (lambda_{s-1} - lambda_s) / h
        d1 = (x0s[-2] - m0) / r
    if x0_next is None:                                          # UniP: a_1 = 1/2 for p = 2 (as the reference code)
        return out if order == 1 else out - alpha[t] * b_h * 0.5 * d1
    d_next = x0_next - m0
    if order == 1:                                               # UniC-1: a_1 = 1/2
        return out - alpha[t] * b_h * 0.5 * d_next
    # UniC-2: a solves [[1, 1], [r, 1]] a = g, g_n = n! z phi_{n+1}(z) / B(h) at z = -h, where
    # phi_1(z) = (e^z - 1) / z and phi_{n+1}(z) = (phi_n(z) - 1/n!) / z
    z = -h
    g1 = (b_h / z - 1) / b_h                                     # z phi_2(z) = phi_1(z) - 1
    g2 = 2 * ((b_h / z - 1) / z - 0.5) / b_h                     # z phi_3(z) = phi_2(z) - 1/2
    a1 = (g1 - g2) / (1 - r)
    a2 = g1 - a1
    return out - alpha[t] * b_h * (a1 * d1 + a2 * d_next)


@torch.no_grad()
def unipc_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor,
                 denoise_fn: DenoiseFn | None = None, progress: bool = False) -> torch.Tensor:
    """UniPC-2 with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023), in the data prediction: each step first
    corrects the current point with the model output just computed there (UniC), then predicts the next
    (UniP, multistep); one model call per step. Orders warm up from 1 and the last step is first order, as
    diffusers' ``UniPCMultistepScheduler`` (``solver_order=2``, ``lower_order_final``) does."""
    alpha, sigma, lam = _levels(diffusion)
    n = diffusion.num_timesteps
    x, x0s, x_last, order = x_T, [], None, 0
    for k, i in enumerate(_steps(diffusion, progress, "unipc")):
        x0 = _data_prediction(model_fn, diffusion, x, i, denoise_fn)
        if x_last is not None:                                   # UniC: level k from k-1, with the new x0
            x = _unipc_update(x_last, k - 1, x0s, alpha, sigma, lam, order, x0_next=x0)
        x0s = (x0s + [x0])[-2:]
        order = min(2, k + 1, n - k)
        x_last = x
        x = _unipc_update(x, k, x0s, alpha, sigma, lam, order)  # UniP: level k + 1
    return x


# ------------------------------------------------------------------------------ configured sampler
@dataclass
class Sampler:
    """What ``sampler=`` configures: which loop, how many steps (a respacing spec), eta, guidance scale,
    and the optional x0 correction for pixel models."""

    kind: str = "ddim"                       # ddim | ddpm | dpmpp_2m | unipc
    steps: int | str = 64                    # see space_timesteps: 64, "ddim50", "trailing20", "27,5,5"
    eta: float = 0.0                         # DDIM only: 0 deterministic, 1 ancestral-like (the solvers: unused)
    guidance_scale: float = 1.0              # classifier-free guidance; 1 = conditional model only
    clip_denoised: bool = False              # clamp x0 to [-clip_range, clip_range] (pixels: 1)
    clip_range: float = 1.0                  # published priors clamp their normalised x0 wider (karlo: 5)
    dynamic_threshold: float | None = None   # Imagen's percentile (e.g. 0.995), pixels
    progress: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sampler.kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        self._respaced: dict = {}

    def denoise_fn(self) -> DenoiseFn | None:
        if self.dynamic_threshold:
            return dynamic_threshold(self.dynamic_threshold)
        if not self.clip_denoised:
            return None
        return clip_x0 if self.clip_range == 1.0 else (lambda x0: x0.clamp(-self.clip_range, self.clip_range))

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
        if self.kind == "dpmpp_2m":
            return dpmpp_2m_sample(model_fn, process, x_T, self.denoise_fn(), self.progress)
        if self.kind == "unipc":
            return unipc_sample(model_fn, process, x_T, self.denoise_fn(), self.progress)
        return ddim_sample(model_fn, process, x_T, self.eta if eta is None else eta, generator, self.denoise_fn(),
                           self.progress)
