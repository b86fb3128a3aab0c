"""Drawing ẑ_i and pixels for evaluation: batch b of every stage from a generator seeded by
(seed, stage, b), so every prior and setting sees the same noise, with the seconds each stage took."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Sequence

import torch

from unclip.pipeline import UnCLIPPipeline
from unclip.seeding import hash_seed

DECODER_KEYS = ("guidance_scale", "steps", "eta", "sampler", "upsampler_steps")


def with_prior(pipe: UnCLIPPipeline, prior) -> UnCLIPPipeline:
    """The same decoder (and upsamplers) behind another prior; the pipeline checks the CLIPs agree."""
    return UnCLIPPipeline(pipe.clip, pipe.decoder, prior, pipe.upsamplers, pipe.device, pipe.precision)


def seeded(seed: int, *parts, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash_seed(seed, *parts))


def batches(count: int, batch_size: int):
    """(index, slice) of consecutive batches over ``count`` rows."""
    for index, start in enumerate(range(0, count, batch_size)):
        yield index, slice(start, min(start + batch_size, count))


@torch.no_grad()
def sample_embeddings(pipe: UnCLIPPipeline, prompts: Sequence[str], seed: int, settings: dict,
                      batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """ẑ_i (N, D), unit norm, one per prompt, batch b drawn from a generator seeded by (seed, "prior", b);
    and the seconds spent in the prior's sampling (text encoding excluded, as in ``evaluate_prior``)."""
    out, elapsed = [], 0.0
    settings = dict(settings)
    kind = settings.pop("sampler", None)  # a diffusion prior's loop: ddim | ddpm | dpmpp_2m | unipc
    with stage_sampler(pipe.prior, kind) if kind else contextlib.nullcontext():
        for index, rows in batches(len(prompts), batch_size):
            cond = pipe.text_embeddings(list(prompts[rows]))
            generator = seeded(seed, "prior", index, device=pipe.device)
            start = time.perf_counter()
            out.append(pipe.draw_embeddings(cond, generator, **settings))
            elapsed += time.perf_counter() - start
    return torch.cat(out), elapsed


def check_decoder_settings(settings: dict) -> dict:
    unknown = set(settings) - set(DECODER_KEYS)
    if unknown:
        raise ValueError(f"unknown decoder setting(s) {sorted(unknown)}; known: {', '.join(DECODER_KEYS)}")
    return settings


@contextlib.contextmanager
def stage_sampler(stage, kind: str | None):
    """A stage's (decoder's, diffusion prior's) sampler switched to another loop for the duration: ``ddpm`` is ancestral sampling
    (Ho et al. 2020, Alg. 2) over the (respaced) chain, ``ddim`` is Song et al. 2021, eq. 12, ``dpmpp_2m``
    and ``unipc`` the second-order multistep ODE solvers (``unclip.diffusion.samplers``)."""
    original = stage.sampler
    if kind is not None and kind != original.kind:
        stage.sampler = dataclasses.replace(original, kind=kind)  # validates the kind, fresh respacing cache
    try:
        yield stage.sampler
    finally:
        stage.sampler = original


@torch.no_grad()
def decode_embeddings(pipe: UnCLIPPipeline, z_img: torch.Tensor, prompts: Sequence[str], seed: int, settings: dict,
                      batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """Pixels (N, 3, H, W) in [-1, 1] decoded from ẑ_i (and the prompts, for a text-conditioned decoder),
    batch b from a generator seeded by (seed, "decoder", b); and the seconds spent decoding."""
    settings = check_decoder_settings(dict(settings))
    out, elapsed = [], 0.0
    with stage_sampler(pipe.decoder, settings.get("sampler")):
        for index, rows in batches(len(z_img), batch_size):
            generator = seeded(seed, "decoder", index, device=pipe.device)
            start = time.perf_counter()
            pixels = pipe.decode(z_img[rows], generator, settings.get("guidance_scale"), settings.get("steps"),
                                 list(prompts[rows]), eta=settings.get("eta"), upsampler_steps=settings.get("upsampler_steps"))
            elapsed += time.perf_counter() - start
            out.append(pixels.float().cpu())
    return torch.cat(out), elapsed


@torch.no_grad()
def compose_images(pipe: UnCLIPPipeline, prompts: Sequence[str], seed: int, split, layout: bool, prior_settings: dict,
                   decoder_settings: dict, batch_size: int = 64) -> torch.Tensor:
    """Pixels (N, 3, H, W) in [-1, 1] of prompts drawn as conjunctions of their parts (``split``; with ``layout``
    each part leads where it names, ``unclip.composition``), batch b from a generator seeded by (seed, "composed", b)."""
    from unclip.composition import generate_composed

    settings = check_decoder_settings(dict(decoder_settings))
    unknown = set(prior_settings) - {"guidance_scale", "steps"}
    if unknown:
        raise ValueError(f"composed sampling takes the prior settings guidance_scale and steps, not {sorted(unknown)}")
    decode_options = {k: settings.get(k) for k in ("guidance_scale", "steps", "eta", "upsampler_steps")}
    out = []
    with stage_sampler(pipe.decoder, settings.get("sampler")):
        for index, rows in batches(len(prompts), batch_size):
            generator = seeded(seed, "composed", index, device=pipe.device)
            pixels, _ = generate_composed(pipe, list(prompts[rows]), split, generator, dict(prior_settings),
                                          decode_options, layout)
            out.append(pixels.float().cpu())
    return torch.cat(out)


def timings(prior_seconds: float, decode_seconds: float, count: int) -> dict:
    ms = lambda s: 1000 * s / max(count, 1)  # noqa: E731
    return {"ms_prior": ms(prior_seconds), "ms_decode": ms(decode_seconds), "ms_per_image": ms(prior_seconds + decode_seconds)}
