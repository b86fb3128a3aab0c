"""The diffusion core: schedule identities, parameterisations, respacing, and agreement with diffusers'
DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler / UniPCMultistepScheduler (the reference
implementations, a test-only dependency)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from unclip.diffusion import (GaussianDiffusion, Sampler, classifier_free_guidance, clip_x0, ddim_invert, ddim_sample,
                              ddim_step, ddpm_sample, ddpm_step, dpmpp_2m_sample, dynamic_threshold, make_betas,
                              space_timesteps, unipc_sample)
from unclip.diffusion.samplers import step_t

DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_schedule_identities(schedule):
    d = GaussianDiffusion(make_betas(schedule, 1000))
    abar = d.alphas_cumprod
    assert torch.all(abar[1:] < abar[:-1]) and 0 < abar[-1] < abar[0] < 1  # monotone decreasing in (0, 1)
    assert torch.all((d.betas > 0) & (d.betas <= 0.999))
    # posterior variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) <= beta_t, and 0 at t = 0
    assert d.posterior_variance[0] == 0 and torch.all(d.posterior_variance <= d.betas + 1e-12)
    # the posterior mean coefficients turn (x0, x_t) = (x0, sqrt(abar) x0) into sqrt(abar_{t-1}) x0 (no noise)
    x0 = torch.randn(8, 4, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,))
    x_t = d.take("alphas_cumprod", t, x0).sqrt() * x0
    mean, _, _ = d.q_posterior(x0, x_t, t)
    torch.testing.assert_close(mean, d.take("alphas_cumprod_prev", t, x0).sqrt() * x0)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_alphas_match_diffusers(schedule):
    ours = GaussianDiffusion(make_betas(schedule, 1000)).alphas_cumprod
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule]).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_parameterisations_convert_consistently(prediction):
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction)
    x0, noise = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    t = torch.randint(0, 1000, (16,))
    x_t = d.q_sample(x0, t, noise)
    pred = d.predict(d.training_target(x0, noise, t), x_t, t)  # a perfect model's output
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, noise)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_ddpm_step_matches_diffusers(schedule, prediction):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule], clip_sample=False,
                        prediction_type=DIFFUSERS_PREDICTION[prediction], variance_type="fixed_small")
    ours = GaussianDiffusion(make_betas(schedule, 1000), prediction=prediction)
    for t in (999, 500, 37, 1, 0):
        x, out = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        got, _ = ddpm_step(ours, out, x, torch.full((4,), t), noise)
        # diffusers keeps its tables in float32: near t = 0, 1 - abar ~ 1e-4 leaves ~3 digits (ours: float64)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(prediction, eta):
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                        prediction_type=DIFFUSERS_PREDICTION[prediction])
    ref.set_timesteps(50)
    ours = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction).respace("ddim50")
    assert ours.timestep_map.flip(0).tolist() == ref.timesteps.tolist()  # same visited steps
    for i in (49, 30, 1, 0):
        t = int(ours.timestep_map[i])
        x, out, z = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)
        expected = ref.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        got, _ = ddim_step(ours, out, x, torch.full((4,), i), eta=eta, noise=z)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)


def test_space_timesteps_specs():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10") == space_timesteps(100, 10)
    assert len(space_timesteps(100, 10)) == 10 and space_timesteps(100, 10)[0] == 0 and space_timesteps(100, 10)[-1] == 99
    steps = space_timesteps(300, "10,5,2")  # sections [0,100), [100,200), [200,300)
    assert sum(s < 100 for s in steps) == 10 and sum(100 <= s < 200 for s in steps) == 5 and sum(s >= 200 for s in steps) == 2
    assert space_timesteps(1000, [999, 0, 500]) == [0, 500, 999]
    with pytest.raises(ValueError, match="section"):
        space_timesteps(10, "20")


def test_trailing_spacing_is_diffusers_trailing():
    assert space_timesteps(1000, "trailing10") == list(range(99, 1000, 100))
    for n in range(1, 201):
        ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
        ref.set_timesteps(n)
        theirs = ref.timesteps.tolist()
        # for a few n diffusers' float arange yields one step too many, a -1: ours are the n before it
        assert space_timesteps(1000, f"trailing{n}") == sorted(theirs if len(theirs) == n else theirs[:n])
    with pytest.raises(ValueError, match="trailing"):
        space_timesteps(10, "trailing20")


def test_respacing_keeps_alpha_bar():
    d = GaussianDiffusion(make_betas("linear", 1000))
    r = d.respace("27,5,5")
    torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map])
    assert r.respace(5).timestep_map.tolist() == r.timestep_map[space_timesteps(len(r.timestep_map), 5)].tolist()


class GaussianData:
    """Data x0 ~ N(mu, s^2 I): the exact eps-prediction is known in closed form, a toy 'trained model'."""

    def __init__(self, diffusion, mu=0.7, s=0.3):
        self.d, self.mu, self.s = diffusion, mu, s

    def __call__(self, x, t):
        abar = self.d.alphas_cumprod.float()[t].view(-1, *([1] * (x.dim() - 1)))
        var = abar * self.s ** 2 + 1 - abar
        x0 = self.mu + self.s ** 2 * abar.sqrt() / var * (x - abar.sqrt() * self.mu)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def test_ddim_eta0_is_deterministic_and_inverts():
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction="eps")
    model = GaussianData(d)
    process = d.respace(200)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(model, process, x_T, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(model, process, x_T, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)  # eta = 0: the noise generator plays no part
    assert abs(a.mean() - 0.7) < 0.1 and abs(a.std() - 0.3) < 0.1  # it samples the data distribution
    x0 = 0.7 + 0.3 * torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    round_trip = ddim_sample(model, process, ddim_invert(model, process, x0))
    assert (round_trip - x0).abs().max() < 2e-2


def test_ddpm_sampler_reaches_the_data_distribution():
    d = GaussianDiffusion(make_betas("linear", 1000), prediction="eps")
    x = ddpm_sample(GaussianData(d), d.respace(100), torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)),
                    generator=torch.Generator().manual_seed(1))
    assert abs(x.mean() - 0.7) < 0.05 and abs(x.std() - 0.3) < 0.05


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpmpp_2m", "unipc"])
def test_sampler_config_respaces_and_selects_loop(kind):
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction="eps")
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        return GaussianData(d)(x, t)

    Sampler(kind=kind, steps=8)(model, d, torch.randn(4, 2))
    assert calls == sorted(space_timesteps(1000, 8), reverse=True)  # one model call per step, from T-1 down
    with pytest.raises(ValueError, match="sampler.kind"):
        Sampler(kind="euler")


def test_classifier_free_guidance_math():
    def paired(x, t):  # conditional half returns 3, unconditional half returns 1
        half = x.shape[0] // 2
        return torch.cat([torch.full_like(x[:half], 3.0), torch.full_like(x[half:], 1.0)])

    x, t = torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(classifier_free_guidance(paired, 1.0)(x, t), torch.full((5, 2), 3.0))
    torch.testing.assert_close(classifier_free_guidance(paired, 4.0)(x, t), torch.full((5, 2), 1 + 4 * 2.0))
    torch.testing.assert_close(classifier_free_guidance(paired, 0.0)(x, t), torch.full((5, 2), 1.0))
    # a learned variance (second half of the channels) is taken from the conditional model, not guided
    guided = classifier_free_guidance(paired, 4.0, learned_variance=True)(x, t)
    torch.testing.assert_close(guided, torch.tensor([[9.0, 3.0]]).expand(5, 2))


def test_dynamic_threshold_and_clipping():
    x0 = torch.tensor([[0.5, -0.5, 0.2, 0.1], [4.0, -2.0, 1.0, 0.5]])
    out = dynamic_threshold(1.0)(x0)
    torch.testing.assert_close(out[0], x0[0])  # within [-1, 1]: untouched
    assert out[1].abs().max() == 1.0 and out[1, 0] == 1.0 and out[1, 1] == -0.5
    assert Sampler(clip_denoised=True).denoise_fn()(x0).abs().max() == 1.0


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_training_loss_and_variances(variance):
    d = GaussianDiffusion(make_betas("linear", 100), prediction="eps", variance=variance, loss_weighting="min_snr")
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 10, 50, 98, 99])
    x_t = d.q_sample(x0, t, noise)
    channels = 6 if variance == "learned_range" else 3
    output = torch.randn(6, channels, 4, 4, requires_grad=True)
    loss = d.training_loss(output, x0, x_t, t, noise)
    assert loss.shape == (6,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(output.grad).all()
    var, log_var = d.p_variance(t, x0, output[:, 3:].detach().tanh() if variance == "learned_range" else None)
    assert torch.all(var > 0) and torch.all(var <= d.take("betas", t, x0) + 1e-6)
    index, mapped = step_t(d.respace(10), 9, x0)
    assert int(mapped[0]) == 99 and int(index[0]) == 9


def test_min_snr_weighting_is_one_loss_whatever_the_network_predicts():
    """Min-SNR-gamma (Hang et al. 2023) is min(SNR, gamma) * ||x0 - x0_hat||^2; written for an eps or v target
    the weight must absorb the factor SNR (eps) or SNR + 1 (v), so one x0 estimate scores the same loss."""
    x0 = torch.rand(5, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 30, 300, 700, 999])
    x0_hat = x0 + 0.1 * torch.randn_like(x0)  # one estimate of the clean image, expressed in each target below
    losses = {}
    for prediction in ("x0", "eps", "v"):
        d = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
        x_t = d.q_sample(x0, t, noise)
        eps_hat = d.eps_from_x0(x_t, t, x0_hat)
        output = {"x0": x0_hat, "eps": eps_hat, "v": d.v_target(x0_hat, eps_hat, t)}[prediction]
        losses[prediction] = d.training_loss(output, x0, x_t, t, noise)
    snr = GaussianDiffusion(make_betas("cosine", 1000)).snr(t)
    expected = snr.clamp(max=5.0) * ((x0_hat - x0) ** 2).mean((1, 2, 3))
    for prediction, loss in losses.items():
        assert torch.allclose(loss, expected, rtol=1e-3, atol=1e-6), prediction
    assert snr[0] > 5.0 > snr[-1]  # both sides of the clamp are exercised


# ------------------------------------------------------------------------- fast multistep solvers
SOLVERS = {"dpmpp_2m": dpmpp_2m_sample, "unipc": unipc_sample}


def reference_solver(kind: str, **config):
    if kind == "dpmpp_2m":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **config)
    return UniPCMultistepScheduler(solver_order=2, solver_type="bh2", **config)


class LinearModel:
    """A fixed random closed-form model of (x, t): the exact x0 of data N(mu, s^2) plus a random linear term
    that fades as t -> 0 (``perturb=0``: the exact denoiser; ``s=0``: data a single point), returned in the
    diffusion's parameterisation. ``t`` is the training step; x is (B, C, H, W) with C H W = ``dim``."""

    def __init__(self, diffusion, mu=0.3, s=0.8, perturb=0.3, dim=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.d, self.mu, self.s = diffusion, mu, s
        self.A = perturb * torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5
        self.b = perturb * torch.randn(dim, generator=g, dtype=torch.float64)

    def __call__(self, x, t):
        abar = self.d.alphas_cumprod[t.cpu()].to(x).view(-1, 1)
        flat = x.flatten(1)
        x0 = self.mu + self.s ** 2 * abar.sqrt() / (abar * self.s ** 2 + 1 - abar) * (flat - abar.sqrt() * self.mu)
        x0 = x0 + (1 - abar).sqrt() * (flat @ self.A.to(x) + self.b.to(x))
        eps = (flat - abar.sqrt() * x0) / (1 - abar).sqrt()
        return {"x0": x0, "eps": eps, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[self.d.prediction].view_as(x)


def run_against_diffusers(kind, prediction, steps, correction=None, float64=True):
    """Our solver and diffusers' scheduler of the same name, from the same x_T with the same betas, timesteps
    ("trailing" spacing) and model: the x each hands the model at every step, then each result.

    With ``float64`` the scheduler's sigma table (float32 in diffusers) is replaced by the same values in
    float64, so both sides compute in float64 (diffusers' DPM-Solver step still rounds x to float32)."""
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction)
    process = d.respace(f"trailing{steps}")
    thresholding = {} if correction is None else dict(  # s clamped to [1, sample_max_value]: 1 is plain clipping
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.0 if correction == "clip" else 1e9)
    ref = reference_solver(kind, num_train_timesteps=1000, trained_betas=d.betas.numpy(), timestep_spacing="trailing",
                           prediction_type=DIFFUSERS_PREDICTION[prediction], **thresholding)
    ref.set_timesteps(steps)
    assert process.timestep_map.flip(0).tolist() == ref.timesteps.tolist()  # same visited steps, T-1 first
    if float64:
        abar = d.alphas_cumprod[ref.timesteps]
        sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])  # ends at sigma 0
        torch.testing.assert_close(sigmas.float(), ref.sigmas, rtol=1e-5, atol=0)  # the same table, more digits
        ref.sigmas = sigmas
    dtype = torch.float64 if float64 else torch.float32
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    model, ours, theirs = LinearModel(d), [], []

    def recording(seen):
        return lambda x, t: (seen.append(x.clone()), model(x, t))[1]

    denoise_fn = {None: None, "clip": clip_x0, "dynamic": dynamic_threshold(0.9)}[correction]
    ours.append(SOLVERS[kind](recording(ours), process, x_T, denoise_fn=denoise_fn))
    x, fn = x_T.clone(), recording(theirs)
    for t in ref.timesteps:
        x = ref.step(fn(x, t.expand(len(x))), t, x).prev_sample
    theirs.append(x)
    assert len(ours) == len(theirs) == steps + 1
    return ours, theirs


