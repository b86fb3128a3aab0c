"""The Gaussian diffusion process: one object owns the noise schedule and every q/p formula.

Models only predict; this object turns a prediction (``x0``, ``eps`` or ``v``) into the other two, the
posterior mean and variance, and the training target. Respacing (``respace``) builds the same process on
a subset of timesteps instead of copying code, as in Nichol & Dhariwal (2021, "IDDPM") App. B.

References: DDPM = Ho et al. 2020; IDDPM = Nichol & Dhariwal 2021; v = Salimans & Ho 2022 §4;
min-SNR = Hang et al. 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

PREDICTIONS = ("x0", "eps", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSS_WEIGHTINGS = ("none", "min_snr")


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """beta_1..beta_T (float64). ``linear`` (DDPM §4), ``scaled_linear`` (linear in sqrt(beta), Stable
    Diffusion), ``cosine`` (IDDPM eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas capped)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t / num_timesteps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(num_timesteps)],
                            dtype=torch.float64)
    raise ValueError(f"diffusion.schedule must be one of linear, scaled_linear, cosine; got {schedule!r}")


def space_timesteps(num_timesteps: int, spec: int | str | list[int]) -> list[int]:
    """Which of the ``num_timesteps`` training steps a sampler visits (IDDPM App. B, ``respace.py``).

    ``64`` or ``"64"``: 64 steps spread evenly; ``"ddim50"``: a constant stride that starts at 0 (DDIM's
    choice); ``"trailing20"``: strides of T/20 down from T-1 (Lin et al. 2023, Table 2, "trailing"; the
    timesteps of diffusers' ``timestep_spacing="trailing"``, which the fast solvers are tested against);
    ``"linspace25"``: 25 steps from 0 to T-1, both ends included, rounded (diffusers' ``UnCLIPScheduler``,
    karlo's and Kandinsky's prior spacing); ``"27,5,5"``: the schedule cut into equal sections with 27, 5 and 5 steps each; a list: those steps exactly.
    """
    if isinstance(spec, (list, tuple)):
        steps = sorted({int(s) for s in spec})
        if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
            raise ValueError(f"timesteps {spec} must lie in [0, {num_timesteps})")
        return steps
    spec = str(spec)
    if spec.startswith("ddim"):
        count = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take {count} equally strided steps from {num_timesteps}")
    if spec.startswith("trailing"):
        count = int(spec[len("trailing"):])
        # diffusers' arithmetic, rounding included: arange(T, 0, -T/count).round() - 1 (its float arange can
        # yield one entry too many, a -1; the first ``count`` are the schedule)
        steps = (np.arange(num_timesteps, 0, -num_timesteps / max(count, 1))[:count].round() - 1).astype(np.int64)
        if count < 1 or len(set(steps.tolist())) != count:
            raise ValueError(f"cannot take {count} trailing steps from {num_timesteps}; use 1 to {num_timesteps}")
        return sorted(steps.tolist())
    if spec.startswith("linspace"):
        count = int(spec[len("linspace"):])
        # UnCLIPScheduler.set_timesteps: (arange(count) * (T - 1) / (count - 1)).round()
        steps = (np.arange(0, count) * ((num_timesteps - 1) / max(count - 1, 1))).round().astype(np.int64)
        if count < 2 or len(set(steps.tolist())) != count:
            raise ValueError(f"cannot take {count} linspace steps from {num_timesteps}; use 2 to {num_timesteps}")
        return steps.tolist()
    counts = [int(c) for c in spec.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count > section or count < 1:
            raise ValueError(f"cannot take {count} steps from a section of {section} (spec {spec!r}, T={num_timesteps})")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        steps += [start + round(stride * j) for j in range(count)]
        start += section
    return sorted(set(steps))


@dataclass
class Prediction:
    x0: torch.Tensor   # predicted clean sample
    eps: torch.Tensor  # predicted noise
    var_out: torch.Tensor | None = None  # learned-range variance output in [-1, 1] (IDDPM eq. 15), if any


class GaussianDiffusion:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) over ``len(betas)`` steps (DDPM eq. 4).

    ``timestep_map[i]`` is the training step that step ``i`` of this (possibly respaced) process stands
    for; a model is always called with training steps, so one net serves every respacing.
    """

    def __init__(self, betas: torch.Tensor, prediction: str = "x0", variance: str = "fixed_small",
                 loss_weighting: str = "none", min_snr_gamma: float = 5.0, vlb_weight: float = 1e-3,
                 timestep_map: torch.Tensor | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if variance not in VARIANCES:
            raise ValueError(f"diffusion.variance must be one of {VARIANCES}, got {variance!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"diffusion.loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        self.prediction, self.variance = prediction, variance
        self.loss_weighting, self.min_snr_gamma, self.vlb_weight = loss_weighting, min_snr_gamma, vlb_weight
        self.betas = betas.to(torch.float64)
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else timestep_map.long()

        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # DDPM eq. 7: posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I)
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # beta~_0 = 0: the log is clipped to beta~_1 (IDDPM), the value is never used to add noise at t=0
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.log_betas = torch.log(self.betas)
        self.log_betas_large = torch.cat([self.posterior_log_variance[1:2], self.log_betas[1:]])
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * alphas.sqrt() / (1 - self.alphas_cumprod)
        # x0 <-> eps in float64 tables (as guided-diffusion): 1 - abar taken in float32 near t = 0 (abar ~ 1 - 4e-5)
        # keeps ~3 digits, which an eps model's x0 at the last step inherits
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        self._tables: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_config(cls, schedule: str = "cosine", num_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02, **kwargs) -> "GaussianDiffusion":
        """Built from a plain ``diffusion=`` config (what checkpoints store)."""
        return cls(make_betas(schedule, num_timesteps, beta_start, beta_end), **kwargs)

    def respace(self, spec: int | str | list[int]) -> "GaussianDiffusion":
        """The same process on a subset of steps: betas recomputed so abar at the kept steps is unchanged."""
        keep = space_timesteps(self.num_timesteps, spec)
        abar = self.alphas_cumprod[keep]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(1 - abar / abar_prev, self.prediction, self.variance, self.loss_weighting,
                                 self.min_snr_gamma, self.vlb_weight, timestep_map=self.timestep_map[keep])

    # ----------------------------------------------------------------------------------- helpers
    def take(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as ``like``'s dtype and device, shaped to broadcast over its non-batch dims."""
        key = (name, like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = getattr(self, name).to(device=like.device, dtype=like.dtype)
        return self._tables[key][t].view(-1, *([1] * (like.dim() - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t.cpu()]
        return (abar / (1 - abar)).to(t.device, torch.float32)

    # ------------------------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        abar = self.take("alphas_cumprod", t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        mean = self.take("posterior_mean_coef1", t, x_t) * x0 + self.take("posterior_mean_coef2", t, x_t) * x_t
        return mean, self.take("posterior_variance", t, x_t), self.take("posterior_log_variance", t, x_t)

    # ----------------------------------------------------------------------------- parameterisations
    def x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (DDPM eq. 15)."""
        return self.take("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self.take("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def eps_from_x0(self, x_t, t, x0):
        return (self.take("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self.take("sqrt_recipm1_alphas_cumprod", t, x_t)

    def v_target(self, x0, eps, t):
        """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, §4)."""
        abar = self.take("alphas_cumprod", t, x0)
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    def x0_from_v(self, x_t, t, v):
        abar = self.take("alphas_cumprod", t, x_t)
        return abar.sqrt() * x_t - (1 - abar).sqrt() * v

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A learned-range model outputs twice the channels: the prediction, then the variance interpolation."""
        if self.variance != "learned_range":
            return output, None
        return output.chunk(2, dim=1)

    def predict(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, denoise_fn=None) -> Prediction:
        """x0 and eps from the model's raw output; ``denoise_fn`` (clipping, thresholding) acts on x0 and
        eps is recomputed from the corrected x0 so the two stay consistent."""
        out, var_out = self.split_output(output)
        if self.prediction == "x0":
            x0 = out
        elif self.prediction == "eps":
            x0 = self.x0_from_eps(x_t, t, out)
        else:
            x0 = self.x0_from_v(x_t, t, out)
        if denoise_fn is not None:
            x0 = denoise_fn(x0)
        eps = out if (self.prediction == "eps" and denoise_fn is None) else self.eps_from_x0(x_t, t, x0)
        return Prediction(x0, eps, var_out)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "x0":
            return x0
        if self.prediction == "eps":
            return noise
        return self.v_target(x0, noise, t)

    # ------------------------------------------------------------------------------- reverse process
    def p_variance(self, t: torch.Tensor, like: torch.Tensor, var_out: torch.Tensor | None = None):
        """Variance and log variance of p(x_{t-1} | x_t): beta~_t (fixed_small), beta_t (fixed_large, with
        beta~_1 at t=0 as IDDPM), or learned between the two (IDDPM eq. 15)."""
        if self.variance == "fixed_small":
            log_var = self.take("posterior_log_variance", t, like).expand_as(like)
        elif self.variance == "fixed_large":
            log_var = self.take("log_betas_large", t, like).expand_as(like)
        else:
            frac = (var_out + 1) / 2
            log_var = frac * self.take("log_betas", t, like) + (1 - frac) * self.take("posterior_log_variance", t, like)
        return log_var.exp(), log_var

    def p_mean_variance(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, denoise_fn=None):
        """Mean, variance, log variance of p(x_{t-1} | x_t) and the x0 it was built from (DDPM eq. 11 via eq. 7)."""
        pred = self.predict(output, x_t, t, denoise_fn)
        mean, _, _ = self.q_posterior(pred.x0, x_t, t)
        var, log_var = self.p_variance(t, x_t, pred.var_out)
        return mean, var, log_var, pred

    # ------------------------------------------------------------------------------------- training
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight on the MSE: 1, or min-SNR-gamma expressed for the chosen target (Hang et al. 2023)."""
        if self.loss_weighting == "none":
            return torch.ones(len(t), device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1)}[self.prediction]

    def training_loss(self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss: weighted MSE to the target; with a learned variance, plus IDDPM's L_vlb term
        (eq. 16, weight ``vlb_weight``) that trains only the variance (the mean is detached)."""
        out, var_out = self.split_output(output)
        dims = tuple(range(1, x0.dim()))
        loss = ((out - self.training_target(x0, noise, t)) ** 2).mean(dims) * self.loss_weight(t)
        if var_out is not None:
            frozen = torch.cat([out.detach(), var_out], dim=1)
            loss = loss + self.vlb_weight * self.num_timesteps * self.vlb_terms(frozen, x0, x_t, t)
        return loss

    def vlb_terms(self, output, x0, x_t, t) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim, and -log p(x_0|x_1) at t=0
        with the discretised Gaussian decoder of DDPM §3.3 (data in [-1, 1], 256 levels)."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        mean, _, log_var, _ = self.p_mean_variance(output, x_t, t)
        dims = tuple(range(1, x0.dim()))
        kl = 0.5 * (-1 + log_var - true_log_var + (true_log_var - log_var).exp() + (true_mean - mean) ** 2 * (-log_var).exp())
        kl = kl.mean(dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2) (DDPM eq. 13)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
