"""One diffusion implementation for the prior, the decoder and the upsamplers."""

from unclip.diffusion.samplers import (Sampler, classifier_free_guidance, clip_x0, composed_guidance, ddim_invert, ddim_sample, ddim_step,
                                       ddpm_sample, ddpm_step, dpmpp_2m_sample, dynamic_threshold, unipc_sample)
from unclip.diffusion.schedule import GaussianDiffusion, make_betas, space_timesteps

__all__ = ["GaussianDiffusion", "Sampler", "classifier_free_guidance", "clip_x0", "composed_guidance", "ddim_invert", "ddim_sample",
           "ddim_step", "ddpm_sample", "ddpm_step", "dpmpp_2m_sample", "dynamic_threshold", "make_betas",
           "space_timesteps", "unipc_sample"]