@pytest.mark.parametrize("kind", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_fast_solvers_match_diffusers_step_by_step(kind, prediction, steps):
    ours, theirs = run_against_diffusers(kind, prediction, steps)
    for a, b in zip(ours, theirs):  # every intermediate x, then the result
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
@pytest.mark.parametrize("correction", ["clip", "dynamic"])
def test_fast_solvers_correct_the_data_prediction_as_diffusers_thresholding(kind, prediction, correction):
    ours, theirs = run_against_diffusers(kind, prediction, 10, correction)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert ours[-1].abs().max() <= 1  # the last step lands on the corrected data prediction
    assert run_against_diffusers(kind, prediction, 10)[0][-1].abs().max() > 1.5  # uncorrected, this model leaves it


@pytest.mark.parametrize("kind", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_fast_solvers_match_unmodified_diffusers_in_float32(kind, prediction):
    """Plain float32 on both sides. (eps is left to the float64 test: at the cosine schedule's T-1,
    x0 = (x - sigma eps) / alpha with sigma / alpha ~ 2e4 turns either side's rounding into ~1e-3.)"""
    ours, theirs = run_against_diffusers(kind, prediction, 25, float64=False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dpmpp_2m", "unipc"])
def test_fast_solvers_solve_exactly_solvable_data_in_ten_steps(kind):
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction="v")
    x_T = torch.randn(256, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # data a single point: the exact denoiser returns it everywhere, and any step count lands on it
    point = LinearModel(d, mu=0.4, s=0.0, perturb=0.0)
    for steps in ("trailing3", "trailing10", 10):
        assert (SOLVERS[kind](point, d.respace(steps), x_T) - 0.4).abs().max() < 1e-9
    # data N(mu, s^2): the probability-flow ODE keeps z fixed in x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z,
    # and every sampler's last step is the exact denoiser at the last level: E[x0 | x_t] = mu + s^2 alpha_t z / sqrt(..)
    mu, s = 0.4, 0.5
    gaussian = LinearModel(d, mu=mu, s=s, perturb=0.0)
    abar_T = d.alphas_cumprod[-1]
    z = (x_T - abar_T.sqrt() * mu) / (abar_T * s ** 2 + 1 - abar_T).sqrt()

    def error(sample, steps):
        process = d.respace(steps)
        abar = d.alphas_cumprod[process.timestep_map[0]]
        exact = mu + s ** 2 * abar.sqrt() / (abar * s ** 2 + 1 - abar).sqrt() * z
        return (sample(gaussian, process, x_T) - exact).abs().max().item()

    ten = error(SOLVERS[kind], "trailing10")
    assert ten < 0.05                                     # 10 model calls: within 0.05 over 12,288 values
    assert ten < 0.6 * error(ddim_sample, "trailing40")   # closer than DDIM with 4x the calls
    assert ten < 0.25 * error(ddim_sample, "trailing10")  # and 4x closer than DDIM with as many


@pytest.mark.parametrize("kind", ["dpmpp_2m", "unipc"])
def test_fast_solvers_take_guided_and_learned_variance_outputs(kind):
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction="eps")
    cond, uncond, scale = LinearModel(d, seed=0), LinearModel(d, mu=-0.2, seed=1), 3.0

    def paired(x2, t2):  # the conditional model on the first half of the batch, the unconditional on the second
        half = len(x2) // 2
        return torch.cat([cond(x2[:half], t2[:half]), uncond(x2[half:], t2[half:])])

    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = Sampler(kind=kind, steps="trailing10")
    guided = sampler(classifier_free_guidance(paired, scale), d, x_T)
    by_hand = SOLVERS[kind](lambda x, t: uncond(x, t) + scale * (cond(x, t) - uncond(x, t)), d.respace("trailing10"), x_T)
    torch.testing.assert_close(guided, by_hand, atol=1e-12, rtol=0)
    # a learned-range variance (extra channels) does not enter an ODE solver
    learned = GaussianDiffusion(make_betas("cosine", 1000), prediction="eps", variance="learned_range")
    with_variance = lambda x, t: torch.cat([paired(x, t), torch.tanh(x)], dim=1)  # noqa: E731
    out = sampler(classifier_free_guidance(with_variance, scale, learned_variance=True), learned, x_T)
    torch.testing.assert_close(out, guided, atol=1e-12, rtol=0)
